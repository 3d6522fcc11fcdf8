"""train.py end to end, as a user runs it: every method, resume, and DDP with 2 processes (gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS, ROOT, TINY

TINY_RUN = ["--model", TINY, "--dataset", PAIRS, "--eval_pairs", "8", "--batch_size", "4", "--micro_batch_size", "2",
            "--log_interval", "1", "--eval_interval", "2", "--max_length", "64", "--max_prompt_length", "48",
            "--lr", "1e-3", "--warmup_steps", "0"]


def train(out_dir, *flags, nproc=1):
    torchrun = nproc > 1 or "--fsdp" in flags
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if torchrun else [sys.executable]
    result = subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *TINY_RUN, "--out_dir", str(out_dir), *flags],
                            capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))], result.stdout + result.stderr


def weights(ckpt):
    policy = load_file(os.path.join(ckpt, "policy", "model.safetensors"))
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    return policy, state["reference"]


@pytest.mark.parametrize("method", ["sft", "dpo", "ipo", "kto", "tr_dpo", "tr_ipo", "tr_kto"])
def test_every_method_trains_a_few_steps(method, tmp_path):
    flags = ["--max_steps", "3"] + (["--tau", "2"] if method.startswith("tr_") else [])
    records, _ = train(tmp_path, "--method", method, *flags)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if method.startswith("tr_"):
        assert records[-1]["ref_updates"] == 1
    if method != "sft":
        assert records[0]["loss"] == pytest.approx({"dpo": 0.693147, "ipo": (1 / 0.2) ** 2, "kto": 0.5}[
            method.removeprefix("tr_")], rel=1e-4)  # step 1: policy == reference


def test_resume_continues_with_moved_reference(tmp_path):
    tr = ["--method", "tr_dpo", "--alpha", "0.5", "--tau", "1"]  # the reference moves every step
    straight, _ = train(tmp_path / "straight", *tr, "--max_steps", "4")
    first, _ = train(tmp_path / "halves", *tr, "--max_steps", "2")
    second, log = train(tmp_path / "halves", *tr, "--max_steps", "4", "--resume")
    assert "resuming from" in log and "step_000002" in log
    assert [r["loss"] for r in second] == [r["loss"] for r in straight]  # bit-exact on CPU, step by step
    policy_a, reference_a = weights(tmp_path / "straight" / "step_000004")
    policy_b, reference_b = weights(tmp_path / "halves" / "step_000004")
    assert all(torch.equal(policy_a[k], policy_b[k]) for k in policy_a)
    assert all(torch.equal(reference_a[k], reference_b[k]) for k in reference_a)
    sft = load_file(os.path.join(tmp_path / "halves" / "step_000002" / "policy" / "model.safetensors"))
    assert not torch.equal(reference_b["model.embed_tokens.weight"], sft["model.embed_tokens.weight"])


@pytest.mark.parametrize("grouping", [[], ["--group_by_length"]])
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(grouping, tmp_path):
    tr = ["--method", "tr_dpo", "--alpha", "0.5", "--tau", "1", "--max_steps", "3", *grouping]
    one, _ = train(tmp_path / "one", *tr)
    two, log = train(tmp_path / "two", *tr, nproc=2)  # 2 ranks x micro-batch 2, no accumulation
    assert "identical on all 2 ranks" in log  # policy and reference bitwise equal across ranks (sha256)
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "drift/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    policy_one, ref_one = weights(tmp_path / "one" / "step_000003")
    policy_two, ref_two = weights(tmp_path / "two" / "step_000003")
    # all-reduce sums gradients in another order than one process: Adam can turn that rounding into ~1e-6 (lr 1e-3)
    assert all(torch.allclose(policy_one[k], policy_two[k], atol=1e-5) for k in policy_one)
    assert all(torch.allclose(ref_one[k], ref_two[k], atol=1e-5) for k in ref_one)


@pytest.mark.parametrize("flags, message", [
    (["--method", "dpo", "--tau", "4"], "only the TR methods"),
    (["--method", "tr_dpo", "--alpha", "1.5"], "must lie in [0, 1]"),
    (["--method", "tr_dpo", "--tau", "0"], "must be at least 1"),
    (["--beta", "0"], "must be positive"),
    (["--batch_size", "6", "--micro_batch_size", "4"], "must be a multiple"),
    (["--method", "orpo"], "invalid choice"),
])
def test_bad_flags_are_refused_before_any_model_loads(flags, message):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *flags], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr


def test_fsdp2_run_resumed_on_another_number_of_processes_matches_one_plain_process(tmp_path):
    tr = ["--method", "tr_dpo", "--alpha", "0.5", "--tau", "1"]  # the sharded reference moves every step
    plain, _ = train(tmp_path / "plain", *tr, "--max_steps", "4")
    train(tmp_path / "fsdp", *tr, "--max_steps", "2", "--fsdp", nproc=2)  # 2 ranks, each with half of every tensor
    resumed, log = train(tmp_path / "fsdp", *tr, "--max_steps", "4", "--fsdp", "--resume", nproc=1)  # re-sharded
    assert "resuming from" in log
    for a, b in zip(plain, resumed):
        for key in ("loss", "rewards/margins", "drift/chosen", "drift/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    policy_plain, _ = weights(tmp_path / "plain" / "step_000004")
    policy_fsdp = load_file(os.path.join(tmp_path / "fsdp" / "step_000004" / "policy" / "model.safetensors"))
    # reduce-scatter sums in another order than one process: Adam can turn that rounding into ~1e-6 (1/1000 of a step)
    assert all(torch.allclose(policy_plain[k], policy_fsdp[k], atol=1e-5) for k in policy_plain)
