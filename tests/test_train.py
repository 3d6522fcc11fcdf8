"""train.py end to end, as a user runs it: every method, resume, and DDP with 2 processes (gloo on CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import PAIRS, ROOT, TINY, train_py
from losses import METHODS
from ref_update import Rule

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not

TINY_RUN = ["--model", TINY, "--dataset", PAIRS, "--eval_pairs", "8", "--batch_size", "4", "--micro_batch_size", "2",
            "--log_interval", "1", "--eval_interval", "2", "--max_length", "64", "--max_prompt_length", "48",
            "--lr", "1e-3", "--warmup_steps", "0"]


def train(out_dir, *flags, nproc=1):
    """(metrics records, log) of a successful train.py run on the tiny model: under torchrun for several processes
    or --fsdp, else in this process (conftest.train_py)."""
    if nproc > 1 or "--fsdp" in flags:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                 f"--nproc_per_node={nproc}", os.path.join(ROOT, "train.py"), *TINY_RUN, "--out_dir",
                                 str(out_dir), *flags], capture_output=True, text=True, cwd=ROOT, timeout=600)
        status, log = result.returncode, result.stdout + result.stderr
    else:
        status, log = train_py(*TINY_RUN, "--out_dir", out_dir, *flags)
    assert status == 0, log[-6000:]
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))], log


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """shared(*flags, nproc=1) -> (records, log, out_dir): a run that several tests read, made once per module.
    Tests must not write into its folder; a test that resumes or overwrites trains into its own tmp_path."""
    done = {}

    def get(*flags, nproc=1):
        if (flags, nproc) not in done:
            out = tmp_path_factory.mktemp("shared")
            done[flags, nproc] = (*train(out, *flags, nproc=nproc), out)
        return done[flags, nproc]
    return get


TR_EVERY_STEP = ("--method", "tr_dpo", "--alpha", "0.5", "--tau", "1")  # a reference that moves every step


def weights(ckpt):
    policy = load_file(os.path.join(ckpt, "policy", "model.safetensors"))
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    return policy, state["reference"]


ALL_METHODS = ["sft", *METHODS, *(f"tr_{m}" for m in METHODS)]  # as train.py's --method offers them
TR_METHODS = [m for m in ALL_METHODS if m.startswith("tr_")]


@pytest.mark.parametrize("method", ALL_METHODS)
def test_every_method_trains_a_few_steps(method, tmp_path):
    flags = ["--max_steps", "3"] + (["--tau", "2"] if method.startswith("tr_") else [])
    records, _ = train(tmp_path, "--method", method, *flags)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    if method.startswith("tr_"):
        assert records[-1]["ref_updates"] == 1
    if method != "sft":
        assert records[0]["loss"] == pytest.approx({"dpo": 0.693147, "ipo": (1 / 0.2) ** 2, "kto": 0.5}.get(
            method.removeprefix("tr_"), records[0]["loss"]), rel=1e-4)  # step 1: policy == reference


def test_a_losss_own_flag_reaches_the_loss(tmp_path):
    """--label_smoothing eps: at step 1, where policy == reference (h = 0), the cDPO loss is log 2 whatever eps, and
    its gradient dL/dh = -(1 - eps) beta sigmoid(-beta h) + eps beta sigmoid(beta h) = beta (2 eps - 1) / 2: the
    gradient (its norm before clipping) is (1 - 2 eps) times plain DPO's."""
    plain, _ = train(tmp_path / "plain", "--method", "dpo", "--max_steps", "1")
    smoothed, _ = train(tmp_path / "eps", "--method", "dpo", "--label_smoothing", "0.25", "--max_steps", "1")
    assert smoothed[0]["loss"] == pytest.approx(0.693147, rel=1e-5)
    assert smoothed[0]["grad_norm"] == pytest.approx(0.5 * plain[0]["grad_norm"], rel=1e-4)


def test_resume_continues_with_moved_reference(tmp_path, shared):
    straight, _, straight_dir = shared(*TR_EVERY_STEP, "--max_steps", "4")
    first, _ = train(tmp_path / "halves", *TR_EVERY_STEP, "--max_steps", "2")
    second, log = train(tmp_path / "halves", *TR_EVERY_STEP, "--max_steps", "4", "--resume")
    assert "resuming from" in log and "step_000002" in log
    assert [r["loss"] for r in second] == [r["loss"] for r in straight]  # bit-exact on CPU, step by step
    policy_a, reference_a = weights(straight_dir / "step_000004")
    policy_b, reference_b = weights(tmp_path / "halves" / "step_000004")
    assert all(torch.equal(policy_a[k], policy_b[k]) for k in policy_a)
    assert all(torch.equal(reference_a[k], reference_b[k]) for k in reference_a)
    sft = load_file(os.path.join(tmp_path / "halves" / "step_000002" / "policy" / "model.safetensors"))
    assert not torch.equal(reference_b["model.embed_tokens.weight"], sft["model.embed_tokens.weight"])


@pytest.mark.parametrize("grouping", [(), ("--group_by_length",)])
def test_ddp_two_processes_match_one_process_with_the_same_global_batch(grouping, shared):
    tr = (*TR_EVERY_STEP, "--max_steps", "4", *grouping)
    one, _, one_dir = shared(*tr)
    two, log, two_dir = shared(*tr, nproc=2)  # 2 ranks x micro-batch 2, no accumulation
    assert "identical on all 2 ranks" in log  # policy and reference bitwise equal across ranks (sha256)
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "rewards/accuracies", "drift/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), key
    policy_one, ref_one = weights(one_dir / "step_000004")
    policy_two, ref_two = weights(two_dir / "step_000004")
    # all-reduce sums gradients in another order than one process: Adam can turn that rounding into ~1e-6 (lr 1e-3)
    assert all(torch.allclose(policy_one[k], policy_two[k], atol=1e-5) for k in policy_one)
    assert all(torch.allclose(ref_one[k], ref_two[k], atol=1e-5) for k in ref_one)


def test_a_ddp_run_resumed_on_one_process_continues_as_one_process_would(tmp_path, shared):
    plain, _, plain_dir = shared(*TR_EVERY_STEP, "--max_steps", "4")
    train(tmp_path, *TR_EVERY_STEP, "--max_steps", "2", nproc=2)  # 2 ranks x 2 pairs
    resumed, log = train(tmp_path, *TR_EVERY_STEP, "--max_steps", "4", "--resume")  # 1 process x 2 micro-batches
    assert "resuming from" in log and [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(plain, resumed):
        for key in ("loss", "rewards/margins", "drift/chosen"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    _, final = weights(tmp_path / "step_000004")
    _, expected = weights(plain_dir / "step_000004")
    assert all(torch.allclose(final[k], expected[k], atol=1e-5) for k in expected)


@pytest.mark.parametrize("flags, message", [
    (["--method", "dpo", "--tau", "4"], "only the TR methods"),
    (["--method", "sft", "--alpha", "0.5"], f"only the TR methods do ({', '.join(TR_METHODS)}), not --method sft"),
    (["--method", "tr_dpo", "--alpha", "1.5"], "argument --alpha: 1.5 must be in [0, 1]"),
    (["--method", "tr_dpo", "--tau", "0"], "argument --tau: 0 must be at least 1"),
    (["--beta", "0"], "argument --beta: 0 must be positive"),
    (["--batch_size", "6", "--micro_batch_size", "4"], "must be a multiple"),
    (["--method", "orpo"], "invalid choice"),
    (["--method", "tr_ipo", "--label_smoothing", "0.1"], "--label_smoothing is an option of --method dpo and tr_dpo"),
    (["--method", "dpo", "--label_smoothing", "0.5"], "argument --label_smoothing: 0.5 must be in [0, 0.5)"),
    (["--max_prompt_length", "64"], "--max_prompt_length 64 must be less than --max_length 64"),
])
def test_bad_flags_are_refused_before_any_model_loads(flags, message, tmp_path):
    """On the tiny model with --max_steps: a guard that stops refusing fails in seconds, not after an epoch."""
    status, log = train_py(*TINY_RUN, "--max_steps", "1", "--out_dir", tmp_path, *flags)
    assert status == 2 and message in log and "Traceback" not in log and "note:" not in log  # nothing loaded


def test_fsdp2_run_resumed_on_another_number_of_processes_matches_one_plain_process(tmp_path, shared):
    plain, _, plain_dir = shared(*TR_EVERY_STEP, "--max_steps", "4")  # the sharded reference moves every step
    train(tmp_path, *TR_EVERY_STEP, "--max_steps", "2", "--fsdp", nproc=2)  # 2 ranks, each with half of every tensor
    resumed, log = train(tmp_path, *TR_EVERY_STEP, "--max_steps", "4", "--fsdp", "--resume", nproc=1)  # re-sharded
    assert "resuming from" in log
    for a, b in zip(plain, resumed):
        for key in ("loss", "rewards/margins", "drift/chosen", "drift/rejected"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (a["step"], key)
    policy_plain, _ = weights(plain_dir / "step_000004")
    policy_fsdp = load_file(os.path.join(tmp_path / "step_000004" / "policy" / "model.safetensors"))
    # reduce-scatter sums in another order than one process: Adam can turn that rounding into ~1e-6 (1/1000 of a step)
    assert all(torch.allclose(policy_plain[k], policy_fsdp[k], atol=1e-5) for k in policy_plain)


# ---------------------------------------------------------------------------------------------------------------
# what a new user meets: the defaults, the rule the flags choose, one run per folder, the schedule, the summary


def test_without_max_steps_a_run_is_one_epoch_and_its_summary_says_what_happened_and_what_next(tmp_path):
    records, log = train(tmp_path, "--method", "tr_dpo", "--tau", "3", "--log_interval", "4")  # 33 pairs / 4 = 8
    assert records[-1]["step"] == 8 and records[-1]["ref_updates"] == 2
    assert "step 3: reference updated: a copy" in log and "step 6: reference updated: a copy" in log
    assert f"done: 8 steps, 2 reference update(s) (hard update: reference <- policy every 3 steps); checkpoint " \
           f"{tmp_path / 'step_000008'}" in log
    assert "held-out pairs (8): reward accuracy" in log
    assert f"python plot.py {tmp_path}" in log and f"python evaluate.py {tmp_path}/step_*" in log


@pytest.mark.parametrize("flags, rule, alpha, tau, updates", [
    (["--alpha", "0.5"], "soft update every step: reference <- 0.5 policy + 0.5 reference", 0.5, 1, [1, 2, 3, 4]),
    (["--tau", "2"], "hard update: reference <- policy every 2 steps", 1, 2, [0, 1, 1, 2]),
    (["--alpha", "0.5", "--tau", "2"], "reference <- 0.5 policy + 0.5 reference every 2 steps", 0.5, 2, [0, 1, 1, 2]),
    ([], "hard update: reference <- policy every 16 steps", 1, 16, [0, 0, 0, 0]),
])
def test_alpha_alone_is_the_soft_update_every_step_and_tau_alone_the_hard_copy(flags, rule, alpha, tau, updates,
                                                                               shared):
    records, log, out = shared("--method", "tr_dpo", "--max_steps", "4", *flags)
    assert rule in log and [r["ref_updates"] for r in records] == updates
    run = json.load(open(out / "args.json"))  # the rule in force, for plot.py and evaluate.py
    assert (run["alpha"], run["tau"]) == (alpha, tau)


@pytest.mark.parametrize("alpha, tau, rule", [
    (0.6, None, Rule(alpha=0.6, tau=1)),  # --alpha alone: the soft update, every step
    (None, 512, Rule(alpha=1.0, tau=512)),  # --tau alone: the paper's hard update, a copy
    (0.6, 512, Rule(alpha=0.6, tau=512)),  # both: TRL's reading, a mix every tau steps
    (None, None, Rule(alpha=1.0, tau=16)),  # neither: a copy every 16 steps, sized for the demo
])
def test_rule_of_flags_reads_alpha_and_tau_as_the_readme_says(alpha, tau, rule):  # the readings, without a run
    got = Rule.of_flags(alpha, tau)
    assert got == rule, f"--alpha {alpha} --tau {tau}: expected {rule!r}, got {got!r}"


VANILLA_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "grad_norm", "lr", "eval/rewards/accuracies", "eval/rewards/margins",
                "drift/chosen", "drift/rejected")


@pytest.mark.parametrize("flags", [["--alpha", "0"], ["--tau", "100"]])
def test_tr_with_alpha_zero_or_a_run_shorter_than_tau_is_exactly_vanilla_dpo(flags, shared):
    vanilla, _, _ = shared("--method", "dpo", "--max_steps", "4")
    tr, log, _ = shared("--method", "tr_dpo", "--max_steps", "4", *flags)
    assert "warning: the reference will never move" in log and "this run is vanilla DPO, not TR-DPO" in log
    for a, b in zip(vanilla, tr):
        assert [a[k] for k in VANILLA_KEYS] == [b[k] for k in VANILLA_KEYS], a["step"]  # bit for bit


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_copy_every_step_starts_every_step_at_loss_log2_with_zero_margins(dtype, tmp_path):
    """alpha 1, tau 1: the reference is always the previous step's policy, so each step's pairs start at h = 0."""
    records, _ = train(tmp_path, "--method", "tr_dpo", "--alpha", "1", "--tau", "1", "--max_steps", "3",
                       "--dtype", dtype)
    log2 = -torch.nn.functional.logsigmoid(torch.tensor(0.0)).item()
    assert all(r["loss"] == log2 and r["rewards/margins"] == 0 and r["rewards/accuracies"] == 0 for r in records)
    assert records[-1]["drift/chosen"] != 0  # and yet the policy moves away from the SFT model


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rates_are_exactly_those_of_transformers_schedules(schedule, tmp_path):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup, \
        get_linear_schedule_with_warmup
    records, _ = train(tmp_path, "--method", "dpo", "--max_steps", "6", "--warmup_steps", "2", "--lr", "1e-3",
                       "--schedule", schedule)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = {"constant": lambda: get_constant_schedule_with_warmup(optimizer, 2),
                 "linear": lambda: get_linear_schedule_with_warmup(optimizer, 2, 6),
                 "cosine": lambda: get_cosine_schedule_with_warmup(optimizer, 2, 6)}[schedule]()
    expected = []
    for _ in range(6):  # the lr each optimizer step uses, then the scheduler steps, as a transformers Trainer does
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_a_fresh_run_refuses_a_folder_that_holds_a_run_and_overwrite_replaces_it(tmp_path):
    train(tmp_path, "--method", "dpo", "--max_steps", "2")
    status, log = train_py(*TINY_RUN, "--method", "dpo", "--max_steps", "2", "--out_dir", tmp_path)
    assert status == 1 and "Traceback" not in log
    assert f"error: {tmp_path} already holds a run" in log and "--resume" in log
    (tmp_path / "curves.png").write_bytes(b"the old run's curves")  # what plot.py wrote for the old run
    (tmp_path / "wandb").mkdir()
    records, _ = train(tmp_path, "--method", "dpo", "--max_steps", "1", "--overwrite", "--eval_pairs", "4")
    assert [r["step"] for r in records] == [1]  # the old metrics and checkpoints are gone
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000001"]
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "wandb").exists()
    assert json.load(open(tmp_path / "args.json"))["eval_pairs"] == 4  # the new run's, and so is memory.json:
    assert list(json.load(open(tmp_path / "memory.json"))["ranks"][0]) == ["after building the models",
                                                                            "after the first backward of step 1",
                                                                            "after the first step"]


def bad_row_file(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(open(PAIRS).read() + '{"prompt": "x", "chosen": "y"}\n')
    return path


@pytest.mark.parametrize("flags, message", [
    (["--model", "/no/such/dir"], "--model /no/such/dir: no such file or folder"),
    (["--dataset", "demoo"], "--dataset 'demoo': expected demo"),
    (["--dataset", bad_row_file], "bad.jsonl:42: missing field(s)"),
    (["--max_prompt_length", "64"], "--max_prompt_length 64 must be"),  # not below --max_length 64
    (["--batch_size", "64"], "33 training pairs cannot fill one batch of --batch_size 64"),
], ids=["model", "dataset", "bad row", "lengths", "batch"])
def test_overwrite_deletes_nothing_until_every_check_before_training_has_passed(flags, message, tmp_path):
    old = {"args.json": "{}", "metrics.jsonl": '{"step": 1}\n', "memory.json": "{}", "curves.png": "png",
           "step_000002/state.pt": "the old run's checkpoint"}
    for name, text in old.items():
        (tmp_path / "old" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "old" / name).write_text(text)
    flags = [f(tmp_path) if callable(f) else f for f in flags]
    status, log = train_py(*TINY_RUN, *flags, "--overwrite", "--out_dir", tmp_path / "old")
    assert status != 0 and message in log and "Traceback" not in log, log[-3000:]
    assert {name: (tmp_path / "old" / name).read_text() for name in old} == old  # the old run, as it was


def test_resume_refuses_a_checkpoint_of_another_run_and_names_the_difference(tmp_path):
    train(tmp_path, "--method", "dpo", "--max_steps", "1")
    status, log = train_py(*TINY_RUN, "--method", "tr_dpo", "--tau", "2", "--batch_size", "8", "--max_steps", "2",
                           "--resume", "--out_dir", tmp_path)
    assert status == 1 and "Traceback" not in log
    for difference in ("--method 'dpo' in the checkpoint, 'tr_dpo' now", "--batch_size 4 in the checkpoint, 8 now",
                       "--tau None in the checkpoint, 2 now"):
        assert difference in log


def test_the_skipped_step_count_survives_a_resume(tmp_path):
    # lr 1e30: step 1 is finite but throws the weights to ~1e30, so every later step overflows
    flags = ["--lr", "1e30", "--max_steps", "3"]
    _, log = train_py(*TINY_RUN, *flags, "--skip_nonfinite", "1", "--out_dir", tmp_path)
    assert "(1 of at most 1" in log and (tmp_path / "step_000001").exists()
    _, log = train_py(*TINY_RUN, *flags, "--skip_nonfinite", "2", "--resume", "--out_dir", tmp_path)
    assert "(2 of at most 2" in log and "(1 of at most 2" not in log  # the run had skipped 1 step already


def test_eval_pairs_zero_turns_evaluation_off_and_keeps_every_training_pair(tmp_path):
    records, log = train(tmp_path, "--method", "dpo", "--max_steps", "2", "--eval_pairs", "0")
    assert "dpo: 41 pairs" in log  # none held out
    assert not any(k.startswith(("eval/", "drift/")) for k in records[-1])


def test_plot_draws_several_runs_with_the_reference_updates_marked(tmp_path, shared):
    from plot import read_run, reference_updates
    _, _, dpo = shared("--method", "dpo", "--max_steps", "4")
    _, _, hard = shared("--method", "tr_dpo", "--max_steps", "4", "--tau", "2")
    out = subprocess.run([sys.executable, "plot.py", str(dpo), str(hard), "--out", str(tmp_path / "curves.png")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "curves.png").stat().st_size > 10000
    assert reference_updates(read_run(hard)[1]) == [(2, 1.0), (4, 1.0)]  # as the run recorded them
    assert reference_updates(read_run(dpo)[1]) is None  # a vanilla run records none


def float64_mean_logps(model, example, completion):
    """log pi(y|x) / |y| for one pair's completion, token by token in float64, the row alone."""
    ids = torch.tensor([example["prompt"].tolist() + completion.tolist()])
    with torch.no_grad():
        logits = model(ids).logits[0].double()
    start = len(example["prompt"])
    return sum(torch.log_softmax(logits[start + t - 1], -1)[tok].item() for t, tok in enumerate(completion.tolist())
               ) / len(completion)


def test_with_ipo_average_held_out_margins_are_on_training_scale_per_token_means(tmp_path, chat_tokenizer):
    from data import tokenize
    from sources import load_splits
    from model import load_model
    records, _ = train(tmp_path, "--method", "ipo", "--ipo_average", "--max_steps", "1", "--eval_interval", "1")
    policy = load_model(str(tmp_path / "step_000001" / "policy")).double()
    sft = load_model(TINY).double()  # the reference of vanilla IPO: the SFT model, never moved
    held = tokenize(load_splits(PAIRS, 8, log=lambda m: None)[1], chat_tokenizer, 64, 48, log=lambda m: None)
    margins = [(float64_mean_logps(policy, e, e["chosen"]) - float64_mean_logps(sft, e, e["chosen"])) -
               (float64_mean_logps(policy, e, e["rejected"]) - float64_mean_logps(sft, e, e["rejected"])) for e in held]
    # fp32 differences of per-token means ~5 nats apart agree to ~1e-3 relative; summed log-probs would be 2-4 times
    # these margins (the answers are 2-4 tokens long)
    assert records[-1]["eval/rewards/margins"] == pytest.approx(0.1 * sum(margins) / len(margins), rel=1e-2)


def wandb_records(out_dir):
    """The records of the offline W&B runs in out_dir, oldest first, read from their .wandb files."""
    import glob
    return [r for path in sorted(glob.glob(f"{out_dir}/wandb/offline-run-*/run-*.wandb")) for r in wandb_file(path)]


def wandb_file(path):
    """The records of one .wandb file (a LevelDB-style log of protobuf records)."""
    import struct
    from wandb.proto import wandb_internal_pb2
    data = open(path, "rb").read()
    position, records, pending = 7, [], b""  # after the header ":W&B", 2 magic bytes and a version byte
    while position + 7 <= len(data):
        left = 32768 - position % 32768  # records never straddle a 7-byte header across 32 KiB blocks
        crc, length, kind = struct.unpack("<IHB", data[position: position + 7]) if left >= 7 else (0, 0, 0)
        if length == 0 and kind == 0:
            position += left
            continue
        pending += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_max_grad_norm_0_is_no_clipping_as_in_transformers(tmp_path):
    """transformers' Trainer (and so TRL) reads max_grad_norm 0 as no clipping; it scaled every gradient to 0 here
    (a run that logged log 2 and zero drift for hours). Unclipped: the same weights as a bound no gradient reaches."""
    train(tmp_path / "zero", "--max_grad_norm", "0", "--max_steps", "1")
    train(tmp_path / "huge", "--max_grad_norm", "1e9", "--max_steps", "1")
    zero, huge = (weights(tmp_path / run / "step_000001")[0] for run in ("zero", "huge"))
    assert all(torch.equal(zero[k], huge[k]) for k in zero)
    assert any(not torch.equal(zero[k], v.float()) for k, v in model_state(TINY).items() if k in zero)


def model_state(config):
    from model import load_model
    return load_model(config, seed=0).state_dict()


def test_an_interval_of_0_means_only_at_the_end(tmp_path):
    """--log_interval 0: a log line at the first and last step; --eval_interval 0: evaluation at the end only (as
    --save_interval 0 saves only at the end). Both crashed with a ZeroDivisionError after the first step."""
    records, _ = train(tmp_path, "--log_interval", "0", "--eval_interval", "0", "--max_steps", "3")
    assert [(r["step"], r["eval/step"]) for r in records] == [(1, 0), (3, 3)]


def test_wandb_gets_the_run_name_its_arguments_and_every_record_and_a_resume_continues_the_same_run(tmp_path):
    """The W&B run is named after the run's folder, holds its arguments and every logged record; its id is kept with
    the checkpoint, so a resume logs into the run it continues, not a second one."""
    out, env = tmp_path / "tr_run", {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    for flags in (["--max_steps", "1"], ["--max_steps", "2", "--resume"]):  # the constant schedule: more steps allowed
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), *TINY_RUN, *flags, "--wandb",
                                 "trdpo-tests", "--out_dir", str(out)], capture_output=True, text=True, cwd=ROOT,
                                env=env)
        assert result.returncode == 0, result.stderr[-3000:]
    records = wandb_records(out)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert len(runs) == 2 and runs[0].run_id == runs[1].run_id, [r.run_id for r in runs]
    config = {item.key: json.loads(item.value_json) for item in runs[0].config.update}
    assert (runs[0].display_name, runs[0].project, config["method"], config["max_steps"]) == ("tr_run", "trdpo-tests",
                                                                                              "tr_dpo", 1)
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item} for r in records
               if r.WhichOneof("record_type") == "history"]
    keys = ("step", "loss", "rewards/margins")
    assert [tuple(h[k] for k in keys) for h in history if "step" in h] == \
        [tuple(r[k] for k in keys) for r in map(json.loads, open(out / "metrics.jsonl"))]


def float64_nll(model, pairs):
    """(summed NLL of the chosen completions, their token count, per pair), token by token in float64."""
    out = []
    for e in pairs:
        ids = torch.cat([e["prompt"], e["chosen"]]).long()[None]
        logps = torch.log_softmax(model(ids).logits[0].double(), -1)
        start = len(e["prompt"])
        out.append((-sum(logps[start + t - 1, tok] for t, tok in enumerate(e["chosen"].tolist())), len(e["chosen"])))
    return out


@pytest.mark.parametrize("nproc", [1, 2])
def test_the_sft_loss_is_the_mean_nll_over_every_completion_token_of_the_global_batch(nproc, tmp_path,
                                                                                       chat_tokenizer):
    """As transformers and TRL average it: summed NLL / completion tokens of the whole batch (every micro-batch of
    every rank), not a mean of per-sequence means, which weighs a short answer's tokens more."""
    from data import Batches, tokenize
    from model import load_model
    from sources import load_splits
    rows = [json.loads(line) for line in open(PAIRS)]
    for i, row in enumerate(rows):  # answers of 3 to 9 tokens: the pairs' own are all 3
        row["chosen"] += ", I am sure" * (i % 3)
    dataset = tmp_path / "lengths.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    records, _ = train(tmp_path / "run", "--method", "sft", "--max_steps", "1", "--dataset", dataset,
                       nproc=nproc)  # 2 micro-batches or 2 ranks
    train_set = tokenize(load_splits(str(dataset), 8, log=lambda m: None)[0], chat_tokenizer, 64, 48,
                         log=lambda m: None)
    pairs = [pair for pair, _ in Batches(train_set, 4, 4)(0)[0]]  # global batch 0, as one micro-batch
    model = load_model(TINY).double()  # train.py's init (seed 0)
    nll = float64_nll(model, pairs)
    per_token = sum(s for s, _ in nll) / sum(n for _, n in nll)
    per_sequence = sum(s / n for s, n in nll) / len(nll)
    assert abs(per_token - per_sequence).item() > 1e-3  # the answers differ in length: the two means differ
    per_token.backward()
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in model.parameters())).item()
    assert records[0]["loss"] == pytest.approx(per_token.item(), rel=1e-5)
    assert records[0]["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)
