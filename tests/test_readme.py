"""The documents keep no hand-made copy of what the code holds: no file lengths (each change would edit them, and
merges conflict on them), and no metric name that metrics.py does not declare (a renamed metric leaves none behind)."""
import os
import re

import pytest

from conftest import ROOT
from metrics import METRICS

DOCUMENTS = sorted(f for f in os.listdir(ROOT) if f.endswith(".md"))


def test_the_readme_states_no_files_length():
    readme = open(os.path.join(ROOT, "README.md")).read()
    stated = re.findall(r"`\w+\.py`[^\n|]*\(\d+ lines\)|^\|.*`\w+\.py`.*\| [\d, ]+ \|$", readme, re.M)
    assert not stated, f"README.md states file lengths, which every change would have to edit: {stated}"


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_metric_a_document_names_is_declared_in_metrics_py(document):
    groups = "|".join(sorted({k.split("/")[0] for k in METRICS if "/" in k}))  # rewards, logps, eval, drift, ...
    named = set(re.findall(rf"(?<![\w/.-])(?:{groups})/\w+(?:/\w+)*", open(os.path.join(ROOT, document)).read()))
    assert named <= set(METRICS), f"{document} names metrics that metrics.py does not declare: " \
                                  f"{sorted(named - set(METRICS))}"
