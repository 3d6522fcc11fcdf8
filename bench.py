"""Benchmark TR-DPO training steps (step time, tokens/s, MFU, peak memory, cost of the reference update), optionally
against TRL's DPOTrainer on the identical workload. Prints figures; it is not a test.

On one H100 (the default workload: Pythia-1.4B shape from its config, random init and random token ids, 8 pairs of
128 prompt + 384 completion tokens, bf16 autocast over fp32 weights, gradient checkpointing of the policy):

    python bench.py               # ours alone
    python bench.py --vs-trl      # then TRL in the same process (`pip install trl`: benchmark-only; tried with 1.16.0)

Targets on one H100: >= 1.3x TRL's tokens/s, <= TRL's peak memory, MFU >= 40%, soft update < 2% of the step time.
Check the code path on a CPU first:  python bench.py --tiny --steps 3 --vs-trl
"""
import argparse
import copy
import gc
import importlib.util
import os
import resource
import statistics
import tempfile
import time
import warnings

import torch
from transformers import GPTNeoXConfig

from flags import at_least, in_range, positive, text
from guards import report_user_errors
from losses import dpo_loss
from model import load_config, load_model, sequence_logps
from ref_update import update_reference

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--config", type=text("a config .json"), default=None, help="a config.json to benchmark instead of the "
               "GPT-NeoX shape below")
p.add_argument("--hidden_size", type=at_least(1), default=2048)  # Pythia-1.4B, as EleutherAI/pythia-1.4b's config
p.add_argument("--num_layers", type=at_least(1), default=24)
p.add_argument("--num_heads", type=at_least(1), default=16)
p.add_argument("--intermediate_size", type=at_least(1), default=8192)
p.add_argument("--vocab_size", type=at_least(2), default=50304, help="at least 2: token 0 ends every completion")
p.add_argument("--prompt_len", type=at_least(1), default=128)
p.add_argument("--completion_len", type=at_least(1), default=384)
p.add_argument("--micro_batch_size", type=at_least(1), default=8, help="pairs per GPU per step")
p.add_argument("--steps", type=at_least(1), default=20, help="timed steps (the median is reported)")
p.add_argument("--warmup_steps", type=at_least(1), default=5, help="untimed steps first (allocator, cuBLAS, "
               "autotuning); at least 1: TRL's step time is measured between the ends of consecutive steps")
p.add_argument("--no_grad_ckpt", action="store_true", help="no gradient checkpointing of the policy")
p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"], help="autocast; auto = bf16 on CUDA")
p.add_argument("--alpha", type=in_range(0.0, 1.0), default=0.6, help="weight of the policy in the soft update, done "
               "every step")
p.add_argument("--beta", type=positive(), default=0.1)
p.add_argument("--lr", type=positive(), default=1e-6)
p.add_argument("--vs-trl", action="store_true", help="also run TRL's DPOTrainer (sync_ref_model) on the same workload")
p.add_argument("--tiny", action="store_true", help="2 layers, hidden 64, short pairs: checks the code on a CPU")
TINY = dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256, prompt_len=16, completion_len=48,
            micro_batch_size=2, steps=3, warmup_steps=1)
if p.parse_known_args()[0].tiny:  # --tiny changes the defaults; flags given explicitly still win
    p.set_defaults(**TINY)
args = p.parse_args()
report_user_errors()
if args.hidden_size % args.num_heads:
    p.error(f"--hidden_size {args.hidden_size} must be a multiple of --num_heads {args.num_heads}")
if args.config is not None and not (args.config.endswith(".json") and os.path.isfile(args.config)):
    p.error(f"--config {args.config}: expected a config .json file (bench.py builds a random model of its shape)"
            + ("" if os.path.exists(args.config) else "; there is no such file"))
if args.vs_trl and importlib.util.find_spec("trl") is None:  # before our half of the benchmark, not after it
    p.error("--vs-trl needs TRL, a benchmark-only dependency: `pip install trl` (it is not in requirements.txt on "
            "purpose)")
config = load_config(args.config, flag="--config") if args.config else None  # a config that cannot be read stops now

warnings.filterwarnings("ignore", ".*gradient_checkpointing.*", FutureWarning)  # transformers 5 renamed it
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
use_bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)  # weights stay fp32 (the master copy)
grad_ckpt = not args.no_grad_ckpt
B, P, C = args.micro_batch_size, args.prompt_len, args.completion_len
T = P + C
EOS = 0  # every completion ends with token 0, which TRL's tokenizer below calls eos (so TRL adds none)


def sync():
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn):
    """Seconds that fn takes, GPU work included."""
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def reset_peak_memory():
    gc.collect()  # free the previous run's models before measuring this one's
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        if torch.cuda.memory_allocated() > 2**28:
            print(f"note: {torch.cuda.memory_allocated() / 2**30:.2f} GiB still allocated; the next peak includes it")


def peak_memory():
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB", torch.cuda.max_memory_allocated()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return f"n/a on CPU (process peak RSS {rss / 2**30:.2f} GiB)", None


def matmul_peak():
    """FLOP/s of the best burst of square matmuls in the compute dtype: the ceiling MFU is measured against."""
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    dtype = torch.bfloat16 if use_bf16 else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty_like(a)
    best = min(timed(lambda: [torch.mm(a, b, out=out) for _ in range(reps)]) for _ in range(6))  # 1st burst: warm-up
    return 2 * n**3 * reps / best, f"{n}x{n} {dtype}".replace("torch.", "")


# the model, by config (no download): a config.json written here unless --config names one
config_path = args.config
if config_path is None:
    config_path = os.path.join(tempfile.mkdtemp(), "config.json")
    GPTNeoXConfig(hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
                  intermediate_size=args.intermediate_size, vocab_size=args.vocab_size, hidden_act="gelu",
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                  use_parallel_residual=True, tie_word_embeddings=False, max_position_embeddings=max(2048, T),
                  bos_token_id=EOS, eos_token_id=EOS).to_json_file(config_path)

# one micro-batch of random pairs, laid out as data.collate does: chosen rows first, then rejected; no padding
g = torch.Generator().manual_seed(0)
vocab = config.vocab_size if config else args.vocab_size
prompt = torch.randint(1, vocab, (B, P), generator=g)
chosen, rejected = torch.randint(1, vocab, (B, C), generator=g), torch.randint(1, vocab, (B, C), generator=g)
chosen[:, -1] = rejected[:, -1] = EOS
input_ids = torch.cat([torch.cat([prompt, chosen], 1), torch.cat([prompt, rejected], 1)])  # (2B, T)
loss_mask = torch.cat([torch.zeros(2 * B, P, dtype=torch.long), torch.ones(2 * B, C, dtype=torch.long)], 1)
tokens_per_step = 2 * B * T  # every policy token, prompt included


def bench_ours():
    """TR-DPO steps as train.py does them (tau = 1: a soft update after every optimizer step), then the update alone."""
    reset_peak_memory()
    policy = load_model(config_path).to(device)
    reference = copy.deepcopy(policy).requires_grad_(False)  # fp32, no checkpointing: it has no backward
    if grad_ckpt:
        policy.activation_checkpointing_enable({"use_reentrant": False})
        policy.train()  # HF checkpoints only in train mode; every dropout is 0
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0, fused=device.type == "cuda")
    batch = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
             "loss_mask": loss_mask.to(device), "first": P}

    def step():
        with autocast:
            policy_logps = sequence_logps(policy, batch)  # (2B,) chosen rows first, then rejected
            with torch.no_grad():
                ref_logps = sequence_logps(reference, batch)
            losses, _, _ = dpo_loss(*policy_logps.chunk(2), *ref_logps.chunk(2), args.beta)
        losses.mean().backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 2.0)
        if not (torch.isfinite(grad_norm) and losses.isfinite().all()):  # the host syncs train.py's check makes too
            raise SystemExit(f"error: non-finite loss or gradient norm ({grad_norm.item()}); try a lower --lr")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_reference(reference, policy, args.alpha)  # the paper's soft update, every step

    times = [timed(step) for _ in range(args.warmup_steps + args.steps)][args.warmup_steps:]
    memory = peak_memory()
    soft = statistics.median(timed(lambda: update_reference(reference, policy, args.alpha)) for _ in range(10))
    hard = statistics.median(timed(lambda: update_reference(reference, policy, 1.0)) for _ in range(10))
    n_matmul = sum(m.weight.numel() for m in policy.modules() if isinstance(m, torch.nn.Linear))
    return statistics.median(times), memory, soft, hard, n_matmul, policy.config


def bench_trl():
    """TRL's DPOTrainer with sync_ref_model on the same model, init, pairs, lengths, dtype and optimizer."""
    import trl  # found at start-up
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.callbacks import SyncRefModelCallback
    from datasets import Dataset, disable_progress_bars
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, TrainerCallback

    # TRL (1.16) tokenizes text itself and has no pre-tokenized input, so each token id i is written as the word <i>
    # of a word-level tokenizer: the text tokenizes back to exactly our ids, lengths and all
    words = Tokenizer(models.WordLevel({f"<{i}>": i for i in range(vocab)}, unk_token=f"<{EOS}>"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, eos_token=f"<{EOS}>", pad_token=f"<{EOS}>")
    text = lambda ids: " ".join(f"<{i}>" for i in ids.tolist())
    pairs = [{"prompt": text(p), "chosen": " " + text(c), "rejected": " " + text(r)}
             for p, c, r in zip(prompt, chosen, rejected)]
    disable_progress_bars()
    dataset = Dataset.from_list(pairs * (args.warmup_steps + args.steps))  # the same B pairs in every step

    reset_peak_memory()
    policy = load_model(config_path)  # the same seed: the same initial weights as ours
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(), max_steps=args.warmup_steps + args.steps, per_device_train_batch_size=B,
        learning_rate=args.lr, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=2.0,
        optim="adamw_torch_fused" if device.type == "cuda" else "adamw_torch", bf16=use_bf16,
        use_cpu=device.type == "cpu",  # transformers refuses bf16 on a CPU unless told so
        gradient_checkpointing=grad_ckpt, gradient_checkpointing_kwargs={"use_reentrant": False},
        beta=args.beta, loss_type="sigmoid", max_length=T, padding_free=False, precompute_ref_log_probs=False,
        # TR-DPO's soft update as TRL does it: ref <- alpha * policy + (1 - alpha) * ref after every step, like ours
        sync_ref_model=True, ref_model_mixup_alpha=args.alpha, ref_model_sync_steps=1,
        eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True)
    trainer = DPOTrainer(model=policy, ref_model=copy.deepcopy(policy), args=config, train_dataset=dataset,
                         processing_class=tokenizer)

    collate, first_batch = trainer.data_collator, []

    def checked_collate(examples):  # keep the first batch TRL trains on, to count its tokens
        batch = collate(examples)
        if not first_batch:
            first_batch.append(batch)
        return batch

    trainer.data_collator = checked_collate
    ends = []

    class StepEnd(TrainerCallback):
        def on_step_end(self, *_, **__):
            sync()
            ends.append(time.perf_counter())

    trainer.add_callback(StepEnd())  # added last: it runs after TRL's SyncRefModelCallback, so the step includes it
    trainer.train()
    memory = peak_memory()
    times = [b - a for a, b in zip(ends, ends[1:])][args.warmup_steps - 1:]  # from the end of one step to the next

    batch = first_batch[0]
    prompt_lens = (batch["attention_mask"] - batch["completion_mask"]).sum(1).unique().tolist()
    completion_lens = batch["completion_mask"].sum(1).unique().tolist()
    same_ids = set(map(tuple, batch["input_ids"].tolist())) <= set(map(tuple, input_ids.tolist()))
    print(f"TRL's first collated batch: input_ids {tuple(batch['input_ids'].shape)}, prompt tokens/row {prompt_lens}, "
          f"completion tokens/row {completion_lens}, {'rows identical to ours' if same_ids else 'ROWS DIFFER'}")
    if tuple(batch["input_ids"].shape) != tuple(input_ids.shape) or not same_ids:
        raise SystemExit("error: TRL did not train on our token ids; the comparison would be meaningless")
    model = trainer.accelerator.unwrap_model(trainer.model)
    soft = statistics.median(
        timed(lambda: SyncRefModelCallback.sync_target_model(model, trainer.ref_model, args.alpha)) for _ in range(10))
    return trl.__version__, statistics.median(times), memory, soft


# ----------------------------------------------------------------------------------------------------------------
peak, peak_what = matmul_peak()
step_s, memory, soft_s, hard_s, N, cfg = bench_ours()
L, d = cfg.num_hidden_layers, cfg.hidden_size
# FLOPs per token (PaLM app. B, nanoGPT's estimate_mfu). N = weights of every nn.Linear (the output head included, the
# input embedding lookup not). One forward is 2N + 4*L*d*T (QK^T and AV over the full T, not halved for the causal
# mask); a step is policy forward + backward (3 forwards), reference forward (1), recomputation under grad ckpt (1):
#   10N + 20*L*d*T with checkpointing, 8N + 16*L*d*T without
passes = 3 + 1 + grad_ckpt
flops_per_token = passes * (2 * N + 4 * L * d * T)
mfu = lambda seconds: flops_per_token * tokens_per_step / seconds / peak

where = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
print(f"model: {cfg.model_type}, {L} layers, hidden {d}, vocab {cfg.vocab_size}; N = {N / 1e6:,.1f}M in matmuls")
print(f"workload: {B} pairs x ({P} prompt + {C} completion) = {tokens_per_step} policy tokens/step, "
      f"{'bf16 autocast over fp32 weights' if use_bf16 else 'fp32'}, grad checkpointing {'on' if grad_ckpt else 'off'}")
print(f"device: {where}; measured matmul peak {peak / 1e12:.2f} TFLOP/s ({peak_what}); "
      f"FLOPs/token {2 * passes}N + {4 * passes}*L*d*T = {flops_per_token / 1e9:.3f} GFLOP")
print(f"ours (TR-DPO, alpha {args.alpha} every step): step {step_s * 1e3:.1f} ms, "
      f"tokens/s {tokens_per_step / step_s:,.0f}, MFU {mfu(step_s):.1%}, peak memory {memory[0]}")
print(f"  reference update: soft (alpha={args.alpha}) {soft_s * 1e3:.2f} ms = {soft_s / step_s:.2%} of the step, "
      f"hard (alpha=1) {hard_s * 1e3:.2f} ms = {hard_s / step_s:.2%}")
targets = [f"MFU >= 40% [{'met' if mfu(step_s) >= 0.4 else 'MISSED'}]",
           f"soft update < 2% [{'met' if soft_s / step_s < 0.02 else 'MISSED'}]"]
if args.vs_trl:
    version, trl_s, trl_memory, trl_soft_s = bench_trl()
    print(f"TRL {version} DPOTrainer (sync_ref_model, mixup alpha {args.alpha}, sync every step): "
          f"step {trl_s * 1e3:.1f} ms, tokens/s {tokens_per_step / trl_s:,.0f}, MFU {mfu(trl_s):.1%}, "
          f"peak memory {trl_memory[0]}; its soft update {trl_soft_s * 1e3:.2f} ms = {trl_soft_s / trl_s:.2%}")
    memory_ratio = memory[1] / trl_memory[1] if memory[1] else None
    print(f"ours/TRL: tokens/s {trl_s / step_s:.2f}x, peak memory {f'{memory_ratio:.2f}x' if memory_ratio else 'n/a'}")
    memory_met = "n/a" if memory_ratio is None else "met" if memory_ratio <= 1 else "MISSED"
    targets = [f"tokens/s >= 1.3x TRL [{'met' if trl_s / step_s >= 1.3 else 'MISSED'}]",
               f"peak memory <= TRL [{memory_met}]"] + targets
print("targets on one H100: " + ", ".join(targets))
