import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_tiny_bench_prints_every_figure():
    """bench.py --tiny runs two TR-DPO steps on a CPU and prints step time, tokens/s, MFU, memory and update costs."""
    out = subprocess.run([sys.executable, "bench.py", "--tiny", "--steps", "2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120).stdout
    assert re.search(r"step [\d.]+ ms, tokens/s [\d,]+, MFU [\d.]+%, peak memory", out), out
    assert re.search(r"measured matmul peak [\d.]+ TFLOP/s", out), out
    assert re.search(r"soft \(alpha=0.6\) [\d.]+ ms = [\d.]+% of the step, hard \(alpha=1\) [\d.]+ ms", out), out
