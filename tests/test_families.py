"""The model families users bring, each on a paper data set from an offline copy in the hub layout, as a user runs
them: train.py for two steps (step 1: policy == reference, so the DPO loss is exactly log 2, with every dropout off),
then sampling as evaluate.py does it, which stops at the token training ends every completion with."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from data import render, tokenize
from sources import load_splits
from evaluate import load_checkpoint, sample, stop_ids
from families import END_OF_TEXT, ENDOFTEXT, EOT_ID, IM_END, save_family
from hub_layout import write_hh, write_tldr, write_ultrafeedback
from test_evaluate import draw_by_hand

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not

# family: (data set, extra flags, the ids a sample stops at, the id every training completion ends with)
FAMILIES = {
    "pythia": ("hh", [], {0}, 0),  # EOS id 0, no template: HH dialogues as written
    "gpt2": ("tldr", ["--grad_ckpt"], {0}, 0),  # train mode for checkpointing: dropout 0.1 in its config must be off
    "llama": ("ultrafeedback", [], {EOT_ID, END_OF_TEXT}, EOT_ID),  # Llama-3's template: turns end with <|eot_id|>
    "qwen2": ("hh", [], {IM_END, ENDOFTEXT}, IM_END),  # ChatML; its generation_config has a repetition penalty
}
WRITE = {"hh": write_hh, "tldr": write_tldr, "ultrafeedback": write_ultrafeedback}


@pytest.fixture(scope="module")
def world(tmp_path_factory, chat_tokenizer):
    """Model folders of the four families and offline copies of the three data sets."""
    root = tmp_path_factory.mktemp("families")
    models = {f: save_family(f, chat_tokenizer, root / f) for f in FAMILIES}
    copies = {name: write(root / name) for name, write in WRITE.items()}
    return models, copies


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    """Each family trained two steps by train.py: {family: (metrics records, log, output folder)}. The four runs
    start together (each spends most of its time importing): a third less wall-clock on 2 cores."""
    models, copies = world
    started = {}
    for family, (dataset, flags, _, _) in FAMILIES.items():
        out = tmp_path_factory.mktemp(f"run-{family}")
        started[family] = out, subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "train.py"), "--model", str(models[family]), "--dataset", dataset,
             "--data_dir", copies[dataset], "--method", "tr_dpo", "--eval_pairs", "2", "--batch_size", "4",
             "--micro_batch_size", "2", "--max_steps", "2", "--log_interval", "1", "--eval_interval", "2",
             "--max_length", "64", "--max_prompt_length", "48", "--lr", "1e-3", "--warmup_steps", "0",
             "--out_dir", str(out), *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    runs = {}
    for family, (out, process) in started.items():
        log = process.communicate(timeout=600)[0]
        assert process.returncode == 0, (family, log[-3000:])
        runs[family] = [json.loads(line) for line in open(out / "metrics.jsonl")], log, out
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_trains_from_a_loss_of_exactly_log_2(family, world, trained):
    config = json.load(open(world[0][family] / "config.json"))
    assert config["model_type"] == {"pythia": "gpt_neox"}.get(family, family)
    if family == "gpt2":  # the rates GPT-2 ships, under names without "dropout"; with them on, step 1 gives 0.6919
        assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == 0.1
    records, log, _ = trained[family]
    assert [r["step"] for r in records] == [1, 2]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # no dropout, policy == reference at step 1
    assert math.isfinite(records[1]["loss"]) and math.isfinite(records[1]["drift/chosen"])
    assert "bad row(s) of" in log and "skipped" in log  # the dirty rows of every hub copy did not stop the run
    assert ("end of turn '<|eot_id|>', not with its EOS '<|end_of_text|>'" in log) == (family == "llama")


@pytest.mark.parametrize("family", FAMILIES)
def test_each_familys_samples_stop_at_the_token_its_training_completions_end_with(family, world, trained):
    models, copies = world
    dataset, _, expected_stops, end = FAMILIES[family]
    model, tokenizer = load_checkpoint(str(trained[family][2] / "step_000002"))  # as evaluate.py loads it
    assert stop_ids(tokenizer, model) == expected_stops
    rows, held = load_splits(dataset, 2, data_dir=copies[dataset], log=lambda m: None)
    examples = tokenize(rows, tokenizer, 64, 48, log=lambda m: None)
    assert all(e["chosen"][-1] == end for e in examples if len(e["prompt"]) + len(e["chosen"]) < 64)
    prompts = [render(tokenizer, r["prompt"]) for r in held] * 4
    # a random model rarely says `end`: raise its logit, so that about a third of the draws at each step end there
    boost = torch.zeros(model.get_output_embeddings().out_features)
    boost[end] = 10.0
    hook = model.get_output_embeddings().register_forward_hook(lambda module, inputs, logits: logits + boost)
    samples = sample(model, prompts, stop_ids(tokenizer, model), 1.0, 8, 8, 0, "cpu")
    hook.remove()
    assert all(not set(s[:-1]) & expected_stops for s in samples)  # nothing after a stop token
    stopped = [s for s in samples if len(s) < 8]
    assert stopped and all(s[-1] == end for s in stopped)  # cut at `end`, which is kept, as in training
    assert all(len(s) == 8 or s[-1] in expected_stops for s in samples)


@pytest.mark.parametrize("family", FAMILIES)
def test_left_padding_and_the_cache_draw_what_a_full_recompute_draws_in_each_family(family, world):
    model, tokenizer = load_checkpoint(str(world[0][family]))
    prompts = [render(tokenizer, "Hi"), render(tokenizer, "Tell me about the sea, please, in a few words."),
               render(tokenizer, "What is 2 + 2?")]
    assert sample(model, prompts, stop_ids(tokenizer, model), 1.0, 5, 3, 3, "cpu") == \
        draw_by_hand(model, prompts, stop_ids(tokenizer, model), 5, 3)


def test_evaluate_py_runs_on_a_qwen_checkpoint_with_its_generation_config(world, trained, tmp_path):
    checkpoint = trained["qwen2"][2] / "step_000002"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), str(checkpoint), "--baseline",
                             str(world[0]["qwen2"]), "--n_prompts", "3", "--n_pairs", "2", "--max_new_tokens", "4",
                             "--batch_size", "4", "--out_dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    r = json.load(open(tmp_path / "results.json"))[-1]
    assert 1 <= r["mean_length"] <= 4 and math.isfinite(r["kl_seq"]) and r["checkpoint"] == str(checkpoint)
