"""evaluate.py on the checkpoints of a train.py run: it scores only rows the run never trained on, cut as training cut
them, with the run's lengths, in the dtype asked for; runs that disagree about their held-out rows are refused."""
import contextlib
import io
import json
import os
import sys
import threading
from http.server import HTTPServer

import pytest
import torch

import evaluate
from conftest import PAIRS, TINY, train_py
from data import collate, encode, render, tokenize
from guards import UserError
from model import load_model, load_tokenizer, sequence_logps
from sources import load_splits
from test_data import rows_per_prompt
from test_evaluate import FakeJudge

pytestmark = pytest.mark.slow  # runs train.py: `make test` runs these, `make test-fast` not

EVAL_PAIRS, MAX_LENGTH, MAX_PROMPT_LENGTH, MAX_NEW_TOKENS = 16, 64, 48, 4
quiet = {"log": lambda message: None}


def long_row(i):
    """A conversation of several turns, far longer than the run's --max_prompt_length: training cuts it."""
    turns = []
    for t in range(3):
        turns += [{"role": "user", "content": f"Question {i}.{t}: tell me about the number {i * 7 + t} at length."},
                  {"role": "assistant", "content": f"The number {i * 7 + t} is a fine number, and here is why. " * 2}]
    turns.append({"role": "user", "content": f"And what is {i} + {i}?"})
    return {"prompt": turns, "chosen": str(2 * i), "rejected": str(2 * i + 1)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A JSONL file (tests/pairs.jsonl and 20 long conversations) and a tiny run that trained 2 steps on it,
    holding out EVAL_PAIRS rows, with a checkpoint after each step."""
    root = tmp_path_factory.mktemp("eval-runs")
    data = root / "data.jsonl"
    data.write_text(open(PAIRS).read() + "".join(json.dumps(long_row(i)) + "\n" for i in range(20)))
    out = root / "run"
    status, log = train_py("--model", TINY, "--dataset", data, "--eval_pairs", EVAL_PAIRS, "--batch_size", 4,
                           "--micro_batch_size", 2, "--max_steps", 2, "--save_interval", 1, "--max_length", MAX_LENGTH,
                           "--max_prompt_length", MAX_PROMPT_LENGTH, "--lr", "1e-3", "--warmup_steps", 0,
                           "--out_dir", out)
    assert status == 0, log[-3000:]
    return {"data": str(data), "out": out, "checkpoints": [str(out / "step_000001"), str(out / "step_000002")]}


@pytest.fixture(scope="module")
def judge():
    """An OpenAI-compatible judge on this machine (tests/test_evaluate.py): the judge's kind does not matter here."""
    server = HTTPServer(("127.0.0.1", 0), FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"llm:http://127.0.0.1:{server.server_port}/v1"
    server.shutdown()


def run_evaluate(*argv, monkeypatch, out_dir):
    """evaluate.py in this process: (results.json, scored_rows.json or None, per-checkpoint JSONs)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, argv), "--max_new_tokens", str(MAX_NEW_TOKENS),
                                      "--batch_size", "8", "--out_dir", str(out_dir)])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    evaluate.main()
    scored = out_dir / "scored_rows.json"
    per_checkpoint = [json.load(open(p)) for p in sorted(out_dir.glob("*step*.json"))]
    return json.load(open(out_dir / "results.json")), json.load(open(scored)) if scored.exists() else None, \
        per_checkpoint


@pytest.fixture(scope="module")
def evaluated(run, judge, tmp_path_factory):
    """evaluate.py on both checkpoints of the run, as a user runs it: (results, scored rows, per-checkpoint JSONs,
    stdout, stderr). Several tests read it."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as monkeypatch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        found = run_evaluate(*run["checkpoints"], "--baseline", TINY, "--prompts", run["data"], "--judge", judge,
                             monkeypatch=monkeypatch, out_dir=tmp_path_factory.mktemp("evaluated"))
    return (*found, out.getvalue(), err.getvalue())


def test_a_run_on_a_jsonl_file_is_scored_only_on_rows_it_never_trained_on(run, evaluated):
    train_rows, held = load_splits(run["data"], EVAL_PAIRS, **quiet)  # what train.py trained on, by its own split
    results, scored, per_checkpoint, out, err = evaluated
    trained = {evaluate.prompt_text(r["prompt"]) for r in train_rows}
    for r in per_checkpoint:  # the samples each checkpoint's file shows
        assert r["samples"] and not {s["prompt"] for s in r["samples"]} & trained
    assert scored["pairs"] and set(scored["pairs"]) <= {r["where"] for r in held}
    assert not set(scored["pairs"]) & {r["where"] for r in train_rows}
    assert len(scored["sampled"]) == len({json.dumps(r["prompt"]) for r in held})  # every held-out prompt, no more
    assert f"held out {EVAL_PAIRS} of the {len(train_rows) + EVAL_PAIRS} rows" in out and "scoring those 16" in out
    assert all(f"sampling {c}" in err for c in run["checkpoints"])  # a progress bar on stderr while sampling
    assert [r["dtype"] for r in results] == ["float32"] * 2  # --dtype auto on the CPU


def test_prompts_are_cut_and_pairs_tokenized_with_the_runs_lengths(run, evaluated):
    results, scored = evaluated[:2]
    assert (scored["max_length"], scored["max_prompt_length"]) == (MAX_LENGTH, MAX_PROMPT_LENGTH)
    tokenizer = load_tokenizer(TINY, **quiet)
    _, held = load_splits(run["data"], EVAL_PAIRS, **quiet)
    long = [r["prompt"] for r in held if len(r["prompt"]) == 7]  # held-out conversations of long_row's 7 messages
    assert long and all(len(render(tokenizer, p)) > 100 for p in long)
    budget = max(MAX_PROMPT_LENGTH, MAX_LENGTH - MAX_NEW_TOKENS)
    assert all(len(render(tokenizer, p)) <= budget for p in scored["sampled"])
    cut = [p for p in scored["sampled"] if "And what is" in json.dumps(p)]  # the long ones: older exchanges dropped
    assert [p[-1] for p in cut] == [p[-1] for p in long] and all(len(p) < 7 for p in cut)
    # the implicit-reward accuracy, recomputed on the held-out pairs tokenized as the run tokenized its pairs
    pairs = tokenize(held, tokenizer, MAX_LENGTH, MAX_PROMPT_LENGTH, **quiet)
    assert [held[e["row"]]["where"] for e in pairs] == scored["pairs"]
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        pc, pr = sequence_logps(load_model(run["checkpoints"][-1]), batch).chunk(2)
        sc, sr = sequence_logps(load_model(TINY), batch).chunk(2)
    assert results[-1]["reward_accuracy"] == pytest.approx(((pc - sc) > (pr - sr)).double().mean().item())


@pytest.mark.parametrize("long_prompt_of", ["messages", "text"])
def test_a_prompt_is_cut_exactly_as_training_cuts_one_whose_completion_has_max_new_tokens_tokens(
        long_prompt_of, chat_tokenizer, plain_tokenizer):
    tokenizer = chat_tokenizer if long_prompt_of == "messages" else plain_tokenizer
    row = long_row(3) if long_prompt_of == "messages" else {"prompt": " ".join(f"word{i}" for i in range(80)) +
                                                            "\nTL;DR:", "chosen": " A summary.", "rejected": " No."}
    length, prompt_length = 128, 48  # SmolLM2's template frame alone is 31 tokens
    for max_new_tokens in (6, 100):  # a budget of length - max_new_tokens (122), then of prompt_length (48)
        # a training pair whose longer completion has exactly max_new_tokens tokens, its end token included
        answer = next(a for k in range(1, 200) if len(encode(tokenizer, row["prompt"], a := " ".join(["ok"] * k))[1])
                      == max_new_tokens)
        [example] = tokenize([{**row, "chosen": answer, "rejected": "x"}], tokenizer, length, prompt_length, **quiet)
        [(_, ids)] = evaluate.fit_prompts(tokenizer, [row["prompt"]], length, prompt_length, max_new_tokens)
        assert ids == example["prompt"].tolist()
        assert len(ids) <= max(prompt_length, length - max_new_tokens) < len(render(tokenizer, row["prompt"]))


def test_the_dtype_and_the_lengths_can_be_asked_for_and_the_prompts_default_to_the_runs(run, judge, monkeypatch,
                                                                                         tmp_path):
    results, scored, _ = run_evaluate(run["checkpoints"][-1], "--baseline", TINY, "--judge", judge, "--dtype", "bf16",
                                      "--max_length", 100, "--max_prompt_length", 60, "--n_prompts", 3, "--n_pairs",
                                      2, monkeypatch=monkeypatch, out_dir=tmp_path)
    assert results[-1]["dtype"] == "bfloat16" and torch.isfinite(torch.tensor(results[-1]["kl_seq"]))
    assert (scored["prompts"], scored["max_length"], scored["max_prompt_length"]) == (run["data"], 100, 60)
    assert len(scored["sampled"]) == 3 and len(scored["pairs"]) == 2
    _, held = load_splits(run["data"], EVAL_PAIRS, **quiet)
    assert set(scored["pairs"]) <= {r["where"] for r in held}


def test_a_plain_model_or_another_data_set_is_scored_on_what_it_holds_with_a_note(run, judge, monkeypatch, tmp_path,
                                                                                    capsys):
    other = tmp_path / "other.jsonl"
    other.write_text("".join(json.dumps({"prompt": f"Say {w}.", "chosen": w, "rejected": w + "?"}) + "\n"
                             for w in ("yes", "no", "maybe")))
    _, scored, _ = run_evaluate(run["checkpoints"][-1], "--baseline", TINY, "--prompts", other, "--judge", judge,
                                monkeypatch=monkeypatch, out_dir=tmp_path / "a")
    assert sorted(scored["sampled"]) == ["Say maybe.", "Say no.", "Say yes."]
    assert f"--prompts {other} is not the data set the runs trained on ({run['data']})" in capsys.readouterr().out
    _, scored, _ = run_evaluate(TINY, "--baseline", TINY, "--prompts", other, "--judge", judge,
                                monkeypatch=monkeypatch, out_dir=tmp_path / "b")
    assert (scored["max_length"], scored["max_prompt_length"]) == (512, 256)  # no run: the old fixed lengths
    assert "no checkpoint comes from a train.py run, so no row of" in capsys.readouterr().out


def fake_checkpoint(folder, real, **changes):
    """A checkpoint of another run: the real one's model and data hash, its run's arguments changed."""
    state = torch.load(os.path.join(real, "state.pt"), weights_only=False)
    os.makedirs(folder / "step_000002")
    (folder / "step_000002" / "policy").symlink_to(os.path.join(real, "policy"))
    torch.save({"run": {**state["run"], **changes}, "data_sha256": state["data_sha256"]},
               folder / "step_000002" / "state.pt")
    return str(folder / "step_000002")


@pytest.mark.parametrize("change, says", [
    ({"eval_pairs": 8}, "the checkpoints' runs hold out different rows"),
    ({"skip_bad_rows": True}, "the checkpoints' runs hold out different rows"),
    ({"dataset": "demo"}, "the checkpoints' runs hold out different rows"),
    ({"max_length": 128}, "the checkpoints' runs cut to different --max_length"),
])
def test_checkpoints_whose_runs_disagree_are_refused_naming_each(change, says, run, monkeypatch, tmp_path):
    other = fake_checkpoint(tmp_path / "other", run["checkpoints"][-1], **change)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", run["checkpoints"][-1], other, "--baseline", TINY, "--judge",
                                      "llm:http://127.0.0.1:1/v1", "--out_dir", str(tmp_path / "eval")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with pytest.raises(UserError) as error:
        evaluate.main()
    assert says in str(error.value)
    assert run["checkpoints"][-1] in str(error.value) and other in str(error.value)


def test_a_run_whose_file_is_not_found_from_here_is_refused_rather_than_guessed(run, judge, monkeypatch, tmp_path):
    moved = fake_checkpoint(tmp_path / "moved", run["checkpoints"][-1], dataset="nowhere/data.jsonl")
    monkeypatch.setattr(sys, "argv", ["evaluate.py", moved, "--baseline", TINY, "--prompts", run["data"], "--judge",
                                      judge, "--out_dir", str(tmp_path / "eval")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with pytest.raises(UserError) as error:  # the same file? its rows must not be drawn as if no run had seen them
        evaluate.main()
    assert "the runs trained with --dataset nowhere/data.jsonl, which is not found from" in str(error.value)


def test_a_baseline_from_a_run_on_the_same_file_with_another_split_is_refused(run, monkeypatch, tmp_path):
    sft = fake_checkpoint(tmp_path / "sft", run["checkpoints"][-1], method="sft", eval_pairs=0)
    dpo = fake_checkpoint(tmp_path / "dpo", run["checkpoints"][-1], model=sft)  # a run that started from it
    monkeypatch.setattr(sys, "argv", ["evaluate.py", dpo, "--baseline", sft, "--judge",
                                      "llm:http://127.0.0.1:1/v1", "--out_dir", str(tmp_path / "eval")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with pytest.raises(UserError) as error:
        evaluate.main()
    assert "and the --baseline's hold out different rows" in str(error.value) and sft in str(error.value)


def evaluate_quietly(*argv, monkeypatch, out_dir):
    """run_evaluate with few prompts and pairs, its output swallowed."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run_evaluate(*argv, "--n_prompts", 2, "--n_pairs", 2, monkeypatch=monkeypatch, out_dir=out_dir)


def test_a_file_that_changed_since_the_run_is_refused_naming_it(run, judge, monkeypatch, tmp_path):
    changed = tmp_path / "data.jsonl"  # the run's file with one row appended after training
    changed.write_text(open(run["data"]).read() + json.dumps({"prompt": "New?", "chosen": "yes", "rejected": "no"})
                       + "\n")
    later = fake_checkpoint(tmp_path / "later", run["checkpoints"][-1], dataset=str(changed))
    with pytest.raises(UserError) as error:  # its re-split would score rows the run trained on
        evaluate_quietly(later, "--baseline", TINY, "--judge", judge, monkeypatch=monkeypatch,
                         out_dir=tmp_path / "eval")
    assert f"{later} trained on other pairs than {changed} splits into now" in str(error.value)


def test_runs_are_named_by_the_shortest_ending_of_their_paths_that_tells_them_apart(run, judge, monkeypatch,
                                                                                      tmp_path):
    seeds = [fake_checkpoint(tmp_path / f"seed{s}" / "dpo", run["checkpoints"][-1]) for s in (0, 1)]
    results, _, per_checkpoint = evaluate_quietly(*seeds, "--baseline", TINY, "--judge", judge,
                                                  monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    assert [r["run"] for r in results] == [r["run"] for r in per_checkpoint] == ["seed0/dpo", "seed1/dpo"]
    dpo = {"method": "dpo"}
    names = evaluate.run_names({"a/dpo/step_1": dpo, "b/dpo/step_1": dpo, "b/dpo/step_2": dpo, "dpo/step_3": dpo,
                                "models/sft": None, "sft": None})
    assert names == {"a/dpo/step_1": "a/dpo", "b/dpo/step_1": "b/dpo", "b/dpo/step_2": "b/dpo", "dpo/step_3": "dpo",
                     "models/sft": "models/sft", "sft": "sft"}


def test_the_baseline_is_the_model_the_runs_started_from_and_another_is_refused(run, judge, monkeypatch, tmp_path):
    _, scored, _ = evaluate_quietly(run["checkpoints"][-1], "--judge", judge, monkeypatch=monkeypatch,
                                    out_dir=tmp_path / "eval")  # no --baseline
    assert scored["baseline"] == evaluate.run_args(run["checkpoints"][-1])["model"] == TINY
    with pytest.raises(UserError, match=rf"--baseline {run['checkpoints'][0]} is not the model the checkpoints' runs "
                                        rf"started from \({TINY}, their --model\)"):
        evaluate_quietly(run["checkpoints"][-1], "--baseline", run["checkpoints"][0], "--judge", judge,
                         monkeypatch=monkeypatch, out_dir=tmp_path / "other")
    sft = run["checkpoints"][0]  # a checkpoint as the starting model: named by its folder or by its policy/ alike
    assert evaluate.starting_model({"ckpt": {"model": sft}}, os.path.join(sft, "policy")) == os.path.join(sft, "policy")
    assert evaluate.starting_model({"ckpt": {"model": sft}, "plain": None}, None) == sft
    with pytest.raises(UserError, match="pass --baseline, the model the checkpoints started from: their runs started"):
        evaluate.starting_model({"a": {"model": sft}, "b": {"model": TINY}}, None)


def test_an_out_dir_holding_an_earlier_evaluation_is_refused_unless_overwritten(run, judge, monkeypatch, tmp_path):
    first = fake_checkpoint(tmp_path / "first", run["checkpoints"][-1])
    again = [run["checkpoints"][-1], "--baseline", TINY, "--judge", judge]
    evaluate_quietly(first, *again[1:], monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    with pytest.raises(UserError, match=f"--out_dir {tmp_path / 'eval'} holds an earlier evaluation"):
        evaluate_quietly(*again, monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    results, _, per_checkpoint = evaluate_quietly(*again, "--overwrite", monkeypatch=monkeypatch,
                                                  out_dir=tmp_path / "eval")
    assert [r["checkpoint"] for r in per_checkpoint] == [r["checkpoint"] for r in results] == [run["checkpoints"][-1]]


def test_an_overwrite_that_fails_leaves_the_earlier_evaluation_as_it_was(run, judge, monkeypatch, tmp_path):
    """A checkpoint that fails to load, a judge that starts refusing, Ctrl-C over hours of sampling: evaluate.py writes
    its files aside and swaps them in when all are written, so the earlier call's stay as they were (they used to be
    deleted before anything was evaluated, the folder left with half of the new call's files)."""
    again = [run["checkpoints"][-1], "--baseline", TINY, "--judge", judge]
    evaluate_quietly(*again, monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    files = lambda: {p.name: p.read_bytes() for p in (tmp_path / "eval").iterdir() if p.is_file()}  # noqa: E731
    earlier = files()
    assert "results.json" in earlier and "scored_rows.json" in earlier

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "evaluate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_quietly(*again, "--overwrite", "--seed", "1", monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    assert files() == earlier


def test_a_file_of_several_pairs_per_prompt_is_scored_on_prompts_the_run_never_trained_on(judge, monkeypatch,
                                                                                           tmp_path):
    data = rows_per_prompt(tmp_path / "two.jsonl", 2, prompts=24)  # by row, every held-out prompt was trained on
    status, log = train_py("--model", TINY, "--dataset", data, "--eval_pairs", 8, "--batch_size", 4,
                           "--micro_batch_size", 2, "--max_steps", 1, "--out_dir", tmp_path / "run")
    assert status == 0, log[-3000:]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        _, scored, _ = run_evaluate(tmp_path / "run" / "step_000001", "--baseline", TINY, "--judge", judge,
                                    monkeypatch=monkeypatch, out_dir=tmp_path / "eval")
    train_rows, held = load_splits(data, 8, **quiet)
    assert sorted(scored["sampled"]) == sorted({r["prompt"] for r in held}) and len(scored["sampled"]) == 4
    assert not set(scored["sampled"]) & {r["prompt"] for r in train_rows}
