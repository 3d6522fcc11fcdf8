"""Train a policy with DPO, IPO or KTO, with the paper's moving reference (TR-DPO, TR-IPO, TR-KTO), or with SFT.

    python train.py                                           # TR-DPO on the built-in demo set, SmolLM2-135M, CPU ok
    torchrun --nproc_per_node 8 train.py --method tr_ipo --tau 512 --model EleutherAI/pythia-2.8b --dataset hh
    python train.py --resume --out_dir out/demo               # continue from the latest complete checkpoint

The same file runs under `python` (one process) and `torchrun` (DDP: NCCL on GPUs, gloo on CPUs).
"""
import argparse
import contextlib
import copy
import glob
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from data import DataError, batches, collate, load_splits, to_device, tokenize
from losses import dpo_loss, ipo_loss, kto_loss
from model import DEFAULT_MODEL, load_model, load_tokenizer, sequence_logps
from ref_update import should_update, update_reference

# ----------------------------------------------------------------------------------------------------------------
# arguments: every default is the demo's; the README gives the paper's settings
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--method", default="tr_dpo", choices=["sft", "dpo", "ipo", "kto", "tr_dpo", "tr_ipo", "tr_kto"])
p.add_argument("--beta", type=float, default=0.1, help="KL strength of DPO/IPO/KTO (IPO's tau)")
p.add_argument("--alpha", type=float, default=None, help="TR: weight of the policy in each reference update (default 1)")
p.add_argument("--tau", type=int, default=None, help="TR: update the reference every tau optimizer steps (default 16)")
p.add_argument("--ipo_average", action="store_true", help="IPO on per-token mean log-probs (TRL) instead of sums")
p.add_argument("--kto_lambda_d", type=float, default=1.0, help="KTO weight of desirable (chosen) examples")
p.add_argument("--kto_lambda_u", type=float, default=1.0, help="KTO weight of undesirable (rejected) examples")
p.add_argument("--model", default=DEFAULT_MODEL, help="HF id, local folder, config.json, or the built-in default")
p.add_argument("--dataset", default="demo", help="demo | hh | tldr | ultrafeedback | PATH.jsonl")
p.add_argument("--data_dir", default=None, help="an offline copy of the hh/tldr/ultrafeedback hub repository (a folder "
               "in the hub's layout), read instead of the hub")
p.add_argument("--max_length", type=int, default=512, help="tokens of prompt + completion")
p.add_argument("--max_prompt_length", type=int, default=256, help="prompt tokens kept when a pair must be cut")
p.add_argument("--lr", type=float, default=1e-5)
p.add_argument("--warmup_steps", type=int, default=5)
p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"], help="after warm-up")
p.add_argument("--weight_decay", type=float, default=0.0)
p.add_argument("--max_grad_norm", type=float, default=2.0)
p.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step, over all processes")
p.add_argument("--micro_batch_size", type=int, default=4, help="pairs per process per forward pass")
p.add_argument("--group_by_length", action="store_true", help="batch pairs of similar length (less padding)")
p.add_argument("--epochs", type=int, default=1)
p.add_argument("--max_steps", type=int, default=40, help="optimizer steps; 0 = as many as --epochs give")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast; auto = bf16 on CUDA")
p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing of the policy (not the reference)")
p.add_argument("--fsdp", action="store_true", help="shard policy and reference with FSDP2 instead of replicating (DDP)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out_dir", default="out/demo")
p.add_argument("--log_interval", type=int, default=4, help="optimizer steps between log lines")
p.add_argument("--eval_interval", type=int, default=20, help="optimizer steps between evaluations on held-out pairs")
p.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs for eval and drift from the SFT model")
p.add_argument("--save_interval", type=int, default=0, help="optimizer steps between checkpoints; 0 = only at the end")
p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --out_dir")
p.add_argument("--skip_bad_rows", action="store_true", help="leave malformed rows of a JSONL file out (counted) "
               "instead of stopping; the hub sets always do")
p.add_argument("--skip_nonfinite", type=int, default=0, help="skip up to N steps whose loss or gradient is NaN/inf "
               "(counted); 0 = stop at the first, saving the last good state")
p.add_argument("--dist_timeout", type=int, default=1800, help="seconds a collective may wait for a rank that hangs")
args = p.parse_args()

# one parse of --method: the loss to use, and whether the reference moves
moving_reference = args.method.startswith("tr_")
base_method = args.method.removeprefix("tr_")
loss_fn = {"dpo": dpo_loss, "ipo": ipo_loss, "kto": kto_loss, "sft": None}[base_method]
if not moving_reference and (args.alpha is not None or args.tau is not None):
    p.error(f"--alpha/--tau move the reference, which only the TR methods do; use --method tr_{base_method}")
alpha = 1.0 if args.alpha is None else args.alpha
tau = 16 if args.tau is None else args.tau
if not 0 <= alpha <= 1:
    p.error(f"--alpha {alpha} must lie in [0, 1] (the weight of the policy in the reference update)")
if tau < 1:
    p.error(f"--tau {tau} must be at least 1 (the reference is updated every tau optimizer steps)")
if args.beta <= 0:
    p.error(f"--beta {args.beta} must be positive")

# ----------------------------------------------------------------------------------------------------------------
# processes and devices: torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is one process
distributed = "RANK" in os.environ
if args.fsdp and not distributed:
    p.error("--fsdp shards over processes: run it under torchrun (e.g. torchrun --nproc_per_node 8 train.py --fsdp)")
rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
local_rank = int(os.environ.get("LOCAL_RANK", 0))
master = rank == 0
if args.batch_size % (args.micro_batch_size * world_size):
    p.error(f"--batch_size {args.batch_size} must be a multiple of --micro_batch_size {args.micro_batch_size} "
            f"x {world_size} processes")
grad_accum = args.batch_size // (args.micro_batch_size * world_size)
device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
if distributed:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=args.dist_timeout))
use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # weights stay fp32 (the master copy)
torch.manual_seed(args.seed)
random.seed(args.seed)


def log(message):
    if master:
        tqdm.write(message)


# ----------------------------------------------------------------------------------------------------------------
# data: rank 0 loads and tokenizes first and caches the tokens; the other ranks then read them from the cache.
# The eval pairs are held out: drawn at random from the test split (from a JSONL file: from its rows), the same pairs
# for every run whatever its --seed, so that runs compare on them
tokenizer = load_tokenizer(args.model, log=log)
if distributed and not master:
    dist.barrier()
rows, eval_rows = load_splits(args.dataset, args.eval_pairs, skip_bad_rows=args.skip_bad_rows, log=log,
                              data_dir=args.data_dir)
train_set = tokenize(rows, tokenizer, args.max_length, args.max_prompt_length, log=log)
eval_set = tokenize(eval_rows, tokenizer, args.max_length, args.max_prompt_length, log=log)[rank::world_size]
if distributed and master:
    dist.barrier()
steps_per_epoch = len(train_set) // args.batch_size
if steps_per_epoch == 0:
    raise DataError(f"{len(train_set)} training pairs cannot fill one batch of --batch_size {args.batch_size}")
max_steps = args.max_steps or args.epochs * steps_per_epoch
pad_id = tokenizer.pad_token_id

# ----------------------------------------------------------------------------------------------------------------
# models: the policy trains; the reference starts as an exact copy of it (the SFT model) and stays in fp32
policy = load_model(args.model, seed=args.seed).to(device)
reference = None if base_method == "sft" else copy.deepcopy(policy).requires_grad_(False)
if args.grad_ckpt:  # recompute activations in backward: memory for compute, policy only (the reference has no backward)
    policy.activation_checkpointing_enable({"use_reentrant": False})
    policy.train()  # HF checkpoints only in train mode; every dropout was set to 0 when loading
if args.fsdp:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def shard(model):
        """FSDP2: every decoder block, then the rest. Each rank keeps 1/N of the fp32 weights; a block's weights are
        all-gathered in bf16 just for its compute. Policy and reference are sharded alike, so the reference update is
        shard-local: the same fused lerp on each rank's pieces, no all-gather."""
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
        for block in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
            fully_shard(block, mp_policy=mp)
        return fully_shard(model, mp_policy=mp, reshard_after_forward=True)  # root too: the update sees only shards
    policy, reference = shard(policy), reference and shard(reference)


# the held-out pairs, and their log-probs under the ORIGINAL (SFT) model, computed once before any step, so that the
# drift from it can be logged without a third model in memory
eval_batches = [to_device(collate(eval_set[i: i + args.micro_batch_size], pad_id), device)
                for i in range(0, len(eval_set), args.micro_batch_size)]


@torch.no_grad()
def all_logps(model):
    with autocast:
        return [sequence_logps(model, b) for b in eval_batches]


sft_logps = all_logps(policy)  # before any step (and before a resume loads its weights) the policy is the SFT model
if getattr(policy.config, "tie_word_embeddings", False):
    log("note: input and output embeddings are tied: one tensor, updated (and mixed into the reference) once")
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                              fused=device.type == "cuda")
step, ref_updates, epoch, micro_step = 0, 0, 0, 0  # micro_step: micro-batches consumed in this epoch


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: step_N/policy is a plain Hugging Face folder; step_N/state.pt holds everything else (with --fsdp,
# step_N/sharded/ holds policy, reference and optimizer as torch.distributed.checkpoint shards: resumable on any number
# of GPUs)
if args.fsdp:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict, set_model_state_dict,
                                                         set_optimizer_state_dict)

    def sharded_state():
        return {"policy": get_model_state_dict(policy), "optimizer": get_optimizer_state_dict(policy, optimizer),
                **({"reference": get_model_state_dict(reference)} if moving_reference else {})}


def save_checkpoint():
    final = os.path.join(args.out_dir, f"step_{step:06d}")
    tmp = final + ".tmp"  # written under a temporary name, then renamed: a crash never leaves a half checkpoint
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.fsdp:
        dist.barrier()
        dcp.save(sharded_state(), checkpoint_id=os.path.join(tmp, "sharded"))  # every rank writes its own shards
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if master:
        policy_raw.save_pretrained(os.path.join(tmp, "policy"), state_dict=full if args.fsdp else None)
        tokenizer.save_pretrained(os.path.join(tmp, "policy"))
        torch.save({"optimizer": None if args.fsdp else optimizer.state_dict(),
                    "reference": reference.state_dict() if moving_reference and not args.fsdp else None,  # moved
                    "step": step, "ref_updates": ref_updates, "epoch": epoch,
                    "pairs_seen": micro_step * args.micro_batch_size * world_size,  # in this epoch, on all ranks
                    "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                            "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else None},
                    "args": vars(args)}, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.rename(tmp, final)
        log(f"saved {final}")
    if distributed:
        dist.barrier()


if args.resume:
    done = sorted(d for d in glob.glob(os.path.join(args.out_dir, "step_*")) if not d.endswith(".tmp"))
    if not done:
        raise SystemExit(f"error: --resume found no complete checkpoint (step_*) in {args.out_dir}")
    log(f"resuming from {done[-1]}")
    state = torch.load(os.path.join(done[-1], "state.pt"), weights_only=False)
    if args.fsdp:
        if not os.path.isdir(os.path.join(done[-1], "sharded")):
            raise SystemExit(f"error: {done[-1]} was not saved with --fsdp; resume it without --fsdp")
        shards = sharded_state()
        dcp.load(shards, checkpoint_id=os.path.join(done[-1], "sharded"))  # re-sharded for this number of ranks
        set_model_state_dict(policy, shards["policy"])
        set_optimizer_state_dict(policy, optimizer, shards["optimizer"])
        if moving_reference:
            set_model_state_dict(reference, shards["reference"])
    else:
        if state["optimizer"] is None:
            raise SystemExit(f"error: {done[-1]} was saved with --fsdp; resume it with --fsdp")
        policy.load_state_dict(load_model(os.path.join(done[-1], "policy")).state_dict())
        optimizer.load_state_dict(state["optimizer"])
        if moving_reference:
            reference.load_state_dict(state["reference"])  # continue with the reference the run had, not the SFT model
    step, ref_updates, epoch = state["step"], state["ref_updates"], state["epoch"]
    micro_step = state["pairs_seen"] // (args.micro_batch_size * world_size)  # the same data position, any world size
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])

policy_raw = policy
if distributed and not args.fsdp:
    policy = DDP(policy, device_ids=[local_rank] if device.type == "cuda" else None)


# ----------------------------------------------------------------------------------------------------------------
# one micro-batch: per-example losses and the metrics TRL users know
def forward(batch):
    """Returns (per-example losses, metric sums as 0-dim tensors, number of pairs). The sums stay on the device:
    reading them (.item()) here would make the CPU wait for the GPU before it can queue the backward pass."""
    if base_method == "sft":  # next-token NLL on the chosen completions
        logps = sequence_logps(policy, batch)
        losses = -logps / batch["loss_mask"].sum(-1)
        return losses, {"loss": losses.detach().sum(), "logps/chosen": logps.detach().sum()}, len(losses)
    average = args.ipo_average and base_method == "ipo"
    policy_logps = sequence_logps(policy, batch, average)  # (2B,) chosen rows first, then rejected
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch, average)
    if base_method == "kto":
        with torch.no_grad():  # the KL estimate z is detached, so its forward passes need no graph
            policy_kl_logps = sequence_logps(policy_raw, batch["kl"])
            ref_kl_logps = sequence_logps(reference, batch["kl"])
        desirable = torch.arange(len(policy_logps), device=device) < len(policy_logps) // 2
        losses, rewards, kl = kto_loss(policy_logps, ref_logps, desirable, policy_kl_logps, ref_kl_logps,
                                       args.beta, args.kto_lambda_d, args.kto_lambda_u)
        chosen_rewards, rejected_rewards = rewards.chunk(2)
        extra = {"kl": kl * len(chosen_rewards)}
    else:
        chosen, rejected = policy_logps.chunk(2)
        ref_chosen, ref_rejected = ref_logps.chunk(2)
        losses, chosen_rewards, rejected_rewards = loss_fn(chosen, rejected, ref_chosen, ref_rejected, args.beta)
        extra = {}
    n = len(chosen_rewards)
    logps_c, logps_r = policy_logps.detach().chunk(2)
    return losses, {"loss": losses.detach().mean() * n, "rewards/chosen": chosen_rewards.sum(),
                    "rewards/rejected": rejected_rewards.sum(),
                    "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                    "logps/chosen": logps_c.sum(), "logps/rejected": logps_r.sum(), **extra}, n


def all_reduce_sum(values):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if distributed:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_mean(sums, count):
    """Sums of metrics on this rank -> means over all ranks' examples (never rank 0's numbers alone)."""
    *totals, n = all_reduce_sum(list(sums.values()) + [count])
    return {k: v / n for k, v in zip(sums, totals)}


@torch.no_grad()
def evaluate():
    """Held-out pairs against the (moving) reference, and the drift of the policy from the original SFT model."""
    sums = {}
    refs = all_logps(reference) if reference is not None else sft_logps
    for pol, sft, ref in zip(all_logps(policy_raw), sft_logps, refs):
        (pc, pr), (sc, sr), (rc, rr) = pol.chunk(2), sft.chunk(2), ref.chunk(2)
        m = {"eval/rewards/accuracies": ((pc - rc) > (pr - rr)).float(),
             "eval/rewards/margins": args.beta * ((pc - rc) - (pr - rr)),
             "drift/chosen": pc - sc, "drift/rejected": pr - sr,  # log pi - log pi_SFT on held-out completions
             "drift/accuracies": ((pc - sc) > (pr - sr)).float()}  # implicit-reward accuracy against the SFT model
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v.sum().item()
    return all_reduce_mean(sums, len(eval_set))


# ----------------------------------------------------------------------------------------------------------------
# the loop
def get_lr(step):
    """Linear warm-up, then constant, linear or cosine decay to 0. A pure function of step: the step is its state."""
    if step <= args.warmup_steps:
        return args.lr * step / max(1, args.warmup_steps)
    progress = (step - args.warmup_steps) / max(1, max_steps - args.warmup_steps)
    return args.lr * {"constant": 1.0, "linear": 1 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[
        args.schedule]


def micro_batches():
    """This rank's micro-batches from the data position (epoch, micro_step) on, forever (epoch after epoch)."""
    global epoch, micro_step
    while True:
        for examples in batches(train_set, args.micro_batch_size, rank, world_size, args.seed, epoch, micro_step,
                                group_size=args.batch_size if args.group_by_length else 0):
            micro_step += 1
            batch = collate(examples, pad_id, base_method, args.max_length)
            row_ids, tokens = batch.pop("rows").tolist(), int(batch["attention_mask"].sum())  # read on the CPU: no
            tokens += int(batch["kl"]["attention_mask"].sum()) if "kl" in batch else 0       # wait for the device
            yield {**to_device(batch, device), "rows": row_ids, "tokens": tokens}
        epoch, micro_step = epoch + 1, 0


os.makedirs(args.out_dir, exist_ok=True)
metrics_file = open(os.path.join(args.out_dir, "metrics.jsonl"), "a") if master else None
log(f"{args.method}: {len(train_set)} pairs, {max_steps} steps of {args.batch_size} pairs ({world_size} "
    f"process{'es' if world_size > 1 else ''} x {args.micro_batch_size} x {grad_accum} accumulation), device {device}, "
    f"{'bf16 autocast' if use_bf16 else 'fp32'}" + (f", reference update alpha={alpha} every tau={tau} steps"
                                                   if moving_reference else ""))
if master and not args.resume:
    json.dump({**vars(args), **({"alpha": alpha, "tau": tau} if moving_reference else {})},  # the values in force
              open(os.path.join(args.out_dir, "args.json"), "w"), indent=1)
data = micro_batches()
sums, count, grad_norms, tokens, t0, skipped = {}, 0, [], 0, time.time(), 0
drift = evaluate()


def request_stop(signum, frame):
    """SIGTERM/SIGINT: finish the current step, save, exit. A second Ctrl-C stops at once."""
    global stop_requested
    if stop_requested and signum == signal.SIGINT:
        raise KeyboardInterrupt
    stop_requested = True


stop_requested = False
signal.signal(signal.SIGTERM, request_stop)
signal.signal(signal.SIGINT, request_stop)
progress = tqdm(total=max_steps, initial=step, disable=not master, desc=args.method, dynamic_ncols=True)
while step < max_steps:
    lr = get_lr(step + 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_sums, step_rows = {}, []
    for micro in range(grad_accum):
        batch = next(data)
        # gradients are reduced across ranks on the last micro-step only; DDP's no_sync() covers forward and backward
        last = micro == grad_accum - 1
        if args.fsdp:
            policy.set_requires_gradient_sync(last)
        sync = policy.no_sync() if distributed and not args.fsdp and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                losses, metric_sums, n = forward(batch)
            (losses.mean() / grad_accum).backward()
        for k, v in metric_sums.items():
            step_sums[k] = step_sums.get(k, 0.0) + v.double()
        step_rows += batch["rows"]
        count += n
        tokens += batch["tokens"]
    step_sums = dict(zip(step_sums, torch.stack(list(step_sums.values())).tolist()))  # one host sync per step
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)  # the same on every rank
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    # one all-reduce a step: a non-finite loss on any rank? a stop signal on any rank? (every rank then acts alike)
    nonfinite_loss, stop = (v > 0 for v in all_reduce_sum([not math.isfinite(step_sums["loss"]), stop_requested]))
    if nonfinite_loss or not torch.isfinite(grad_norm):
        # never train on garbage: stop (or skip) with the step and the rows that produced it
        places = [rows[i]["where"] for i in step_rows]
        if distributed:  # every rank's rows, in every rank's message
            gathered = [None] * world_size
            dist.all_gather_object(gathered, places)
            places = sum(gathered, [])
        message = f"step {step + 1}: loss {step_sums['loss']:.4g}, gradient norm {grad_norm.item():.4g}; rows {places}"
        optimizer.zero_grad(set_to_none=True)
        count -= len(step_rows)
        if skipped < args.skip_nonfinite:
            skipped += 1
            log(f"warning: skipped {message} ({skipped} of at most {args.skip_nonfinite}, --skip_nonfinite)")
            continue
        save_checkpoint()  # the weights are still those of the last good step
        raise SystemExit(f"error: non-finite {message}. Saved the last good state; lower --lr, check those rows, "
                         "or pass --skip_nonfinite N.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step += 1
    for k, v in step_sums.items():
        sums[k] = sums.get(k, 0.0) + v
    grad_norms.append(grad_norm.item())
    progress.update(1)
    if step % args.eval_interval == 0 or step == max_steps:  # against the reference this step trained with
        eval_start = time.time()
        drift = evaluate()
        t0 += time.time() - eval_start  # tokens/s counts training time only

    # the paper's one line: every tau steps, theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    if moving_reference and should_update(step, tau):
        update_reference(reference, policy, alpha)
        ref_updates += 1
    if step % args.log_interval == 0 or step == max_steps:
        record = {"step": step, **all_reduce_mean(sums, count), "grad_norm": sum(grad_norms) / len(grad_norms),
                  "lr": lr, "tokens_per_s": all_reduce_sum([tokens])[0] / (time.time() - t0),
                  "ref_updates": ref_updates, "skipped_steps": skipped, "epoch": epoch, **drift}
        progress.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record.get('rewards/accuracies', 0):.2f}")
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        sums, count, grad_norms, tokens, t0 = {}, 0, [], 0, time.time()
    if (args.save_interval and step % args.save_interval == 0) or step == max_steps or stop:
        save_checkpoint()
    if stop:
        log(f"stopped by a signal after step {step}; continue with --resume --out_dir {args.out_dir}")
        break

progress.close()
# DDP replicas must end identical, bit for bit: the same averaged gradients, and each rank moved its reference alike
if distributed and not args.fsdp:
    digest = hashlib.sha256()
    for t in list(policy_raw.parameters()) + (list(reference.parameters()) if reference is not None else []):
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digests = [None] * world_size
    dist.all_gather_object(digests, digest.hexdigest())
    if len(set(digests)) > 1:
        raise SystemExit(f"error: the replicas diverged: parameter sha256 per rank {digests}")
    log(f"policy and reference sha256 {digests[0][:16]} identical on all {world_size} ranks")
if metrics_file:
    metrics_file.close()
if distributed:
    dist.destroy_process_group()
    # A gloo worker thread can still be releasing the last collective's tensors, which takes the GIL; once Python is
    # shutting down that aborts the process ("terminate called without an active exception", 1 run in 20 here). All is
    # saved and closed by now, so leave without the interpreter's shutdown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
