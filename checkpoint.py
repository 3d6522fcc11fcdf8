"""Checkpoints: one folder per saved step, written whole or not at all, and resumed only into the same run.

    out_dir/args.json            the run's arguments (alpha and tau as in force)
    out_dir/metrics.jsonl        one line per log step
    out_dir/step_NNNNNN/policy/  a plain Hugging Face model folder: from_pretrained(...) it, or pass it as --model
    out_dir/step_NNNNNN/state.pt the moved reference, the optimizer, the step, the data position, the RNG states and
                                 the run's arguments (one process or DDP: every rank holds them all, so rank 0 writes)
    out_dir/step_NNNNNN/sharded/ with --fsdp: policy, reference and optimizer as torch.distributed.checkpoint shards,
                                 each rank writing its own; --resume re-shards them for any number of processes

A moving reference is state like the optimizer's: a TR run resumed without it would quietly restart from the SFT
reference (TRL and the authors' library do). Ours continues bit-exactly (tests/test_train.py).
"""
import glob
import os
import random
import shutil

import torch
import torch.distributed as dist

from guards import UserError
from model import load_model

# the arguments that make a run what it is: resuming with another value would silently be another experiment
RUN_KEYS = ("method", "model", "dataset", "batch_size", "alpha", "tau", "beta", "ipo_average", "kto_lambda_d",
            "kto_lambda_u", "max_length", "max_prompt_length", "seed", "group_by_length", "lr", "schedule",
            "warmup_steps", "weight_decay", "max_grad_norm")


def completed(out_dir):
    """The complete checkpoints in out_dir, oldest first (a crash leaves only step_N.tmp, never a half step_N)."""
    return sorted(d for d in glob.glob(os.path.join(out_dir, "step_*")) if not d.endswith(".tmp"))


def prepare_out_dir(out_dir, resume, overwrite, master):
    """Refuse to mix two runs in one folder. Returns the checkpoint to resume from, or None for a fresh run."""
    if resume:
        done = completed(out_dir)
        if not done:
            raise UserError(f"--resume found no complete checkpoint (step_*) in {out_dir}")
        return done[-1]
    leftovers = [p for p in ("args.json", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, p))]
    leftovers += [os.path.basename(d) for d in glob.glob(os.path.join(out_dir, "step_*"))]
    if leftovers and not overwrite:
        raise UserError(f"{out_dir} already holds a run ({', '.join(sorted(leftovers)[:4])}). Continue it "
                         "with --resume, replace it with --overwrite, or choose another --out_dir.")
    if dist.is_initialized():
        dist.barrier()  # every rank has looked before rank 0 deletes anything
    if leftovers and master:
        for p in leftovers:
            path = os.path.join(out_dir, p)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out_dir, exist_ok=True)
    return None


def check_same_run(saved, current, where):
    """--resume continues the run the checkpoint belongs to; any other method, model, data, batch or rule is refused."""
    differences = [f"--{k} {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in RUN_KEYS
                   if saved.get(k) != current.get(k)]
    if differences:
        raise UserError(f"{where} belongs to another run: " + "; ".join(differences) +
                         ". Resume with the same arguments, or start a fresh run in another --out_dir.")


def save(out_dir, policy, reference, optimizer, tokenizer, progress, fsdp, master):
    """Write out_dir/step_N. `progress`: step, ref_updates, epoch, pairs_seen, skipped_steps, run (the arguments).
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
        torch.save({**progress,
                    "optimizer": None if fsdp else optimizer.state_dict(),
                    "reference": reference.state_dict() if reference is not None and not fsdp else None,  # moved
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}},
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


def load(folder, policy, reference, optimizer, fsdp, run):
    """Restore policy, the moved reference, optimizer and RNG states from `folder`; return its progress counters.
    state.pt is read into CPU memory (map_location): else every rank would put its tensors on the GPU that saved them,
    cuda:0. It is dropped once restored, so that no second copy of the optimizer or reference stays behind."""
    state = torch.load(os.path.join(folder, "state.pt"), map_location="cpu", weights_only=False)
    check_same_run(state.get("run", state.get("args", {})), run, folder)  # ("args": checkpoints before 2026-11-29)
    moving = reference is not None and run["method"].startswith("tr_")
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
        policy.load_state_dict(load_model(os.path.join(folder, "policy")).state_dict())
        optimizer.load_state_dict(state.pop("optimizer"))  # moved to the parameters' device
        if moving:
            reference.load_state_dict(state.pop("reference"))  # the reference the run had, not the SFT model
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return {k: state.get(k, 0) for k in ("step", "ref_updates", "epoch", "pairs_seen", "skipped_steps")}
