"""--resume continues the very run a checkpoint belongs to, or refuses and says why; a finished run is done.

What may differ on resume is one explicit list (checkpoint.MAY_CHANGE); every other argument of train.py, including
any flag added later, must equal the checkpoint's, and the training pairs themselves are compared by hash. The run's
length may change unless a flag ties the run to it: each such flag says so beside itself (flags.run_length), and a
run that depends on its length without saying so fails here.
"""
import copy
import json
import os
import re
import shutil
import threading

import pytest
import torch

import checkpoint
from conftest import PAIRS, train_py
from guards import UserError
from test_flags import name, parser_of
from test_train import TINY_RUN

pytestmark = pytest.mark.slow  # runs train.py or other scripts: `make test` runs these, `make test-fast` not

FLAGS = [*TINY_RUN, "--method", "tr_dpo", "--tau", "2", "--schedule", "cosine", "--max_steps", "2"]


def run(out_dir, *flags, dataset=PAIRS):
    """(exit status, log) of train.py on the tiny model, the flags above and these, on `dataset`."""
    arguments = [*FLAGS, *flags, "--out_dir", out_dir]
    arguments[arguments.index("--dataset") + 1] = dataset
    return train_py(*arguments)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-step run (cosine schedule) on its own copy of the pairs: (out_dir, dataset)."""
    out = tmp_path_factory.mktemp("finished")
    dataset = out / "pairs.jsonl"
    shutil.copy(PAIRS, dataset)
    status, log = run(out / "run", dataset=dataset)
    assert status == 0, log
    return out / "run", dataset


def help_flags():
    """Every flag train.py offers, read from its --help."""
    status, out = train_py("--help")
    assert status == 0, out
    return sorted(set(re.findall(r"^\s+--(\w+)", out, re.MULTILINE)) - {"help"})


def changed(value):
    return {bool: lambda v: not v, int: lambda v: v + 1, float: lambda v: v * 2 + 1, str: lambda v: v + "x",
            type(None): lambda v: 7}[type(value)](value)


def test_every_flag_either_may_change_on_resume_or_is_refused_naming_it(finished):
    """A flag added to train.py is compared on resume unless it is put in MAY_CHANGE on purpose: no hand-kept list
    of run-defining flags can forget one."""
    run = json.load(open(finished[0] / "args.json"))
    assert help_flags() == sorted(run), "every flag of train.py is in the run's arguments, and nothing else"
    assert set(checkpoint.MAY_CHANGE) <= set(run) and set(checkpoint.LENGTH) <= set(checkpoint.MAY_CHANGE)
    for flag in run:
        now = {**run, flag: changed(run[flag])}
        may = flag in checkpoint.MAY_CHANGE and flag != "max_steps"  # (the run's schedule is cosine: length fixed)
        try:
            checkpoint.check_same_run(run, now, parser_of("train.py"), "step_000002")
            assert may, f"--{flag} changed on resume and nothing refused it"
        except UserError as e:
            assert not may and f"--{flag} {run[flag]!r} in the checkpoint, {now[flag]!r} now" in str(e), (flag, e)


def test_more_steps_are_refused_where_the_schedule_depends_on_the_run_length_and_allowed_where_not():
    cosine = {"schedule": "cosine", "max_steps": 2, "epochs": 1}
    with pytest.raises(UserError, match="--max_steps 2 in the checkpoint, 4 now.*depends on its length: --schedule"):
        checkpoint.check_same_run(cosine, {**cosine, "max_steps": 4}, parser_of("train.py"), "ckpt")
    constant = {**cosine, "schedule": "constant"}
    checkpoint.check_same_run(constant, {**constant, "max_steps": 4}, parser_of("train.py"), "ckpt")


def test_an_older_checkpoint_without_a_newer_flag_reads_it_as_the_parsers_default():
    saved = {"method": "kto", "beta": 0.1}  # written before --kto_lambda_d existed
    checkpoint.check_same_run(saved, {**saved, "kto_lambda_d": 1.0}, parser_of("train.py"), "old")
    with pytest.raises(UserError, match="--kto_lambda_d 1.0 in the checkpoint, 2.0 now"):
        checkpoint.check_same_run(saved, {**saved, "kto_lambda_d": 2.0}, parser_of("train.py"), "old")


def test_an_older_vanilla_checkpoint_resumes_once_a_rule_flag_with_a_default_exists():
    """A vanilla method records the rule's flags as None (not in force); a checkpoint saved before a rule flag existed
    lacks it. Once such a flag has a default other than None (here --drift 0.5), the old checkpoint still resumes."""
    parser = copy.deepcopy(parser_of("train.py"))
    parser.add_argument("--drift", type=float, default=0.5)
    saved = {"method": "dpo", "beta": 0.1, "alpha": None, "tau": None}  # written before --drift existed
    checkpoint.check_same_run(saved, {**saved, "drift": None}, parser, "old")
    checkpoint.check_same_run({**saved, "method": "tr_dpo"}, {**saved, "method": "tr_dpo", "drift": 0.5}, parser, "old")
    with pytest.raises(UserError, match="--drift 0.5 in the checkpoint, 0.7 now"):
        checkpoint.check_same_run(saved, {**saved, "drift": 0.7}, parser, "old")


def test_resuming_from_a_model_written_again_under_the_same_path_is_refused(tmp_path):
    """The SFT model trained again into the folder --model names, between a run's start and its resume: the run would
    go on against other weights. The fingerprint its checkpoint keeps refuses it; the same weights resume."""
    from test_identity import saved_model
    sft = saved_model(tmp_path / "sft")
    flags = [*TINY_RUN, "--model", sft, "--method", "dpo", "--out_dir", tmp_path / "run"]
    assert train_py(*flags, "--max_steps", "1")[0] == 0
    saved_model(tmp_path / "sft", seed=1)  # the SFT folder redone
    status, log = train_py(*flags, "--max_steps", "2", "--resume")
    assert status == 1 and f"--model {sft} is not the model" in log and "Traceback" not in log, log[-2000:]
    saved_model(tmp_path / "sft")  # the weights it started from, written again
    status, log = train_py(*flags, "--max_steps", "2", "--resume")
    assert status == 0 and "step 2" in log, log[-2000:]


LENGTH_RUN = [*TINY_RUN, "--method", "tr_dpo", "--alpha", "0.5"]  # the reference moves every step


def choices():
    """Every value of every train.py flag with choices, but --method's (its values take other flags: a vanilla method
    refuses --alpha; what depends on a method's length would sit in its own flags, enumerated here)."""
    return [(name(a), c) for a in parser_of("train.py")._actions if a.choices and a.dest != "method"
            for c in a.choices if c != a.default]


@pytest.mark.parametrize("flag, value", [(None, None), *choices()])
def test_a_run_that_depends_on_its_length_says_so_and_refuses_a_resume_with_more_steps(flag, value, tmp_path):
    """The first 2 steps of a 2-step run and of a 4-step run: where they differ (a decaying lr, a decaying alpha), the
    run depends on its length, and a resume of the short run with --max_steps 4 must be refused: it would continue
    with weights that match neither plan. A flag that changes them without flags.run_length fails here."""
    given = [flag, value] if flag else []
    short, long = tmp_path / "short", tmp_path / "long"
    assert train_py(*LENGTH_RUN, *given, "--max_steps", "2", "--out_dir", short)[0] == 0
    assert train_py(*LENGTH_RUN, *given, "--max_steps", "4", "--save_interval", "2", "--out_dir", long)[0] == 0
    a, b = torch.load(short / "step_000002" / "state.pt"), torch.load(long / "step_000002" / "state.pt")
    records = [[json.loads(line) for line in open(run / "metrics.jsonl")][:2] for run in (short, long)]
    lrs = [[r["lr"] for r in rs] for rs in records]
    differs = lrs[0] != lrs[1] or any(not torch.equal(a["reference"][k], b["reference"][k]) for k in a["reference"])
    try:
        checkpoint.check_same_run(json.load(open(short / "args.json")), json.load(open(long / "args.json")),
                                  parser_of("train.py"), "short")
        refused = False
    except UserError as e:
        assert "--max_steps 2 in the checkpoint, 4 now" in str(e), e
        refused = True
    assert refused == differs, f"{flag} {value}: the first steps {'differ' if differs else 'agree'} between a 2-step " \
        f"and a 4-step run, yet a resume with more steps is {'refused' if refused else 'allowed'}"


def test_the_run_keeps_the_dtype_in_force_so_a_resume_compares_what_ran(finished):
    """--dtype auto is bf16 on a GPU that supports it, else fp32: args.json keeps which, so a bf16 run resumed where
    bf16 is unsupported is refused instead of going on in fp32, and an auto run on the CPU resumes with --dtype fp32."""
    out, dataset = finished
    assert json.load(open(out / "args.json"))["dtype"] == "fp32"
    status, log = run(out, "--resume", "--dtype", "fp32", dataset=dataset)
    assert status == 0 and "is complete" in log, log
    status, log = run(out, "--resume", "--dtype", "bf16", dataset=dataset)
    assert status == 1 and "--dtype 'fp32' in the checkpoint, 'bf16' now" in log, log


def test_resuming_a_cosine_run_with_more_steps_is_refused_before_any_model_loads(finished):
    out, dataset = finished
    status, log = run(out, "--max_steps", "4", "--resume", dataset=dataset)
    assert status == 1 and "--max_steps 2 in the checkpoint, 4 now" in log and "Traceback" not in log, log
    assert "memory after building" not in log  # refused before the models were built


def test_resuming_a_finished_run_says_so_and_exits_0(finished):
    """A requeue loop passes --resume every time: the run that is done must not fail (it raised NameError)."""
    out, dataset = finished
    status, log = run(out, "--resume", dataset=dataset)
    assert status == 0 and f"{out} is complete: step 2 of 2; nothing to do" in log, log


def test_resuming_on_other_training_pairs_is_refused(finished):
    """The same flags and the same file name, but one answer changed in the file: the pairs' hash differs."""
    out, dataset = finished
    original = open(dataset).read()
    try:
        open(dataset, "w").write(original.replace('"chosen": "74"', '"chosen": "seventy-four"', 1))
        status, log = run(out, "--resume", dataset=dataset)
    finally:
        open(dataset, "w").write(original)
    assert status == 1 and "the training pairs differ from those" in log and "Traceback" not in log, log


def test_a_checkpoint_holds_no_random_number_state(finished):
    """Nothing in training draws random numbers (dropout is off; the data order is a function of the seed and the
    step), so none is saved. Restoring CUDA RNG states made a resume fail where fewer GPUs are visible than at save
    time: torch.cuda.set_rng_state_all(states) calls set_rng_state(state, i) for every saved device i, and a device
    index that does not exist fails (torch/cuda/random.py). A CPU cannot show that failure; it can show the state."""
    state = torch.load(finished[0] / "step_000002" / "state.pt", weights_only=False)
    assert "rng" not in state and not any(isinstance(v, torch.ByteTensor) for v in state.values())
    assert sorted(state) == ["data_sha256", "model_sha256", "optimizer", "ref_updates", "reference", "run",
                             "skipped_steps", "step", "wandb_id"]


def anonymous_bytes():
    """This process's anonymous resident memory (not file pages: those are the shared page cache)."""
    return int(re.search(r"RssAnon:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def peak_growth(work):
    """(what work() returns, the most anonymous memory it added at any moment, sampled by a thread)."""
    before, peak, done = anonymous_bytes(), [0], threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_bytes() - before)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = work()
        peak[0] = max(peak[0], anonymous_bytes() - before)
    finally:
        done.set()
        watcher.join()
    return result, peak[0]


def test_resuming_holds_the_checkpoint_memory_mapped_not_in_each_ranks_own_memory(tmp_path, chat_tokenizer):
    """Every rank of a DDP resume reads state.pt and the policy. Read whole (torch.load, from_pretrained), they take
    ~16 bytes per parameter of each rank's own memory at once (~44 GB per rank for Pythia-2.8B). Memory-mapped, the
    file's pages are the page cache, shared by every rank of the node, and only one tensor at a time is copied."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    reference = LlamaForCausalLM(config).requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters())
    policy(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    optimizer.step()
    n = sum(p.numel() for p in policy.parameters())
    progress = {"step": 1, "ref_updates": 0, "skipped_steps": 0, "data_sha256": "x", "run": {"method": "tr_dpo"}}
    folder = checkpoint.save(str(tmp_path), policy, reference, optimizer, chat_tokenizer, progress, False, True)
    fresh, fresh_ref = LlamaForCausalLM(config), LlamaForCausalLM(config).requires_grad_(False)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())

    # what every rank did before: the whole state in its own memory (the policy's safetensors were mapped already)
    _, whole_state = peak_growth(lambda: torch.load(os.path.join(folder, "state.pt"), weights_only=False))
    _, policy_folder = peak_growth(lambda: AutoModelForCausalLM.from_pretrained(os.path.join(folder, "policy")))
    state, mapped = peak_growth(lambda: checkpoint.read_progress(folder))
    _, restoring = peak_growth(lambda: checkpoint.load(folder, fresh, fresh_ref, fresh_optimizer, False, state))
    largest = max(p.numel() * 4 for p in policy.parameters())
    print(f"bytes per parameter of this process's own memory: state.pt read whole {whole_state / n:.2f}, "
          f"memory-mapped {mapped / n:.3f}; the policy folder {policy_folder / n:.3f}; restoring all {restoring / n:.2f}"
          f" (the largest tensor alone: {largest / n:.2f})")
    assert whole_state > 11.5 * n and policy_folder < 0.05 * n  # AdamW's moments and the reference; mapped already
    assert mapped < 0.05 * n and restoring < largest + 0.3 * n
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), policy.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(fresh_ref.parameters(), reference.parameters()))
    assert all(torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
               for a, b in zip(fresh_optimizer.state.values(), optimizer.state.values()))
