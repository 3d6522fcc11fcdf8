"""Things are the same by what they are (identity.py): a prompt by its conversation, whatever its JSON spelling; a
model by a fingerprint of its weights and tokenizer, whatever its path; a study configuration by its parsed flags,
whatever its words. Each test compares with what the model sees (rendered token ids) or with train.py's own parser."""
import argparse
import copy
import functools
import glob
import json
import os
import sys
import types

import pytest

import evaluate
import study
from conftest import ROOT, TINY
from data import render
from guards import UserError
from identity import configuration, model_fingerprint
from sources import load_splits
from test_flags import parser_of

quiet = {"log": lambda message: None}


def as_text_and_as_a_message(path, prompts=64, pairs=2):
    """A JSONL file of two sources merged: each prompt once as text (TRL's "standard" format) and once as a
    one-message list (its "conversational" format), each with its pairs."""
    rows = []
    for p in range(prompts):
        text = f"What is {p} times {p + 3}?"
        for k in range(pairs):
            rows += [{"prompt": text, "chosen": str(p * (p + 3)), "rejected": str(p * (p + 3) + k + 1)},
                     {"prompt": [{"role": "user", "content": text}], "chosen": str(p * (p + 3)),
                      "rejected": str(p * (p + 3) - k - 1)}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def rendered(tokenizer, rows):
    return {tuple(render(tokenizer, r["prompt"])) for r in rows}


def test_a_prompt_written_as_text_and_as_one_message_is_held_out_whole(chat_tokenizer, tmp_path):
    train, held = load_splits(as_text_and_as_a_message(tmp_path / "merged.jsonl"), 64, **quiet)
    trained = rendered(chat_tokenizer, train)
    leaked = [r for r in held if tuple(render(chat_tokenizer, r["prompt"])) in trained]
    assert len(held) == 64 and not leaked, f"{len(leaked)} of {len(held)} held-out rows render as a training row"


def test_evaluate_never_samples_a_prompt_trained_on_in_another_spelling(chat_tokenizer):
    train_rows = [{"prompt": "What is 2 + 2?"}, {"prompt": [{"role": "user", "content": "Name a colour."}]}]
    test_rows = [{"prompt": [{"role": "user", "content": "What is 2 + 2?"}]}, {"prompt": "Name a colour. "},
                 {"prompt": "What is 3 + 3?"}]
    prompts, _ = evaluate.prompts_to_sample("x.jsonl", test_rows, train_rows, lambda m: None)
    assert not rendered(chat_tokenizer, [{"prompt": p} for p in prompts]) & rendered(chat_tokenizer, train_rows)
    assert prompts == ["What is 3 + 3?"]


def test_prompts_from_another_file_leave_out_every_prompt_the_runs_trained_on_and_say_how_many(chat_tokenizer,
                                                                                                tmp_path):
    run_file = tmp_path / "run.jsonl"  # what the runs trained on, holding out 8 of its 40 prompts
    run_file.write_text("".join(json.dumps({"prompt": f"What is {p} + {p}?", "chosen": str(2 * p),
                                            "rejected": str(2 * p + 1)}) + "\n" for p in range(40)))
    superset = tmp_path / "superset.jsonl"  # an edited copy: the same rows and 10 new ones
    superset.write_text(open(run_file).read() + "".join(json.dumps({"prompt": f"What is {p} - 1?", "chosen": str(p - 1),
                                                                    "rejected": str(p)}) + "\n" for p in range(10)))
    data = {"dataset": str(run_file), "eval_pairs": 8, "skip_bad_rows": False, "data_dir": None}
    args, said = types.SimpleNamespace(n_prompts=40, n_pairs=0, data_dir=None), []
    test_rows, train_rows = evaluate.rows_to_score(str(superset), data, {}, args, said.append)
    prompts, _ = evaluate.prompts_to_sample(str(superset), test_rows, train_rows, said.append)
    trained, _ = load_splits(str(run_file), 8, **quiet)  # what train.py trained on, by its own split
    assert not rendered(chat_tokenizer, [{"prompt": p} for p in prompts]) & rendered(chat_tokenizer, trained)
    assert len(prompts) == 18  # the 8 held out and the 10 new: every prompt no run trained on
    assert "left out 32 of the 50 good rows drawn: their prompt is trained on" in " ".join(said)


@functools.cache
def tiny_tokenizer():
    from model import load_tokenizer
    return load_tokenizer(TINY, log=lambda m: None)


def saved_model(folder, seed=0, chat_template=True):
    """A tiny model folder (tests/tiny_llama.json's weights drawn with `seed`) with the default tokenizer, or that
    tokenizer without its chat template (as a plain model's)."""
    from model import load_model
    load_model(TINY, seed=seed).save_pretrained(folder)
    tokenizer = copy.deepcopy(tiny_tokenizer())
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    for template in ([] if chat_template else glob.glob(os.path.join(folder, "chat_template.*"))):
        os.remove(template)
    return str(folder)


def test_a_model_fingerprint_follows_the_weights_not_the_path(tmp_path):
    folder = saved_model(tmp_path / "sft")
    first = model_fingerprint(folder)
    assert model_fingerprint(saved_model(tmp_path / "sft")) == first  # the same weights written again
    assert model_fingerprint(saved_model(tmp_path / "copy")) == first  # elsewhere
    assert model_fingerprint(saved_model(tmp_path / "sft", seed=1)) != first  # other weights, the same path
    assert model_fingerprint(saved_model(tmp_path / "sft", chat_template=False)) != first  # another template
    assert model_fingerprint(TINY, seed=0) != model_fingerprint(TINY, seed=1)  # a config's random weights


def test_the_baseline_must_be_the_model_each_run_started_from_by_content(tmp_path):
    a, b = saved_model(tmp_path / "a"), saved_model(tmp_path / "b", seed=1)
    runs = {"run_a/step_1": {"model": a, "model_sha256": model_fingerprint(a)},
            "run_b/step_1": {"model": b, "model_sha256": model_fingerprint(b)}}
    with pytest.raises(UserError, match="run_b/step_1's run started from other weights"):
        evaluate.starting_model(runs, a)  # two starting models: the baseline is only one of them
    assert evaluate.starting_model({"run_a/step_1": runs["run_a/step_1"]}, a) == a
    saved_model(tmp_path / "a", seed=2)  # the SFT folder written again since the run started
    with pytest.raises(UserError, match="run_a/step_1's run started from other weights"):
        evaluate.starting_model({"run_a/step_1": runs["run_a/step_1"]}, None)


@pytest.mark.slow  # samples from two tiny models
def test_a_checkpoint_whose_tokenizer_renders_the_prompts_otherwise_is_refused(tmp_path, monkeypatch):
    sft, plain = saved_model(tmp_path / "sft"), saved_model(tmp_path / "plain", chat_template=False)
    monkeypatch.setattr(sys, "argv", ["evaluate.py", plain, "--baseline", sft, "--n_prompts", "2", "--n_pairs", "0",
                                      "--max_new_tokens", "2", "--out_dir", str(tmp_path / "eval")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    with pytest.raises(UserError, match=f"{plain} renders the prompts otherwise than the --baseline"):
        evaluate.main()


# ----------------------------------------------------------------------------------------------------------------
# a study configuration: its parsed flags

STUDY_CONFIGS = {  # configurations whose results exist or are being made, and their files' names
    "--method dpo": "dpo", "--method tr_dpo --tau 16": "tr_dpo-tau16", "--method tr_dpo --alpha 0.1": "tr_dpo-alpha0.1",
    "--method dpo --beta 0.025 --save_interval 16": "dpo-beta0.025-save_interval16",
    "--method tr_ipo --tau 16": "tr_ipo-tau16", "--method ipo --beta 0.025 --save_interval 16":
    "ipo-beta0.025-save_interval16"}


def test_the_studys_result_files_keep_their_names():
    committed = glob.glob(os.path.join(ROOT, "results", "study", "*.json"))
    assert committed
    for path in committed:
        r = json.load(open(path))
        assert os.path.basename(path) == f"{study.name(r['config'])}-seed{r['seed']}.json"
    for config, name in STUDY_CONFIGS.items():
        assert study.name(config) == name


def test_every_flag_of_train_py_is_read_as_its_parser_reads_it():
    """configuration() reads words after a flag as its value: true of train.py's parser as long as it takes no
    positional argument and every flag at most one word; a store_true flag changes the configuration's name."""
    parser = parser_of("train.py")
    flags = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    assert all(a.option_strings for a in flags), "a positional argument: configuration() must know which is which"
    assert all(a.nargs in (None, 0, "?") for a in flags), [a.dest for a in flags if a.nargs not in (None, 0, "?")]
    for a in flags:
        value = None if a.nargs == 0 else str(a.choices[-1] if a.choices else a.default or 2)
        config = f"{a.option_strings[0]}{'' if value is None else ' ' + value} --method dpo"
        assert configuration(config) == {a.dest: True if value is None else value, "method": "dpo"}, config
        if a.dest != "method":
            assert study.name(config) != study.name("--method dpo"), config
    assert configuration("--method tr_dpo --tau=16") == configuration("--tau 16 --method tr_dpo")
    assert study.name("--method ipo --ipo_average") != study.name("--method ipo")


def test_a_result_is_reused_only_for_the_configuration_it_records(tmp_path):
    result = tmp_path / f"{study.name('--method tr_dpo --tau 16')}-seed0.json"
    assert not study.recorded(str(result), "--method tr_dpo --tau 16")
    result.write_text(json.dumps({"config": "--method tr_dpo --tau=16"}))  # the same configuration, spelt otherwise
    assert study.recorded(str(result), "--tau 16 --method tr_dpo")
    result.write_text(json.dumps({"config": "--method tr_dpo --tau1 6"}))  # another, under the same name
    with pytest.raises(UserError, match="holds the results of configuration '--method tr_dpo --tau1 6'"):
        study.recorded(str(result), "--method tr_dpo --tau 16")


def test_a_study_reads_its_results_as_the_same_configurations_however_they_are_spelt(tmp_path, monkeypatch, capsys):
    """Files made with `--tau 16` and `--max_steps 2 --lr 1e-3` are this command's `--tau=16` and `--lr 1e-3
    --max_steps 2`: reused, and aggregated under the command's spelling, not as another configuration."""
    folder = tmp_path / "study"
    folder.mkdir()
    for config in ("--method dpo", "--method tr_dpo --tau 16"):
        records = [{"config": config, "seed": 0, "step": step, "gold": 0.5, "win_rate": 0.5, "kl": float(step),
                    "mean_length": 9.0, "baseline_gold": 0.4} for step in (1, 2)]
        (folder / f"{study.name(config)}-seed0.json").write_text(json.dumps({
            "config": config, "seed": 0, "train": "--max_steps 2 --lr 1e-3", "evaluate": "--n_prompts 4",
            "records": records, "wall_s": {"train": 1.0, "evaluate": 1.0}}))
    configs = ["--method dpo", "--method tr_dpo --tau=16"]
    monkeypatch.setattr(sys, "argv", ["study.py", "--configs", *configs, "--seeds", "0", "--train=--lr 1e-3 "
                                      "--max_steps 2", "--evaluate=--n_prompts=4", "--work", str(tmp_path / "work"),
                                      "--out", str(tmp_path / "study.json")])
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    study.main()
    assert capsys.readouterr().out.count("skipped") == 2
    assert {r["config"] for r in json.load(open(tmp_path / "study.json"))} == set(configs)
