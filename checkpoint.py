"""Checkpoints: one folder per saved step, written whole or not at all, and resumed only into the same run.

    out_dir/args.json            the run's arguments (alpha, tau and max_steps as in force)
    out_dir/metrics.jsonl        one line per log step, and one before every checkpoint (the steps since the last)
    out_dir/memory.json          bytes each rank holds (memory.py), each resumed process's too
    out_dir/step_NNNNNN/policy/  a plain Hugging Face model folder: from_pretrained(...) it, or pass it as --model
    out_dir/step_NNNNNN/state.pt the moved reference, the optimizer, the counters (step, reference updates, skipped
                                 steps), a hash of the training pairs, the run's arguments and its W&B run's id (one
                                 process or DDP: every rank holds them all, so rank 0 writes)
    out_dir/step_NNNNNN/sharded/ with --fsdp: policy, reference and optimizer as torch.distributed.checkpoint shards,
                                 each rank writing its own; --resume re-shards them for any number of processes

A moving reference is state like the optimizer's: a TR run resumed without it would quietly restart from the SFT
reference (TRL and the authors' library do). Ours continues bit-exactly (tests/test_train.py). Nothing in training
draws random numbers (dropout is off, the data order is a function of the seed and the step), so no RNG state is
saved: a run resumes where fewer or other GPUs are visible.
"""
import glob
import json
import os
import shutil

import torch
import torch.distributed as dist

import flags
import guards
from guards import UserError
from model import load_model

# what a run writes into its out_dir: a folder holding any of these holds a run, and --overwrite removes them all
RUN_FILES = ("args.json", "metrics.jsonl", "memory.json", "curves.png", "wandb", "step_*")
# the arguments a resume may change: where and how often things are written, how the batch is split over processes
# and micro-batches, where the data is read from (the pairs themselves are compared by hash), and the run's length
# (--max_steps, and --epochs which gives it) unless a flag ties the run to it (flags.run_length, e.g. a decaying
# --schedule). Every other argument must be the checkpoint's. train.py --help's --resume says it.
MAY_CHANGE = ("out_dir", "overwrite", "resume", "log_interval", "eval_interval", "save_interval", "micro_batch_size",
              "grad_ckpt", "dist_timeout", "skip_nonfinite", "data_dir", "wandb", "epochs", "max_steps")
LENGTH = ("max_steps",)  # the run's length as in force: what a flag marked flags.run_length ties the run to


class Metrics:
    """The run's log records: a line each in out_dir/metrics.jsonl, and with --wandb PROJECT to Weights & Biases too
    (imported only then; the run named after out_dir, its arguments as the config). Rank 0 writes. Resumed (`state`:
    the checkpoint's progress), the file is cut back to the checkpoint's step, since the steps after it are trained
    and logged again, and W&B continues the run whose id the checkpoint keeps (`wandb_id`)."""

    def __init__(self, out_dir, run, wandb_project, master, state=None):
        path = os.path.join(out_dir, "metrics.jsonl")
        self.wandb, self.wandb_id = None, state and state.get("wandb_id")
        if master and state and os.path.exists(path):
            kept = [line for line in open(path) if logged_by(line, state["step"])]
            with open(path, "w") as f:
                f.writelines(kept)
        self.file = open(path, "a") if master else None
        if wandb_project and master:
            import wandb
            self.wandb = wandb.init(project=wandb_project, name=os.path.basename(os.path.normpath(out_dir)),
                                    config=run, dir=out_dir, id=self.wandb_id, resume=self.wandb_id and "allow")
            self.wandb_id = self.wandb.id

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        if self.wandb:  # numbers (a list, such as the reference updates applied, stays in metrics.jsonl)
            self.wandb.log({k: v for k, v in record.items() if not isinstance(v, list)}, step=record["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()


def logged_by(line, step):
    """Whether a line of metrics.jsonl is a whole record of a step up to `step` (a hard kill can cut the last line)."""
    try:
        return json.loads(line)["step"] <= step and line.endswith("\n")
    except (ValueError, KeyError, TypeError):
        return False


def completed(out_dir):
    """The complete checkpoints in out_dir, oldest first (a crash leaves only step_N.tmp, never a half step_N)."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "step_*")) if not d.endswith(".tmp"))


def finished(out_dir, length=None):
    """Whether the run in out_dir is finished: its latest complete checkpoint is at the run's last step (`length`, else
    the run's length when that checkpoint was saved). Read from the checkpoint, never from an exit status: a run stopped
    by a signal saves a checkpoint too (and exits STOPPED, guards.py), and continues with --resume."""
    done = completed(out_dir)
    if not done:
        return False
    state = read_progress(done[-1])
    return state["step"] >= (length or state["run"].get("max_steps") or float("inf"))


def check_deletion(doomed, inputs, allowed, refusal):
    """The one owner of every deletion (train.py's, evaluate.py's, study.py's): `doomed`, the paths a command would
    delete or replace, may go only where `allowed` (the folder holds nothing of the kind, its record is this run's, or
    --overwrite was given), else UserError(refusal); and never where an input of the command ((flag, path) pairs: a
    model, a data file or folder, resolved) lies in one of them, --overwrite or not."""
    for flag, value in inputs:
        path = value and os.path.realpath(os.path.expanduser(value))
        for d in doomed:
            if path and os.path.exists(path) and os.path.commonpath([path, os.path.realpath(d)]) == os.path.realpath(d):
                raise UserError(f"{flag} {value} lies in {d}, which this command would delete: copy it out first (or "
                                "name the copy), or choose another --out_dir")
    if doomed and not allowed:
        raise UserError(refusal)


def prepare_out_dir(out_dir, args):
    """Refuse to mix two runs in one folder; delete nothing yet (`clear_out_dir` does, once every check has passed).
    Returns the checkpoint to resume from, or None for a fresh run. `--resume auto`: the latest checkpoint if there
    is one, else a fresh run that replaces what a killed start of this same run left (a requeue loop; clear_out_dir
    compares its args.json). Never a folder that holds an input of the run (--model, --dataset, --data_dir)."""
    done = completed(out_dir) if args.resume else []
    if done:
        return done[-1]
    if args.resume and args.resume != "auto":
        raise UserError(f"--resume found no complete checkpoint (step_*) in {out_dir}; --resume auto starts the run "
                        "where there is none")
    leftovers = run_files(out_dir)
    names = ", ".join(os.path.basename(p) for p in leftovers[:4])
    check_deletion(leftovers, run_inputs(args), args.overwrite or args.resume,
                   f"{out_dir} already holds a run ({names}). Continue it with --resume, replace it with --overwrite, "
                   "or choose another --out_dir.")
    return None


def run_inputs(args):
    """What a train.py run reads, by flag: never deleted to make room for its outputs."""
    return [("--model", args.model), ("--dataset", args.dataset), ("--data_dir", args.data_dir)]


def replace_outputs(staged, out_dir, earlier):
    """Swap a command's outputs in once all are written (under `staged`, a folder in out_dir), each file by an atomic
    rename, then delete the earlier call's files that none replaced (`earlier`: passed check_deletion). A command
    stopped or failed before this leaves the earlier outputs as they were."""
    written = os.listdir(staged)
    for name in written:
        os.replace(os.path.join(staged, name), os.path.join(out_dir, name))
    for name in set(earlier) - set(written):
        os.remove(os.path.join(out_dir, name))
    os.rmdir(staged)


def run_files(out_dir):
    """What a run wrote into out_dir (RUN_FILES), sorted."""
    return sorted(p for pattern in RUN_FILES for p in glob.glob(os.path.join(out_dir, pattern)))


def clear_out_dir(out_dir, run, parser, master):
    """A fresh run's first write: delete what an old run left (prepare_out_dir allowed it: --overwrite, or --resume
    auto without a checkpoint, where the folder's record, args.json, must then be this run's: a killed start of it),
    then write this run's args.json (as in force: alpha, tau, max_steps). Called only once the model, the data, the
    lengths and the batches have passed, so that a run refused for any of them leaves the old run as it was."""
    record = os.path.join(out_dir, "args.json")
    if not run["overwrite"] and run_files(out_dir):  # --resume auto: rank 0 checks first, and alone says why not
        with guards.rank_zero_first():
            if not os.path.exists(record):
                raise UserError(f"{out_dir} holds a run's files but no args.json, so whose they are cannot be told: "
                                "replace them with --overwrite, or choose another --out_dir")
            check_same_run(json.load(open(record)), run, parser, f"{out_dir} (its args.json; no checkpoint)")
    if dist.is_initialized():
        dist.barrier()  # every rank is past its checks before rank 0 deletes anything
    if master:
        for path in run_files(out_dir):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
        os.makedirs(out_dir, exist_ok=True)
        with open(record + ".tmp", "w") as f:  # first: a start killed from here on is known as this run's
            json.dump(run, f, indent=1)
        os.replace(record + ".tmp", record)
    if dist.is_initialized():
        dist.barrier()


def check_same_run(saved, current, parser, where):
    """--resume continues the run the checkpoint belongs to: every argument but MAY_CHANGE must be the checkpoint's,
    and the run's length (max_steps) too where a flag of `parser` (train.py's) says the run depends on it. A key an
    older checkpoint lacks (a flag added since) matches the parser's default, and None (a flag not in force: a vanilla
    method records the rule's flags so): the run had no such flag, so it ran as either."""
    defaults = vars(parser.parse_args([]))
    tied = flags.length_dependent(parser, {**defaults, **saved})
    may_change = set(MAY_CHANGE) - (set(LENGTH) if tied else set())
    differences = [f"--{k} {saved.get(k, defaults.get(k))!r} in the checkpoint, {current[k]!r} now"
                   for k in current if k not in may_change and (saved[k] != current[k] if k in saved else
                                                                 current[k] not in (None, defaults.get(k)))]
    if differences:
        why = f" (the run depends on its length: {', '.join('--' + f for f in tied)})" if tied else ""
        raise UserError(f"{where} belongs to another run: " + "; ".join(differences) + why +
                        ". Resume with the same arguments, or start a fresh run in another --out_dir.")


def check_resume(state, run, parser, data_sha256, where, model_sha256=None):
    """The same run (its arguments), from the same model (the fingerprint of its weights and tokenizer,
    identity.model_fingerprint; a checkpoint saved before it was kept is not checked), on the same pairs (a hash of
    their token ids: the data, its bad rows, the held-out draw, the tokenizer and the lengths all show in it)."""
    check_same_run(state["run"], run, parser, where)
    if state.get("model_sha256", model_sha256) != model_sha256:
        raise UserError(f"--model {run['model']} is not the model {where} started from: its weights or tokenizer "
                        "changed since (written again under the same path?); resume with the model the run started "
                        "from, or start a fresh run in another --out_dir")
    if state.get("data_sha256", data_sha256) != data_sha256:
        raise UserError(f"the training pairs differ from those {where} trained on (the data, its bad rows, "
                        "--eval_pairs, the tokenizer or the lengths changed); start a fresh run in another --out_dir")


def save(out_dir, policy, reference, optimizer, tokenizer, progress, fsdp, master):
    """Write out_dir/step_N. `progress`: the counters, the data hash and the run's arguments ("run").
    Written under step_N.tmp and renamed, so that a crash never leaves a half-written latest checkpoint."""
    final = os.path.join(out_dir, f"step_{progress['step']:06d}")
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        dist.barrier()
        dcp.save(sharded_state(policy, reference, optimizer), checkpoint_id=os.path.join(tmp, "sharded"))
        # the plain policy folder: gathered to rank 0's CPU one tensor at a time, never whole on a GPU
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        policy.save_pretrained(os.path.join(tmp, "policy"), state_dict=full if fsdp else None)
        tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        torch.save({**progress, "optimizer": None if fsdp else optimizer.state_dict(),
                    "reference": reference.state_dict() if reference is not None and not fsdp else None},  # moved
                   os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
    if dist.is_initialized():
        dist.barrier()
    return final


def sharded_state(policy, reference, optimizer):
    """With --fsdp, what each rank saves and loads: its shards of policy, reference and optimizer."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    return {"policy": get_model_state_dict(policy), "optimizer": get_optimizer_state_dict(policy, optimizer),
            **({"reference": get_model_state_dict(reference)} if reference is not None else {})}


def read_progress(folder):
    """state.pt, memory-mapped: its tensors stay in the file's pages (the page cache, one copy per node however many
    ranks read it) until each is copied where it belongs, one at a time. A plain torch.load would put the whole
    optimizer state and reference in every rank's own memory at once (~44 GB per rank for Pythia-2.8B)."""
    state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", mmap=True, weights_only=False)
    state.setdefault("run", state.get("args", {}))  # older checkpoints kept the arguments under "args"
    return state


def load(folder, policy, reference, optimizer, fsdp, state):
    """Restore policy, the moved reference and the optimizer from `folder` (its state.pt already read: `state`)."""
    moving = reference is not None and state["run"]["method"].startswith("tr_")
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
        if not os.path.isdir(os.path.join(folder, "sharded")):
            raise UserError(f"{folder} was not saved with --fsdp; resume it without --fsdp")
        shards = sharded_state(policy, reference if moving else None, optimizer)
        dcp.load(shards, checkpoint_id=os.path.join(folder, "sharded"))  # re-sharded for this number of ranks
        set_model_state_dict(policy, shards.pop("policy"))
        set_optimizer_state_dict(policy, optimizer, shards.pop("optimizer"))
        if moving:
            set_model_state_dict(reference, shards.pop("reference"))
    else:
        if state["optimizer"] is None:
            raise UserError(f"{folder} was saved with --fsdp; resume it with --fsdp")
        policy.load_state_dict(load_model(os.path.join(folder, "policy")).state_dict())  # safetensors: mapped too
        optimizer.load_state_dict(state.pop("optimizer"))  # copied to the parameters' device and dtype
        if moving:
            reference.load_state_dict(state.pop("reference"))  # the reference the run had, not the SFT model
    return state["step"], state.get("ref_updates", 0), state.get("skipped_steps", 0)
