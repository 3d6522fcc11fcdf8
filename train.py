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
import math
import os
import time
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import checkpoint
import fsdp
import guards
import memory
from data import Batches, collate, fingerprint, held_out_batches, to_device, tokenize
from flags import at_least, positive, random_seed, run_length, text
from identity import model_fingerprint
from losses import METHODS, as_read, reduction
from locate import DEFAULT_MODEL
from model import check_model_flags, load_model, load_tokenizer, sequence_logps
from ref_update import Rule
from sources import DataError, load_splits, skips_bad_rows

# ----------------------------------------------------------------------------------------------------------------
# arguments: the defaults run the built-in demo; the README gives the paper's settings
p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--method", default="tr_dpo", choices=["sft", *METHODS, *(f"tr_{m}" for m in METHODS)])
p.add_argument("--beta", type=positive(), default=0.1, help="KL strength of DPO/IPO/KTO (IPO's tau)")
Rule.add_flags(p)  # --alpha, --tau: the reference rule's own flags (ref_update.py)
p.add_argument("--ipo_average", action="store_true", help="IPO on per-token mean log-probs (TRL) instead of sums")
for method_flags in (flags for *_, flags in METHODS.values()):  # each loss's own options (losses.METHODS)
    for name, (default, domain, meaning) in method_flags.items():
        p.add_argument(f"--{name}", type=domain, default=default, help=meaning)
p.add_argument("--model", type=text("a model"), default=DEFAULT_MODEL, help="HF id, local folder, config.json, or "
               "the built-in default")
p.add_argument("--dataset", type=text("a data set"), default="demo", help="demo | hh | tldr | ultrafeedback | "
               "PATH.jsonl")
p.add_argument("--data_dir", type=text("a folder"), default=None, help="an offline copy of the hh/tldr/ultrafeedback "
               "hub repository (a folder in the hub's layout), read instead of the hub")
p.add_argument("--max_length", type=at_least(2), default=512, help="tokens of prompt + completion")
p.add_argument("--max_prompt_length", type=at_least(1), default=256, help="prompt tokens kept when a pair must be cut "
               "(less than --max_length)")
p.add_argument("--lr", type=positive(), default=1e-5)
p.add_argument("--warmup_steps", type=at_least(0), default=5, help="linear warm-up from 0, as transformers' schedules")
run_length(p.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"],
                          help="after warm-up"), when=lambda schedule: schedule != "constant")  # decays over the run
p.add_argument("--weight_decay", type=at_least(0.0), default=0.0)
p.add_argument("--max_grad_norm", type=at_least(0.0, zero="no clipping"), default=2.0,
               help="clip the gradient's norm to this; 0 = no clipping (as transformers' Trainer)")
p.add_argument("--batch_size", type=at_least(1), default=8, help="pairs per optimizer step, over all processes")
p.add_argument("--micro_batch_size", type=at_least(1), default=4, help="pairs per process per forward pass")
p.add_argument("--group_by_length", action="store_true", help="batch pairs of similar length (less padding)")
p.add_argument("--epochs", type=at_least(1), default=1, help="passes over the training pairs (unless --max_steps)")
p.add_argument("--max_steps", type=at_least(1), default=None, help="optimizer steps (default: as many as --epochs "
               "give)")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast; auto = bf16 on CUDA where "
               "supported (the run keeps the one in force: a resume must find the same)")
p.add_argument("--grad_ckpt", action="store_true", help="gradient checkpointing of the policy (not the reference)")
p.add_argument("--fsdp", action="store_true", help="shard policy and reference with FSDP2 instead of replicating (DDP)")
p.add_argument("--seed", type=random_seed(), default=0)
p.add_argument("--out_dir", type=text("a folder"), default=None, help="where checkpoints and metrics go (default: "
               "out/METHOD-DATASET)")
p.add_argument("--overwrite", action="store_true", help="replace the run already in --out_dir")
p.add_argument("--resume", nargs="?", const=True, default=False, choices=["auto"], metavar="auto",
               help="continue the run in --out_dir from its latest checkpoint; `--resume auto`: or start it if it has "
               f"none (one command for a requeue loop). Only these flags may differ from the run's: "
               f"{', '.join(checkpoint.MAY_CHANGE)}; --max_steps not where a flag ties the run to its length (e.g. a "
               "decaying --schedule)")
p.add_argument("--log_interval", type=at_least(0, zero="the first and last step only"), default=4,
               help="optimizer steps between log lines (and step 1); 0 = the first and last step only")
p.add_argument("--eval_interval", type=at_least(0, zero="at the end only"), default=20,
               help="optimizer steps between evaluations on held-out pairs; 0 = at the end only")
p.add_argument("--eval_pairs", type=at_least(0, zero="no eval"), default=64, help="held-out pairs for eval and drift "
               "from SFT; 0 = no eval")
p.add_argument("--save_interval", type=at_least(0, zero="at the end only"), default=0,
               help="optimizer steps between checkpoints; 0 = only at the end")
p.add_argument("--skip_bad_rows", action="store_true", help="leave bad rows of a JSONL file (malformed, or refused "
               "by the chat template) out, counted, instead of stopping; the hub sets always do")
p.add_argument("--skip_nonfinite", type=at_least(0, zero="stop at the first"), default=0, help="skip up to N steps "
               "whose loss or gradient is NaN/inf (counted); 0 = stop at the first, saving the last good state")
p.add_argument("--dist_timeout", type=at_least(1), default=1800, help="seconds a collective may wait for a rank that "
               "hangs")
p.add_argument("--wandb", type=text("a project name"), default=None, metavar="PROJECT", help="also log to Weights & "
               "Biases (imported only then)")
args = p.parse_args()
guards.report_user_errors()  # bad data, models or checkpoints: one sentence on stderr, not a traceback

# the method, parsed once: its loss (losses.METHODS) and how it reads log-probs, and the reference rule
# (ref_update.Rule), or None if it is fixed
method = args.method.removeprefix("tr_")
loss_fn, pairing, _, own_flags = METHODS.get(method, (None, None, None, {}))
reading = reduction(vars(args))  # "sum" or per-token "mean": how the loss reads log-probs (its METHODS entry)
rule = Rule.of_args(p, args)  # None: the reference never moves
guards.check_flags(p, args, method)  # values no run can use together: refused now, before anything loads
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
torch.manual_seed(args.seed)  # a config-built model's random init; nothing else draws random numbers
check_model_flags(p, args)  # a model that cannot be found or read, or flags it cannot take, stop here
model_sha256 = model_fingerprint(args.model, seed=args.seed)  # what the run starts from
resume_from = checkpoint.prepare_out_dir(out_dir, args)  # one run per folder (deletes nothing)
state = checkpoint.read_progress(resume_from) if resume_from else None  # memory-mapped, loaded below


def log(message):
    if master:
        tqdm.write(message)


# ----------------------------------------------------------------------------------------------------------------
# data: rank 0 tokenizes first and caches the tokens, the other ranks read them. The eval pairs are held out (prompts
# never trained on: sources.load_splits), the same pairs for every run whatever its --seed: runs compare on them
tokenizer = load_tokenizer(args.model, log=log)
with guards.rank_zero_first():  # bad data stops rank 0 with its message; the other ranks then exit quietly
    rows, eval_rows = load_splits(args.dataset, args.eval_pairs, skip_bad_rows=args.skip_bad_rows, log=log,
                                  data_dir=args.data_dir)
    skip = skips_bad_rows(args.dataset, args.skip_bad_rows)  # rows the chat template refuses are bad rows too
    train_set = tokenize(rows, tokenizer, args.max_length, args.max_prompt_length, log=log, skip_bad_rows=skip)
    eval_set = tokenize(eval_rows, tokenizer, args.max_length, args.max_prompt_length, log=log, skip_bad_rows=skip)
    batches = Batches(train_set, args.batch_size, args.micro_batch_size, rank, world_size, args.seed,
                      args.group_by_length)
    if batches.per_epoch == 0:
        raise DataError(f"{len(train_set)} training pairs cannot fill one batch of --batch_size {args.batch_size}")
    max_steps = args.max_steps or args.epochs * batches.per_epoch
    rule = rule and rule.over(max_steps)  # the rule knows the run's length from here on
    run = {**vars(args), **(rule.in_force() if rule else dict.fromkeys(Rule.FLAGS)), "max_steps": max_steps,
           "dtype": "bf16" if use_bf16 else "fp32"}  # as in force: what --dtype auto, --alpha, --tau chose here
    data_sha256 = fingerprint(train_set + eval_set)  # the pairs themselves: a resume must train and evaluate on them
    if state:  # a resume continues the same run, on the same pairs, or stops here, before any model loads
        checkpoint.check_resume(state, run, p, data_sha256, resume_from, model_sha256)
if state and checkpoint.finished(out_dir, max_steps):  # --resume auto of a finished run: done
    log(f"{out_dir} is complete: step {state['step']} of {max_steps}; nothing to do")
    guards.finish()
if args.warmup_steps >= max_steps:
    log(f"warning: --warmup_steps {args.warmup_steps} >= the run's {max_steps} steps: the lr never reaches --lr")
moves, why = rule.moves() if rule else (True, "")
if not moves:  # say it now, not after hours of training
    log(f"warning: the reference will never move ({why}): this run is vanilla {method.upper()}, not "
        f"{args.method.upper().replace('_', '-')}")

# ----------------------------------------------------------------------------------------------------------------
# models: the policy trains; the reference starts as an exact copy of it (the SFT model), in fp32: a soft update in
# bf16 stalls (ref_update.py), and under autocast a bf16 copy does not compute like its fp32 master (embeddings and
# norms run in its own dtype), so policy == reference would not give equal log-probs. Only under FSDP with bf16
# compute is a bf16 reference exact (fsdp.py), and there it saves 2 bytes/parameter/N where it is never mixed.
reference_dtype = torch.bfloat16 if args.fsdp and use_bf16 and not (rule and rule.mixes) else torch.float32
if args.fsdp:  # sharded from the start: built on the meta device, then each rank gets only its shards (fsdp.py)
    policy, reference = fsdp.build(args.model, device, use_bf16, args.grad_ckpt, args.seed,
                                   with_reference=method != "sft", master=master, reference_dtype=reference_dtype)
else:
    policy = load_model(args.model, seed=args.seed).to(device)
    reference = None if method == "sft" else copy.deepcopy(policy).requires_grad_(False)
    if args.grad_ckpt:  # recompute activations in backward: memory for compute; the reference has no backward
        policy.activation_checkpointing_enable({"use_reentrant": False})
        policy.train()  # HF checkpoints only in train mode; every dropout was set to 0 when loading
if not resume_from:  # everything that can fail before training has passed: only now may an old run be deleted
    checkpoint.clear_out_dir(out_dir, run, p, master)  # and writes its args.json
metrics = checkpoint.Metrics(out_dir, run, args.wandb, master, state)  # metrics.jsonl, and W&B with --wandb
report_memory = memory.Report(out_dir, memory.count_parameters(policy), log, state and state["step"])
report_memory("after building the models", policy, reference)  # with --fsdp: shards only, never a whole model
if getattr(policy.config, "tie_word_embeddings", False):
    log("note: input and output embeddings are tied: one tensor, updated (and mixed into the reference) once")

eval_batches = [(to_device(batch, device), weights.to(device)) for batch, weights in  # this rank's share, padded
                held_out_batches(eval_set, rank, world_size, args.micro_batch_size, tokenizer.pad_token_id)]


@torch.no_grad()
def held_out_logps(model):
    """Summed log-probs of every held-out batch's rows (chosen, then rejected)."""
    with autocast:
        logps = [sequence_logps(model, b) for b, _ in eval_batches]
    fsdp.reshard(model)  # a forward without backward: give back the gathered root
    return logps


# the SFT model's log-probs of the held-out pairs, computed once before any step (and before a resume loads its
# weights), so that the drift from it can be logged without a third model in memory
sft_logps = held_out_logps(policy)
optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                              fused=device.type == "cuda")
step, ref_updates, skipped = 0, 0, 0  # optimizer steps done, reference updates, non-finite steps skipped
if state:
    log(f"resuming from {resume_from}")
    step, ref_updates, skipped = checkpoint.load(resume_from, policy, reference, optimizer, args.fsdp, state)
    del state  # no second copy of the optimizer state or reference stays behind
start_step = step

policy_raw = policy
if distributed and not args.fsdp:  # gradients as views into DDP's buckets: no second copy of every gradient
    for param in policy.parameters():  # gradients that exist when DDP starts become bucket views, and stay so
        param.grad = torch.zeros_like(param)
    policy = DDP(policy, device_ids=[local_rank] if device.type == "cuda" else None, gradient_as_bucket_view=True)
ddp = policy if isinstance(policy, DDP) else None


# ----------------------------------------------------------------------------------------------------------------
# one micro-batch: per-pair losses and the metrics TRL users know (metrics.py: every logged key and what it means)
def prepare(micro_batch):
    """(pair, neighbour) list -> tensors on the device; each row's place and the token count read on the host."""
    examples, neighbours = zip(*micro_batch)
    batch = collate(examples, tokenizer.pad_token_id, method, args.max_length, neighbours)
    places = [rows[i]["where"] for i in batch.pop("rows").tolist()]
    tokens = int(batch["attention_mask"].sum()) + (int(batch["kl"]["attention_mask"].sum()) if "kl" in batch else 0)
    return {**to_device(batch, device), "places": places, "tokens": tokens}


@torch.no_grad()
def kto_kl(micro_batches):
    """KTO's reference point: KL(pi || ref) estimated once per optimizer step, the mean of log pi - log ref over the
    mismatched pairs of the whole global batch (every micro-batch of every rank), the same on any layout. The
    unwrapped policy: no gradient flows here, so none of DDP's bookkeeping (or buffer broadcast) is needed."""
    with autocast:
        total = sum((sequence_logps(policy_raw, b["kl"]) - sequence_logps(reference, b["kl"])).sum()
                    for b in micro_batches)
    fsdp.reshard(policy_raw)
    if distributed:
        dist.all_reduce(total)
    return total / (sum(len(b["kl"]["input_ids"]) for b in micro_batches) * world_size)  # each rank has as many


def losses_and_metrics(batch, kl, sft_tokens):
    """(per-pair losses, metric sums over the pairs). The sums stay on the device: reading them (.item()) here would
    make the CPU wait for the GPU before it can queue the backward pass."""
    if method == "sft":  # next-token NLL of the chosen completions, the mean over every completion token of the global
        logps = sequence_logps(policy, batch)  # batch (as transformers and TRL): the mean of these pair losses over
        losses = -logps * args.batch_size / sft_tokens  # the global batch's pairs, which the loop takes, is that mean
        return losses, {"loss": losses.detach().sum(), "logps/chosen": logps.detach().sum()}
    policy_logps = sequence_logps(policy, batch, reading == "mean")  # (2B,): chosen rows first, then rejected
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch, reading == "mean")
    own = {name: getattr(args, name) for name in own_flags}  # the loss's own options, e.g. --kto_lambda_d
    if pairing == "paired":
        losses, chosen_rewards, rejected_rewards = loss_fn(*policy_logps.chunk(2), *ref_logps.chunk(2), args.beta,
                                                           **own)
    else:  # KTO: 2B unpaired examples, the chosen ones desirable; a pair's loss is the mean of its two examples'
        desirable = torch.arange(len(policy_logps), device=device) < len(policy_logps) // 2
        losses, rewards = loss_fn(policy_logps, ref_logps, desirable, kl, args.beta, **own)
        (chosen_rewards, rejected_rewards), losses = rewards.chunk(2), losses.view(2, -1).mean(0)
    logps_chosen, logps_rejected = policy_logps.detach().chunk(2)
    return losses, {"loss": losses.detach().sum(), "rewards/chosen": chosen_rewards.sum(),
                    "rewards/rejected": rejected_rewards.sum(),
                    "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
                    "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
                    "logps/chosen": logps_chosen.sum(), "logps/rejected": logps_rejected.sum(),
                    **({"kl": kl * len(losses)} if kl is not None else {})}


def sum_over_ranks(device_sums, host_counts, grad_norm):
    """One all-reduce and one read from the device for the whole step: every rank's metric sums and counts, then
    the gradient norm (clipping computed it over all ranks already). The read is the step's one host sync, before
    optimizer.step(): a non-finite step must never be applied."""
    host = to_device(torch.tensor(list(host_counts.values()), dtype=torch.float64), device)
    totals = torch.cat([torch.stack(list(device_sums.values())).double(), host])
    if distributed:
        dist.all_reduce(totals)
    values = torch.cat([totals, grad_norm.double().reshape(1)]).tolist()
    return dict(zip([*device_sums, *host_counts, "grad_norm"], values))


@torch.no_grad()
def held_out_metrics():
    """Held-out pairs against the (moving) reference; the drift from the original SFT model of the policy and of
    the reference (the centre of the trust region), in summed nats. Margins are on training's scale (the method's
    reduction: per-token means where it reads them)."""
    if not eval_batches:
        return {}
    sums = {}
    refs = held_out_logps(reference) if reference is not None else sft_logps
    for pol, sft, ref, (batch, w) in zip(held_out_logps(policy_raw), sft_logps, refs, eval_batches):
        (pc, pr), (sc, sr), (rc, rr) = pol.chunk(2), sft.chunk(2), ref.chunk(2)
        (hc, hr), (gc, gr) = (as_read(x, batch["loss_mask"], reading).chunk(2) for x in (pol, ref))  # as training
        m = {"eval/rewards/accuracies": ((hc - gc) > (hr - gr)).float(),
             "eval/rewards/margins": args.beta * ((hc - gc) - (hr - gr)),
             "drift/chosen": pc - sc, "drift/rejected": pr - sr,  # log pi - log pi_SFT on held-out completions
             "drift/accuracies": ((pc - sc) > (pr - sr)).float(),  # implicit-reward accuracy against the SFT model
             "drift/reference_chosen": rc - sc, "drift/reference_rejected": rr - sr}  # log ref - log pi_SFT
        for k, v in m.items():
            sums[k] = sums.get(k, 0) + (v.double() * w).sum()  # padding copies weigh 0
    totals = torch.stack(list(sums.values()))
    if distributed:
        dist.all_reduce(totals)
    return {"eval/step": step, **{k: v / len(eval_set) for k, v in zip(sums, totals.tolist())}}  # one read


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


def write_record():
    """The log record of the steps since the last one: means over those steps and all ranks, and the latest held-out
    metrics. At every log step, and before every checkpoint: a run stopped or killed after it loses no step's."""
    global since_log, logged_step, t0, applied
    if step == logged_step:
        return
    n, tokens, grad_norms = step - logged_step, since_log.pop("tokens"), since_log.pop("grad_norm")
    record = {"step": step, **{k: v / (n * args.batch_size) for k, v in since_log.items() if k != "stop"},
              "grad_norm": grad_norms / n, "lr": get_lr(step), "tokens_per_s": tokens / (time.time() - t0),
              "ref_updates": ref_updates, **applied, "skipped_steps": skipped,
              "epoch": (step + skipped - 1) // batches.per_epoch, **held_out}
    log(" ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                 if not isinstance(v, list)))  # the updates' list: metrics.jsonl only
    bar.set_postfix(loss=f"{record['loss']:.3f}")
    metrics.write(record)
    since_log, logged_step, t0, applied = {}, step, time.time(), {}


def save():
    write_record()  # the steps since the last record: a resume from this checkpoint would never log them
    stop.saving = True  # a second Ctrl-C must not abort a half-written checkpoint
    progress = {"step": step, "ref_updates": ref_updates, "skipped_steps": skipped, "data_sha256": data_sha256,
                "model_sha256": model_sha256, "run": run, "wandb_id": metrics.wandb_id}
    final = checkpoint.save(out_dir, policy_raw, reference if rule else None, optimizer, tokenizer, progress,
                            args.fsdp, master)
    stop.saving = False
    log(f"saved {final}")
    return final


log(f"{args.method}: {len(train_set)} pairs ({len(train_set) % args.batch_size} left over each epoch), {max_steps} "
    f"steps of {args.batch_size} pairs ({world_size} process{'es' if world_size > 1 else ''} x "
    f"{args.micro_batch_size} x {grad_accum} accumulation), device {device}, {'bf16 autocast' if use_bf16 else 'fp32'}"
    f"{', FSDP2' if args.fsdp else ''}" + (f"; {rule}" if rule else "") +
    (f"; reference in {str(reference_dtype).removeprefix('torch.')}" if reference is not None else "") +
    f"; out_dir {out_dir}")

# ----------------------------------------------------------------------------------------------------------------
# the loop
since_log, logged_step, t0, applied = {}, step, time.time(), {}  # sums, and the updates applied, since the last line
held_out = held_out_metrics()
stop = guards.StopSignals(under_torchrun=distributed)  # SIGTERM/Ctrl-C: finish the step, save, exit
bar = tqdm(total=max_steps, initial=step, disable=not master, desc=args.method, dynamic_ncols=True)
while step < max_steps:
    lr = get_lr(step + 1)
    for group in optimizer.param_groups:
        group["lr"] = lr
    micro_batches = [prepare(m) for m in batches(step + skipped)]  # this rank's share of the next global batch
    kl = kto_kl(micro_batches) if method == "kto" else None  # KTO's reference point: one estimate for the step
    sft_tokens = sum(len(pair["chosen"]) for pair in batches.pairs(step + skipped))  # every rank's, on the host
    step_sums = {}
    for i, batch in enumerate(micro_batches):
        # DDP all-reduces gradients on the last micro-step only (no_sync() covers forward and backward). FSDP
        # reduce-scatters every micro-step, so gradients stay sharded: 4 bytes/parameter less, more communication.
        with ddp.no_sync() if ddp and i < grad_accum - 1 else contextlib.nullcontext():
            with autocast:
                losses, metric_sums = losses_and_metrics(batch, kl, sft_tokens)
            (losses.mean() / grad_accum).backward()
        if i == 0 and grad_accum > 1 and step - start_step < 2:  # mid-accumulation, before and after a zero_grad:
            report_memory(f"after the first backward of step {step + 1}",  # still sharded, or views?
                          policy_raw, reference, optimizer, ddp)
        step_sums = {k: step_sums.get(k, 0) + v.double() for k, v in metric_sums.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), args.max_grad_norm or math.inf)  # 0: the norm only
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    totals = sum_over_ranks(step_sums, {"tokens": sum(b["tokens"] for b in micro_batches), "stop": stop.requested},
                            grad_norm)
    places = [where for b in micro_batches for where in b["places"]]
    if guards.check_finite(step + 1, totals, places, skipped, args.skip_nonfinite, save, log):
        skipped += 1  # the weights stay those of the last good step; the next step takes the next batch
        optimizer.zero_grad(set_to_none=ddp is None)
        continue
    optimizer.step()
    if step == start_step:  # after this process's first step: gradients and optimizer state exist now
        report_memory("after the first step", policy_raw, reference, optimizer, ddp)
    optimizer.zero_grad(set_to_none=ddp is None)  # under DDP the gradients stay views into its buckets
    step += 1
    bar.update(1)
    since_log = {k: since_log.get(k, 0.0) + v for k, v in totals.items()}
    if step % (args.eval_interval or max_steps) == 0 or step == max_steps:  # against the reference it trained with
        eval_start = time.time()
        held_out = held_out_metrics()
        t0 += time.time() - eval_start  # tokens/s counts training time only

    # the paper's one line: every tau steps, theta_ref <- alpha * theta + (1 - alpha) * theta_ref (ref_update.py),
    # each update applied recorded in the next log record (`applied`): what plot.py and evaluate.py draw
    ref_updates += rule.apply(step, reference, policy, applied, log) if rule else 0
    if step % (args.log_interval or max_steps) == 0 or step in (1, max_steps):  # means since the last line, all ranks
        write_record()
    if (args.save_interval and step % args.save_interval == 0) or step == max_steps or totals["stop"]:
        last_checkpoint = save()
    if totals["stop"]:
        log(f"stopped by a signal after step {step}; continue with --resume --out_dir {out_dir}")
        break

bar.close()
if ddp:
    guards.check_replicas([policy_raw, reference], log)
if step == max_steps:  # what happened, and what to do next
    moved = f"{ref_updates} reference update(s) ({rule})" if rule else "the reference never moved"
    log(f"\ndone: {step} steps, {moved}; checkpoint {last_checkpoint}")
    if held_out:
        log(f"held-out pairs ({len(eval_set)}): reward accuracy {held_out['eval/rewards/accuracies']:.3f} against the "
            f"reference it trained with, {held_out['drift/accuracies']:.3f} against the SFT model; log-prob drift from "
            f"SFT: chosen {held_out['drift/chosen']:+.2f}, rejected {held_out['drift/rejected']:+.2f} nats")
    log(f"next: python plot.py {out_dir}   (the curves, with the reference updates marked)\n"
        f"      python evaluate.py {out_dir}/step_* --baseline {args.model}   (samples: win rate, KL to SFT)")
metrics.close()
guards.finish(0 if step == max_steps else guards.STOPPED)  # stopped early: STOPPED, resumable (not 0)
