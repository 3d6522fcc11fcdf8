"""locate.locate: one place turns a model argument into a model, or into one sentence that says what it was taken for
and what to do. Hub cases run against a closed port or a local fake hub: never the network, never its retries."""
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import gguf
import numpy as np
import pytest
import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

import locate as locate_module
from conftest import TINY
from guards import UserError
from locate import DEFAULT_MODEL, kind_of, locate
from model import load_model, load_tokenizer


@pytest.mark.parametrize("name, kind", [
    (DEFAULT_MODEL, "builtin"),
    ("./" + DEFAULT_MODEL, "path"),  # the built-in name is reserved; a folder of that name is written as a path
    ("EleutherAI/pythia-160m", "hub"),
    ("gpt2", "hub"),  # a hub id without an organisation
    ("notes.md", "hub"),  # no such file here and a valid id: taken for the hub (its message says no file exists)
    ("README.md", "path"),  # exists here
    ("tests", "path"),
    ("out/run/step_000001", "path"),  # two '/': no hub id has them
    ("/abs/model", "path"), ("./model", "path"), ("../model", "path"), ("~/model", "path"),
    ("config.json", "path"), ("org/model.gguf", "path"),
    ("my model", "path"), ("org/", "path"), ("a\\b", "path"), ("", "path"),  # no valid hub id
])
def test_a_model_argument_is_a_path_or_a_hub_id_by_its_form(name, kind, monkeypatch):
    monkeypatch.chdir(os.path.dirname(TINY) + "/..")  # the repository root: README.md and tests/ exist
    assert kind_of(name) == kind


def test_an_existing_folder_named_like_a_hub_id_is_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert kind_of("org/name") == "hub"
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert kind_of("org/name") == "path"


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, chat_tokenizer):
    folder = tmp_path_factory.mktemp("tiny") / "model"
    load_model(TINY).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    return folder


def test_a_checkpoint_folder_is_read_through_its_policy_folder(tiny_folder, tmp_path):
    step = tmp_path / "run" / "step_000007"
    step.mkdir(parents=True)
    (step / "policy").symlink_to(tiny_folder)
    assert locate(str(step)).kind == "checkpoint" and locate(str(step)).path == str(step / "policy")
    loaded = load_model(str(step)).state_dict()
    saved = load_model(str(tiny_folder)).state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert load_tokenizer(str(step), log=lambda m: None)("What is 2 + 2?")["input_ids"]


# ----------------------------------------------------------------------------------------------------------------
# a GGUF file: any path, dequantized once, cached under $TRDPO_CACHE keyed by the file

BYTES = list(bytes_to_unicode().values())  # GPT-2's byte-level alphabet: printable ASCII stands for itself
TOKENS = BYTES + ["<|im_start|>", "<|im_end|>", "he"]  # one merge, "h e" -> "he" (id 258)


def write_tiny_gguf(path, hidden=16, ff=32, heads=2, seed=0):
    """A one-block Llama in GGUF, written as llama.cpp lays it out, with a byte-level tokenizer; returns its
    token embedding, the numbers the dequantized model must hold."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in [(w.add_block_count, 1), (w.add_context_length, 64), (w.add_embedding_length, hidden),
                       (w.add_feed_forward_length, ff), (w.add_head_count, heads), (w.add_head_count_kv, 1),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 10000.0),
                       (w.add_rope_dimension_count, hidden // heads), (w.add_vocab_size, len(TOKENS)),
                       (w.add_tokenizer_model, "gpt2"), (w.add_tokenizer_pre, "default"), (w.add_token_list, TOKENS),
                       (w.add_token_types, [1] * 256 + [3, 3, 1]), (w.add_token_merges, ["h e"]),
                       (w.add_bos_token_id, 256), (w.add_eos_token_id, 257)]:
        add(value)
    embedding = rng.standard_normal((len(TOKENS), hidden)).astype(np.float32)
    w.add_tensor("token_embd.weight", embedding)
    kv = hidden // heads
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (ff, hidden)), ("ffn_up", (ff, hidden)),
                        ("ffn_down", (hidden, ff))]:
        w.add_tensor(f"blk.0.{name}.weight", rng.standard_normal(shape).astype(np.float32))
    for name in ("blk.0.attn_norm", "blk.0.ffn_norm", "output_norm"):
        w.add_tensor(f"{name}.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", rng.standard_normal((len(TOKENS), hidden)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return embedding


def test_any_gguf_file_is_dequantized_once_into_a_cache_keyed_by_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(locate_module, "CACHE", str(tmp_path / "cache"))
    path = tmp_path / "anywhere" / "tiny.gguf"
    path.parent.mkdir()
    embedding = write_tiny_gguf(path)
    policy = load_model(str(path))
    assert torch.equal(policy.get_input_embeddings().weight, torch.from_numpy(embedding))  # the file's numbers
    tokenizer = load_tokenizer(str(path), log=lambda m: None)
    assert tokenizer("the", add_special_tokens=False)["input_ids"] == [BYTES.index("t"), TOKENS.index("he")]
    assert capsys.readouterr().out.count("dequantizing") == 1  # load_tokenizer read the cached folder
    assert [p.name.startswith("tiny-") for p in (tmp_path / "cache" / "gguf").iterdir()] == [True]
    write_tiny_gguf(path, seed=1)  # the file changes: a new key, dequantized again
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not torch.equal(load_model(str(path)).get_input_embeddings().weight, policy.get_input_embeddings().weight)
    assert len(list((tmp_path / "cache" / "gguf").iterdir())) == 2


# ----------------------------------------------------------------------------------------------------------------
# the hub: unreachable, offline, cached, or without the model


def closed_port():
    with socket.socket() as s:  # a port nothing listens on: connections are refused at once
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def point_hub_at(url, monkeypatch):
    """What HF_ENDPOINT=url does when set before huggingface_hub is imported."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """The hub library pointed at a port nothing listens on, with an empty cache."""
    from huggingface_hub import constants
    point_hub_at(f"http://127.0.0.1:{closed_port()}", monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    return constants


@pytest.mark.parametrize("offline", [False, True])
def test_a_hub_id_without_a_hub_is_one_sentence_with_the_copy_advice_in_a_second(offline, no_hub, monkeypatch):
    monkeypatch.setattr(no_hub, "HF_HUB_OFFLINE", offline)  # HF_HUB_OFFLINE=1: the same, without trying
    start = time.time()
    with pytest.raises(UserError) as error:
        load_model("EleutherAI/pythia-160m", flag="--baseline")
    assert time.time() - start < 2  # one refused connection, not the hub library's half-minute of retries
    message = str(error.value)
    for words in ("--baseline EleutherAI/pythia-160m: the hub cannot be reached", "not in the local cache",
                  "hf download EleutherAI/pythia-160m --local-dir DIR", "pass --baseline DIR", "taken for a hub id"):
        assert words in message, message


def test_a_hub_model_already_in_the_cache_loads_without_the_hub(no_hub, tiny_folder):
    snapshot = os.path.join(no_hub.HF_HUB_CACHE, "models--org--tiny", "snapshots", "abc123")
    os.makedirs(os.path.join(no_hub.HF_HUB_CACHE, "models--org--tiny", "refs"))
    open(os.path.join(no_hub.HF_HUB_CACHE, "models--org--tiny", "refs", "main"), "w").write("abc123")
    os.makedirs(os.path.dirname(snapshot), exist_ok=True)
    os.symlink(tiny_folder, snapshot)
    assert locate("org/tiny") == ("hub", snapshot, snapshot)
    saved = load_model(str(tiny_folder)).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in load_model("org/tiny").state_dict().items())


class FakeHub(BaseHTTPRequestHandler):
    """A hub that is up and answers every file request with one error code."""
    status, code = 404, "RepoNotFound"

    def do_HEAD(self):
        if self.path == "/":
            self.send_response(200)
        else:
            self.send_response(FakeHub.status)
            self.send_header("X-Error-Code", FakeHub.code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, code, says", [
    (404, "RepoNotFound", ["--model org/missing: the hub has no model org/missing", "hf auth login",
                           "check the spelling", "there is no file or folder org/missing here"]),
    (403, "GatedRepo", ["--model org/missing is gated on the hub", "hf auth login", "hf download org/missing"]),
    (404, "EntryNotFound", ["--model org/missing on the hub has no config.json: it is not a transformers model"]),
])
def test_a_hub_that_answers_without_the_model_says_why(status, code, says, no_hub, monkeypatch):
    monkeypatch.setattr(FakeHub, "status", status)
    monkeypatch.setattr(FakeHub, "code", code)
    server = HTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    point_hub_at(f"http://127.0.0.1:{server.server_port}", monkeypatch)
    try:
        with pytest.raises(UserError) as error:
            locate("org/missing")
    finally:
        server.shutdown()
    for words in says:
        assert words in str(error.value), str(error.value)
