"""Every entry point, given bad input, ends with one sentence on a line of its own on stderr and no traceback: status
1 for input found wrong while running (guards.UserError), 2 for a flag argparse refuses before anything loads.

The tables run in this process (runpy, with sys.argv patched; a UserError is printed by the hook the entry point
installed, as it would be at the top of a process), so that they cost milliseconds; one real process per entry point
proves the path through the interpreter. The hub is a port nothing listens on: never the network."""
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import time

import pytest
from transformers import GPT2Config

import model
from conftest import PAIRS, ROOT, TINY
from guards import UserError

HUB_ID = "EleutherAI/pythia-160m"
RM_ID = "OpenAssistant/reward-model-deberta-v3-large-v2"


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, chat_tokenizer):
    """Bad inputs of every kind, as files and folders."""
    root = tmp_path_factory.mktemp("errors")
    (root / "bad.json").write_text("{not json")
    (root / "not.gguf").write_text("hello")
    (root / "no_weights").mkdir()
    (root / "no_weights" / "config.json").write_text(open(TINY).read())
    model.load_model(TINY).save_pretrained(root / "no_tokenizer")
    run = root / "run"
    (run / "step_000002").mkdir(parents=True)
    (run / "args.json").write_text(json.dumps({"method": "dpo", "alpha": None, "tau": None}))
    (root / "empty_log").mkdir()
    (root / "empty_log" / "args.json").write_text("{}")
    (root / "empty_log" / "metrics.jsonl").write_text("")
    (root / "bad_log").mkdir()
    (root / "bad_log" / "args.json").write_text("{}")
    (root / "bad_log" / "metrics.jsonl").write_text('{"step": 1, "loss"\n{"step": 2, "loss": 0.6}\n')
    (root / "empty").mkdir()
    for name, cut in (("cut", lambda b: b[: len(b) // 2]), ("zeroed", lambda b: bytes(len(b)))):  # damaged weights
        model.load_model(TINY).save_pretrained(root / name)
        chat_tokenizer.save_pretrained(root / name)
        weights = root / name / "model.safetensors"
        weights.write_bytes(cut(weights.read_bytes()))
    GPT2Config(vocab_size=49152, n_embd=32, n_layer=2, n_head=4, n_positions=32).to_json_file(root / "gpt2.json")
    return {"root": str(root), "run": str(run), "tiny": TINY, "pairs": PAIRS,
            "closed": f"http://127.0.0.1:{closed_port()}"}


@pytest.fixture
def no_hub(world, monkeypatch, tmp_path):
    """The hub library pointed at a port nothing listens on (as HF_ENDPOINT does), with an empty cache."""
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", world["closed"])
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))


def run_in_process(script, argv, monkeypatch, capsys):
    """(status, stderr) of `python script *argv`, run in this process."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # put back afterwards: the entry point installs its own
    capsys.readouterr()
    try:
        runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
        status = 0
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)  # what the interpreter does with SystemExit("message")
    except UserError as e:  # what the hook the entry point installed prints at the top of a process
        sys.excepthook(type(e), e, e.__traceback__)
        status = 1
    return status, capsys.readouterr().err


def assert_one_sentence(stderr, script, words):
    """The message is one line of stderr that starts with `error:` (argparse: `script: error:`), holding the words,
    with nothing before it on its line (no progress bar) and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if re.match(rf"({re.escape(script)}: )?error: ", line)]
    assert len(lines) == 1, stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def ids(table):
    return [" ".join(case.values[0] if hasattr(case, "values") else case[0]) for case in table]


def check(script, argv, status, words, world, monkeypatch, capsys):
    fill = lambda text: text.format(**world)  # noqa: E731
    got, stderr = run_in_process(script, [fill(a) for a in argv], monkeypatch, capsys)
    assert got == status, stderr
    assert_one_sentence(stderr, script, [fill(w) for w in words])


TRAIN = [  # (argv, status, the words the message must hold)
    (["--model", HUB_ID], 1, [f"--model {HUB_ID}: the hub cannot be reached", "not in the local cache",
                              f"hf download {HUB_ID} --local-dir DIR", "pass --model DIR", "taken for a hub id"]),
    (["--model", "/no/such/dir"], 1, ["--model /no/such/dir: no such file or folder", "Expected a model folder"]),
    (["--model", "out/RUN/step_000001"], 1, ["--model out/RUN/step_000001: no such file or folder"]),
    (["--model", "README.md"], 1, ["--model README.md is a file but neither a config .json nor a .gguf"]),
    (["--model", "{root}/bad.json"], 1, ["(taken for a config .json, for a random init) cannot be read",
                                         "is not a valid JSON file"]),
    (["--model", "{root}/not.gguf"], 1, ["(taken for a GGUF file) cannot be read", "is not a GGUF file"]),
    (["--model", "{root}/no_weights"], 1, ["holds config.json but no weights", "model.safetensors"]),
    (["--model", "{root}/no_tokenizer"], 1, ["--model {root}/no_tokenizer has no tokenizer", "save_pretrained"]),
    (["--model", "{run}"], 1, ["--model {run} is a train.py run folder, not a checkpoint", "{run}/step_000002"]),
    (["--model", "{root}/empty"], 1, ["is a folder but not a model folder", "config.json and weights"]),
    (["--beta", "0"], 2, ["argument --beta: 0 must be positive"]),
    (["--model", "{root}/cut"], 1, ["--model {root}/cut: its weights file {root}/cut/model.safetensors cannot be read",
                                    "damaged or cut short"]),
    (["--model", "{root}/zeroed"], 1, ["--model {root}/zeroed: its weights file {root}/zeroed/model.safetensors"]),
    (["--model", "{root}/gpt2.json", "--dataset", "{pairs}", "--eval_pairs", "8"], 2,  # GPT-2: a vector per position
     ["--max_length 512 is beyond the 32 positions --model {root}/gpt2.json has learned"]),
    (["--seed", "20261208011500"], 2, ["argument --seed: 20261208011500 must be an integer from 0 to 2^32 - 1"]),
]


@pytest.mark.parametrize("argv, status, words", TRAIN, ids=ids(TRAIN))
def test_train_py(argv, status, words, world, no_hub, monkeypatch, capsys, tmp_path):
    check("train.py", argv + ["--out_dir", str(tmp_path / "out")], status, words, world, monkeypatch, capsys)


EVALUATE = [
    (["out/RUN/step_000001", "--baseline", "{tiny}"], 1, ["checkpoint out/RUN/step_000001: no such file or folder"]),
    (["{run}", "--baseline", "{tiny}"], 1, ["checkpoint {run} is a train.py run folder, not a checkpoint"]),
    (["{tiny}", "--baseline", HUB_ID], 1, [f"--baseline {HUB_ID}: the hub cannot be reached", "pass --baseline DIR"]),
    (["{tiny}", "--baseline", "{tiny}", "--judge", f"rm:{RM_ID}"], 1,
     [f"--judge rm:{RM_ID}: the hub cannot be reached", f"hf download {RM_ID} --local-dir DIR",
      "pass --judge rm:DIR"]),
    (["{tiny}", "--baseline", "{tiny}", "--judge", "rm:{tiny}"], 1, ["is a config .json, which gives random weights"]),
    (["{tiny}", "--baseline", "{tiny}", "--judge", "llm:{closed}/v1"], 1,
     ["--judge llm:{closed}/v1: the endpoint cannot be reached", "Connection refused"]),
    (["{tiny}", "--baseline", "{tiny}", "--prompts", "hh"], 1, ["--judge gold knows only the demo tasks"]),
    (["{tiny}", "--baseline", "{tiny}", "--n_prompts", "0"], 2, ["argument --n_prompts: 0 must be at least 1"]),
    (["{tiny}", "--baseline", "{tiny}", "--n_pairs", "-1"], 2, ["argument --n_pairs: -1 must be at least 0 (0: none)"]),
    (["{tiny}", "--baseline", "{tiny}", "--max_new_tokens", "0"], 2,
     ["argument --max_new_tokens: 0 must be at least 1"]),
    (["{tiny}", "--baseline", "{tiny}", "--batch_size", "0"], 2, ["argument --batch_size: 0 must be at least 1"]),
    (["{tiny}", "--baseline", "{tiny}", "--temperature", "-1"], 2,
     ["argument --temperature: -1 must be at least 0 (0: greedy)"]),
    (["{tiny}", "--baseline", "{tiny}", "--judge", "rm:"], 2, ["--judge 'rm:': expected gold, rm:MODEL or llm:URL"]),
    (["{tiny}", "--baseline", "{tiny}", "--max_length", "64", "--max_prompt_length", "64"], 2,
     ["--max_prompt_length 64 must be less than --max_length 64"]),
    (["{tiny}", "--baseline", "{tiny}", "--dtype", "fp16"], 2, ["--dtype: invalid choice: 'fp16'"]),
    (["{tiny}"], 1, ["pass --baseline, the model the checkpoints started from: no checkpoint comes from a train.py"]),
    (["{root}/cut", "--baseline", "{tiny}"], 1, ["checkpoint {root}/cut: its weights file {root}/cut/model.safetensors"]),
]


@pytest.mark.parametrize("argv, status, words", EVALUATE, ids=ids(EVALUATE))
def test_evaluate_py(argv, status, words, world, no_hub, monkeypatch, capsys, tmp_path):
    check("evaluate.py", argv + ["--out_dir", str(tmp_path / "eval")], status, words, world, monkeypatch, capsys)


DATA = [
    (["demo", "--model", "/no/such/dir"], 1, ["--model /no/such/dir: no such file or folder"]),
    (["demo", "--model", HUB_ID], 1, [f"--model {HUB_ID}: the hub cannot be reached", "pass --model DIR"]),
    (["/no/such.jsonl", "--model", "{tiny}"], 1, ["/no/such.jsonl: no such file"]),
    (["demo", "--max_prompt_length", "600"], 2, ["--max_prompt_length 600 must be less than --max_length 512"]),
    (["demo", "--batch_size", "0"], 2, ["argument --batch_size: 0 must be at least 1"]),
    (["demo", "--split", "dev"], 2, ["--split: invalid choice: 'dev'"]),
]


@pytest.mark.parametrize("argv, status, words", DATA, ids=ids(DATA))
def test_data_py(argv, status, words, world, no_hub, monkeypatch, capsys):
    check("data.py", argv, status, words, world, monkeypatch, capsys)


PLOT = [
    (["{root}/empty"], 1, ["{root}/empty has no args.json: is it a train.py --out_dir?"]),
    (["{run}"], 1, ["{run} has no metrics.jsonl"]),
    (["{root}/empty_log"], 1, ["metrics.jsonl holds no log line yet"]),
    (["{root}/bad_log"], 1, ["{root}/bad_log/metrics.jsonl:1 is not valid JSON", "fix or delete that line"]),
    (["{run}", "--out", "curves.txt"], 2, ["--out curves.txt: the figure's type comes from its extension"]),
]


@pytest.mark.parametrize("argv, status, words", PLOT, ids=ids(PLOT))
def test_plot_py(argv, status, words, world, monkeypatch, capsys):
    check("plot.py", argv, status, words, world, monkeypatch, capsys)


TOY = [
    (["--steps", "-1"], 2, ["argument --steps: -1 must be at least 1"]),
    (["--steps", "0"], 2, ["argument --steps: 0 must be at least 1"]),
    (["--width", "-2"], 2, ["argument --width: -2 must be at least 0"]),
    (["--lr", "0"], 2, ["argument --lr: 0 must be positive"]),
    (["--beta", "-1"], 2, ["argument --beta: -1 must be positive"]),
    (["--out", "toy.txt"], 2, ["--out toy.txt: the figure's type comes from its extension, one of .png"]),
]


@pytest.mark.parametrize("argv, status, words", TOY, ids=ids(TOY))
def test_toy_py(argv, status, words, world, monkeypatch, capsys):
    check("toy.py", argv, status, words, world, monkeypatch, capsys)


BENCH = [
    (["--steps", "0"], 2, ["argument --steps: 0 must be at least 1"]),
    (["--tiny", "--hidden_size", "30"], 2, ["--hidden_size 30 must be a multiple of --num_heads 4"]),
    (["--vocab_size", "1"], 2, ["argument --vocab_size: 1 must be at least 2"]),
    (["--alpha", "2"], 2, ["argument --alpha: 2 must be in [0, 1]"]),
    (["--lr", "-1"], 2, ["argument --lr: -1 must be positive"]),
    (["--config", "README.md"], 2, ["--config README.md: expected a config .json file"]),
    (["--config", "/no/such.json"], 2, ["--config /no/such.json: expected a config .json file", "no such file"]),
    (["--config", "{root}/bad.json"], 1, ["--config {root}/bad.json (taken for a config .json, for a random init) "
                                          "cannot be read"]),
    pytest.param(["--tiny", "--vs-trl"], 2, ["--vs-trl needs TRL"], marks=pytest.mark.skipif(
        __import__("importlib.util").util.find_spec("trl") is not None, reason="TRL is installed here")),
]


@pytest.mark.parametrize("argv, status, words", BENCH, ids=ids(BENCH))
def test_bench_py(argv, status, words, world, monkeypatch, capsys):
    check("bench.py", argv, status, words, world, monkeypatch, capsys)


# one real process per entry point: the interpreter's own exit, hook and streams
PROCESSES = {
    "train.py": (["--model", HUB_ID, "--out_dir", "{root}/out"], 1, [f"--model {HUB_ID}: the hub cannot be reached"]),
    "evaluate.py": (["out/RUN/step_000001", "--baseline", "{tiny}"], 1, ["checkpoint out/RUN/step_000001: no such"]),
    "data.py": (["demo", "--model", "/no/such/dir"], 1, ["--model /no/such/dir: no such file or folder"]),
    "plot.py": (["{root}/empty"], 1, ["has no args.json"]),
    "toy.py": (["--steps", "-1"], 2, ["argument --steps: -1 must be at least 1"]),
    "bench.py": (["--config", "{root}/bad.json"], 1, ["cannot be read"]),
}


@pytest.mark.slow  # six interpreters; the tables above run the same inputs in this process in milliseconds
def test_each_entry_point_as_a_process_ends_in_one_sentence_without_a_traceback(world, tmp_path):
    env = {**os.environ, "HF_ENDPOINT": world["closed"], "HF_HUB_CACHE": str(tmp_path / "hub-cache")}
    env.pop("HF_HUB_OFFLINE", None)
    start, started = time.time(), {}
    for script, (argv, _, _) in PROCESSES.items():  # all at once: each spends its time importing
        started[script] = subprocess.Popen([sys.executable, script, *[a.format(**world) for a in argv]], cwd=ROOT,
                                           env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for script, process in started.items():
        _, stderr = process.communicate(timeout=300)
        argv, status, words = PROCESSES[script]
        assert process.returncode == status, (script, stderr)
        assert_one_sentence(stderr, script, [w.format(**world) for w in words])
    assert time.time() - start < 120  # no hub retries (half a minute each) anywhere
