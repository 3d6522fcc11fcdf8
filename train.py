"""Train a policy with DPO, IPO or KTO, with the paper's moving reference (TR-DPO, TR-IPO, TR-KTO), or with SFT.

    python train.py                                    # TR-DPO, one epoch of the built-in demo set (SmolLM2-135M)
    torchrun --nproc_per_node 8 train.py --method tr_ipo --tau 512 --model EleutherAI/pythia-2.8b --dataset hh
    python train.py --resume --out_dir out/tr_dpo-demo # continue from the latest complete checkpoint

The same file runs under `python` (one process) and `torchrun` (DDP: NCCL on GPUs, gloo on CPUs; --fsdp: FSDP2).
It reads in the order a run happens: arguments, processes, data, models, one micro-batch, the loop.
"""
import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import signal
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
from data import DataError, batches, collate, load_splits, to_device, tokenize
from guards import report_user_errors
from losses import dpo_loss, ipo_loss, kto_loss
from memory import held_bytes, parameters
from model import DEFAULT_MODEL, load_model, load_tokenizer, sequence_logps
from ref_update import should_update, update_reference

# ----------------------------------------------------------------------------------------------------------------
# arguments: the defaults run the built-in demo; the README gives the paper's settings
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--method", default="tr_dpo", choices=["sft", "dpo", "ipo", "kto", "tr_dpo", "tr_ipo", "tr_kto"])
p.add_argument("--beta", type=float, default=0.1, help="KL strength of DPO/IPO/KTO (IPO's tau)")
p.add_argument("--alpha", type=float, default=None, help="TR: the policy's weight in each reference update. Alone: "
               "the paper's soft update, every step (tau 1). With --tau: that mix every tau steps (TRL's reading)")
p.add_argument("--tau", type=int, default=None, help="TR: update the reference every tau optimizer steps. Alone: the "
               "paper's hard update, a copy (alpha 1). Neither flag: --tau 16, sized for the demo (the paper: 512)")
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
p.add_argument("--warmup_steps", type=int, default=5, help="linear warm-up from 0, as transformers' schedules")
p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"], help="after warm-up")
p.add_argument("--weight_decay", type=float, default=0.0)
p.add_argument("--max_grad_norm", type=float, default=2.0)
p.add_argument("--batch_size", type=int, default=8, help="pairs per optimizer step, over all processes")
p.add_argument("--micro_batch_size", type=int, default=4, help="pairs per process per forward pass")
p.add_argument("--group_by_length", action="store_true", help="batch pairs of similar length (less padding)")
p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (unless --max_steps)")
p.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: as many as --epochs give)")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast; auto = bf16 on CUDA")
p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing of the policy (not the reference)")
p.add_argument("--fsdp", action="store_true", help="shard policy and reference with FSDP2 instead of replicating (DDP)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out_dir", default=None, help="where checkpoints and metrics go (default: out/METHOD-DATASET)")
p.add_argument("--overwrite", action="store_true", help="replace the run already in --out_dir")
p.add_argument("--resume", action="store_true", help="continue the run in --out_dir from its latest checkpoint")
p.add_argument("--log_interval", type=int, default=4, help="optimizer steps between log lines")
p.add_argument("--eval_interval", type=int, default=20, help="optimizer steps between evaluations on held-out pairs")
p.add_argument("--eval_pairs", type=int, default=64, help="held-out pairs for eval and drift from SFT; 0 = no eval")
p.add_argument("--save_interval", type=int, default=0, help="optimizer steps between checkpoints; 0 = only at the end")
p.add_argument("--skip_bad_rows", action="store_true", help="leave malformed rows of a JSONL file out (counted) "
               "instead of stopping; the hub sets always do")
p.add_argument("--skip_nonfinite", type=int, default=0, help="skip up to N steps whose loss or gradient is NaN/inf "
               "(counted); 0 = stop at the first, saving the last good state")
p.add_argument("--dist_timeout", type=int, default=1800, help="seconds a collective may wait for a rank that hangs")
args = p.parse_args()
report_user_errors()  # bad data, models or checkpoints: one sentence on stderr, not a traceback

# one parse of --method: the loss to use, and whether (and how) the reference moves
moving_reference = args.method.startswith("tr_")
base_method = args.method.removeprefix("tr_")
loss_fn = {"dpo": dpo_loss, "ipo": ipo_loss, "kto": kto_loss, "sft": None}[base_method]
if not moving_reference and (args.alpha is not None or args.tau is not None):
    p.error(f"--alpha/--tau move the reference, which only the TR methods do; use --method tr_{base_method}")
alpha = 1.0 if args.alpha is None else args.alpha  # --tau alone: the hard update, a copy
tau = args.tau if args.tau is not None else 1 if args.alpha is not None else 16  # --alpha alone: every step
if not 0 <= alpha <= 1:
    p.error(f"--alpha {alpha} must lie in [0, 1] (the weight of the policy in the reference update)")
if tau < 1:
    p.error(f"--tau {tau} must be at least 1 (the reference is updated every tau optimizer steps)")
if args.beta <= 0:
    p.error(f"--beta {args.beta} must be positive")
if args.max_steps is not None and args.max_steps < 1:
    p.error(f"--max_steps {args.max_steps} must be at least 1 (leave it out to train for --epochs)")
every = "every step" if tau == 1 else f"every {tau} steps"
rule = ("" if not moving_reference else f"hard update: reference <- policy {every}" if alpha == 1 else
        f"soft update every step: reference <- {alpha:g} policy + {1 - alpha:g} reference (lags the policy by "
        f"{(1 - alpha) / alpha:.3g} steps)" if tau == 1 and alpha > 0 else
        f"reference <- {alpha:g} policy + {1 - alpha:g} reference {every}")
out_dir = args.out_dir or os.path.join("out", f"{args.method}-{os.path.basename(args.dataset).removesuffix('.jsonl')}")

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
resume_from = checkpoint.prepare_out_dir(out_dir, args.resume, args.overwrite, master)  # one run per folder


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
eval_set = tokenize(eval_rows, tokenizer, args.max_length, args.max_prompt_length, log=log)
if distributed and master:
    dist.barrier()
steps_per_epoch = len(train_set) // args.batch_size
if steps_per_epoch == 0:
    raise DataError(f"{len(train_set)} training pairs cannot fill one batch of --batch_size {args.batch_size}")
max_steps = args.max_steps or args.epochs * steps_per_epoch
pad_id = tokenizer.pad_token_id
if moving_reference and (alpha == 0 or max_steps < tau):  # say it now, not after hours of training
    log(f"warning: the reference will never move ({'alpha is 0' if alpha == 0 else f'{max_steps} steps < tau {tau}'}):"
        f" this run is vanilla {base_method.upper()}, not {args.method.upper().replace('_', '-')}")

# ----------------------------------------------------------------------------------------------------------------
# models: the policy trains; the reference starts as an exact copy of it (the SFT model), in fp32: a soft update in
# bf16 stalls (ref_update.py), and under autocast a bf16 copy does not compute like its fp32 master (embeddings and
# norms run in its own dtype), so policy == reference would not give equal log-probs. Only under FSDP with bf16
# compute is a bf16 reference exact (fsdp.py), and there it saves 2 bytes/parameter/N where it is never mixed.
reference_dtype = (torch.bfloat16 if args.fsdp and use_bf16 and (alpha == 1 or not moving_reference)
                   else torch.float32)
if args.fsdp:  # sharded from the start: built on the meta device, then each rank gets only its shards (fsdp.py)
    import fsdp
    policy, reference = fsdp.build(args.model, device, use_bf16, args.grad_ckpt, args.seed,
                                   with_reference=base_method != "sft", master=master, reference_dtype=reference_dtype)
else:
    policy = load_model(args.model, seed=args.seed).to(device)
    reference = None if base_method == "sft" else copy.deepcopy(policy).requires_grad_(False)
    if args.grad_ckpt:  # recompute activations in backward: memory for compute; the reference has no backward
        policy.activation_checkpointing_enable({"use_reentrant": False})
        policy.train()  # HF checkpoints only in train mode; every dropout was set to 0 when loading
n_params = parameters(policy)
memory = {"after building the models": held_bytes(policy, reference)}  # with --fsdp: shards only, never a whole model

# The held-out pairs, split over the ranks. A rank with fewer pairs gets weight-0 copies to make up the difference:
# every rank runs the same number of forwards (under FSDP each forward is all-gathers that every rank must join),
# and the metrics stay exact means over the pairs actually scored.
per_rank = -(-len(eval_set) // world_size)
mine = eval_set[rank::world_size]
weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
mine = mine + eval_set[:1] * (per_rank - len(mine))
eval_batches = [(to_device(collate(mine[i: i + args.micro_batch_size], pad_id), device),
                 torch.tensor(weights[i: i + args.micro_batch_size], device=device))
                for i in range(0, per_rank, args.micro_batch_size)]


@torch.no_grad()
def all_logps(model):
    with autocast:
        return [sequence_logps(model, b) for b, _ in eval_batches]


# the SFT model's log-probs of the held-out pairs, computed once before any step (and before a resume loads its
# weights), so that the drift from it can be logged without a third model in memory
sft_logps = all_logps(policy)
if getattr(policy.config, "tie_word_embeddings", False):
    log("note: input and output embeddings are tied: one tensor, updated (and mixed into the reference) once")
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                              fused=device.type == "cuda")
run = {**vars(args), "alpha": alpha if moving_reference else None, "tau": tau if moving_reference else None}
progress = {"step": 0, "ref_updates": 0, "epoch": 0, "pairs_seen": 0, "skipped_steps": 0}
if resume_from:
    log(f"resuming from {resume_from}")
    progress = checkpoint.load(resume_from, policy, reference, optimizer, args.fsdp, run)
step, ref_updates, epoch, skipped = (progress[k] for k in ("step", "ref_updates", "epoch", "skipped_steps"))
micro_step = progress["pairs_seen"] // (args.micro_batch_size * world_size)  # the data position, on any world size
start_step = step

policy_raw = policy
if distributed and not args.fsdp:  # gradients as views into DDP's buckets: no second copy of every gradient
    policy = DDP(policy, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)


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
        with torch.no_grad():  # KTO's reference point z is detached, so its forward passes need no graph
            # KL(pi || ref) estimated on mismatched (prompt, completion) pairs, one estimate for the global batch
            kl = (sequence_logps(policy_raw, batch["kl"]) - sequence_logps(reference, batch["kl"])).mean()
            if distributed:
                dist.all_reduce(kl)
                kl = kl / world_size
        desirable = torch.arange(len(policy_logps), device=device) < len(policy_logps) // 2  # the chosen rows
        losses, rewards = kto_loss(policy_logps, ref_logps, desirable, kl, args.beta, args.kto_lambda_d,
                                   args.kto_lambda_u)
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


def all_reduce_sum(t):
    if distributed:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def evaluate():
    """Held-out pairs against the (moving) reference, and the drift of the policy from the original SFT model."""
    if not eval_batches:
        return {}
    sums = {}
    refs = all_logps(reference) if reference is not None else sft_logps
    for pol, sft, ref, (_, w) in zip(all_logps(policy_raw), sft_logps, refs, eval_batches):
        (pc, pr), (sc, sr), (rc, rr) = pol.chunk(2), sft.chunk(2), ref.chunk(2)
        m = {"eval/rewards/accuracies": ((pc - rc) > (pr - rr)).float(),
             "eval/rewards/margins": args.beta * ((pc - rc) - (pr - rr)),
             "drift/chosen": pc - sc, "drift/rejected": pr - sr,  # log pi - log pi_SFT on held-out completions
             "drift/accuracies": ((pc - sc) > (pr - sr)).float()}  # implicit-reward accuracy against the SFT model
        for k, v in m.items():
            sums[k] = sums.get(k, 0) + (v.double() * w).sum()  # padding copies weigh 0
    totals = all_reduce_sum(torch.stack(list(sums.values()))).tolist()  # one read for the whole evaluation
    return {"eval/step": step, **{k: v / len(eval_set) for k, v in zip(sums, totals)}}


# ----------------------------------------------------------------------------------------------------------------
# the loop
def get_lr(step):
    """The lr of optimizer step `step` (from 1) exactly as transformers' get_{constant,linear,cosine}_schedule_with_
    warmup give it: they have taken step - 1 scheduler steps by then, so a warm-up starts at lr 0. A pure function of
    the step, so the step is the schedule's whole state."""
    s = step - 1
    if s < args.warmup_steps:
        return args.lr * s / max(1, args.warmup_steps)
    progress = (s - args.warmup_steps) / max(1, max_steps - args.warmup_steps)
    return args.lr * {"constant": 1.0, "linear": max(0.0, 1 - progress),
                      "cosine": max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))}[args.schedule]


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


def save():
    progress = {"step": step, "ref_updates": ref_updates, "epoch": epoch, "skipped_steps": skipped, "run": run,
                "pairs_seen": micro_step * args.micro_batch_size * world_size}  # in this epoch, on all ranks
    final = checkpoint.save(out_dir, policy_raw, reference if moving_reference else None, optimizer, tokenizer,
                            progress, args.fsdp, master)
    log(f"saved {final}")
    return final


def report_memory(when):
    """Bytes each rank holds, by role, per parameter of the model: in the log and in out_dir/memory.json."""
    memory[when] = held_bytes(policy_raw, reference, optimizer, policy if isinstance(policy, DDP) else None)
    every = [None] * world_size
    if distributed:
        dist.all_gather_object(every, memory)
    else:
        every = [memory]
    if master:
        json.dump({"parameters": n_params, "ranks": every}, open(os.path.join(out_dir, "memory.json"), "w"), indent=1)
        for name in (["after building the models"] if len(memory) == 2 else []) + [when]:
            log(f"memory {name}, rank 0, bytes per parameter: " + ", ".join(
                f"{k} {v / n_params:.2f}" for k, v in memory[name].items()) +
                f" = {sum(memory[name].values()) / n_params:.2f}")


metrics_file = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None
log(f"{args.method}: {len(train_set)} pairs, {max_steps} steps of {args.batch_size} pairs ({world_size} "
    f"process{'es' if world_size > 1 else ''} x {args.micro_batch_size} x {grad_accum} accumulation), device {device}, "
    f"{'bf16 autocast' if use_bf16 else 'fp32'}{', FSDP2' if args.fsdp else ''}" + (f"; {rule}" if rule else "") +
    (f"; reference in {str(reference_dtype).removeprefix('torch.')}" if reference is not None else "") +
    f"; out_dir {out_dir}")
if master and not args.resume:
    json.dump(run, open(os.path.join(out_dir, "args.json"), "w"), indent=1)  # alpha and tau as in force
data = micro_batches()
sums, count, grad_norms, tokens, t0 = {}, 0, [], 0, time.time()
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
bar = tqdm(total=max_steps, initial=step, disable=not master, desc=args.method, dynamic_ncols=True)
while step < max_steps:
    lr = get_lr(step + 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    step_sums, step_rows, step_pairs, step_tokens = {}, [], 0, 0
    for micro in range(grad_accum):
        batch = next(data)
        # DDP all-reduces gradients on the last micro-step only (no_sync() covers forward and backward). FSDP
        # reduce-scatters every micro-step, so gradients stay sharded: 4 bytes/parameter less, more communication.
        last = micro == grad_accum - 1
        sync = policy.no_sync() if distributed and not args.fsdp and not last else contextlib.nullcontext()
        with sync:
            with autocast:
                losses, metric_sums, n = forward(batch)
            (losses.mean() / grad_accum).backward()
        if step == start_step and micro == 0 and grad_accum > 1:  # mid-accumulation: are the gradients still sharded?
            report_memory("after the first backward")
        for k, v in metric_sums.items():
            step_sums[k] = step_sums.get(k, 0) + v.double()
        step_rows += batch["rows"]
        step_pairs += n
        step_tokens += batch["tokens"]
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm)  # the same on every rank
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    # One all-reduce and one read a step, for everything: every rank's metric sums, pairs, tokens, the gradient norm
    # and whether a rank got a stop signal. The read is the step's one host sync, before optimizer.step(): a
    # non-finite step must never be applied.
    host = to_device(torch.tensor([step_pairs, step_tokens, stop_requested], dtype=torch.float64), device)
    totals = all_reduce_sum(torch.cat([torch.stack(list(step_sums.values())),
                                       grad_norm.double().reshape(1) / world_size, host])).tolist()
    *metric_totals, grad_norm, step_pairs, step_tokens, stop = totals
    step_metrics = dict(zip(step_sums, metric_totals))
    if not (math.isfinite(step_metrics["loss"]) and math.isfinite(grad_norm)):
        # never train on garbage: stop (or skip) with the step and the rows that produced it
        places = [rows[i]["where"] for i in step_rows]
        if distributed:  # every rank's rows, in every rank's message
            gathered = [None] * world_size
            dist.all_gather_object(gathered, places)
            places = sum(gathered, [])
        message = f"step {step + 1}: loss {step_metrics['loss']:.4g}, gradient norm {grad_norm:.4g}; rows {places}"
        optimizer.zero_grad(set_to_none=True)
        if skipped < args.skip_nonfinite:
            skipped += 1
            log(f"warning: skipped {message} ({skipped} of at most {args.skip_nonfinite}, --skip_nonfinite)")
            continue
        save()  # the weights are still those of the last good step
        raise SystemExit(f"error: non-finite {message}. Saved the last good state; lower --lr, check those rows, "
                         "or pass --skip_nonfinite N.")
    optimizer.step()
    if step == start_step:  # after this process's first step: gradients and optimizer state exist now
        report_memory("after the first step")
    optimizer.zero_grad(set_to_none=True)
    step += 1
    for k, v in step_metrics.items():
        sums[k] = sums.get(k, 0.0) + v
    count, tokens = count + step_pairs, tokens + step_tokens
    grad_norms.append(grad_norm)
    bar.update(1)
    if step % args.eval_interval == 0 or step == max_steps:  # against the reference this step trained with
        eval_start = time.time()
        drift = evaluate()
        t0 += time.time() - eval_start  # tokens/s counts training time only

    # the paper's one line: every tau steps, theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    if moving_reference and should_update(step, tau):
        update_reference(reference, policy, alpha)
        ref_updates += 1
        if tau > 1:  # (every step with tau 1: the log lines' ref_updates count them)
            log(f"step {step}: reference updated ({ref_updates} so far): " + ("a copy of the policy" if alpha == 1
                                                                               else f"alpha {alpha:g}"))
    if step % args.log_interval == 0 or step == max_steps:
        record = {"step": step, **{k: v / count for k, v in sums.items()},
                  "grad_norm": sum(grad_norms) / len(grad_norms), "lr": lr,
                  "tokens_per_s": tokens / (time.time() - t0), "ref_updates": ref_updates, "skipped_steps": skipped,
                  "epoch": epoch, **drift}
        bar.set_postfix(loss=f"{record['loss']:.3f}", acc=f"{record.get('rewards/accuracies', 0):.2f}")
        log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        if master:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
        sums, count, grad_norms, tokens, t0 = {}, 0, [], 0, time.time()
    if (args.save_interval and step % args.save_interval == 0) or step == max_steps or stop:
        last_checkpoint = save()
    if stop:
        log(f"stopped by a signal after step {step}; continue with --resume --out_dir {out_dir}")
        break

bar.close()
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
if step == max_steps:  # what happened, and what to do next
    moved = (f"{ref_updates} reference update(s) ({rule})" if moving_reference else "the reference never moved")
    log(f"\ndone: {step} steps, {moved}; checkpoint {last_checkpoint}")
    if drift:
        log(f"held-out pairs ({len(eval_set)}): reward accuracy {drift['eval/rewards/accuracies']:.3f} against the "
            f"reference it trained with, {drift['drift/accuracies']:.3f} against the SFT model; log-prob drift from "
            f"SFT: chosen {drift['drift/chosen']:+.2f}, rejected {drift['drift/rejected']:+.2f} nats")
    log(f"next: python plot.py {out_dir}   (the curves, with the reference updates marked)\n"
        f"      python evaluate.py {out_dir}/step_* --baseline {args.model}   (samples: win rate, KL to SFT)")
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
