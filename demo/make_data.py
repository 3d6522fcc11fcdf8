"""Build the shipped offline preference data: sample completions from the default model, judge them with gold.py,
and pair a higher-scoring sample (chosen) with a lower-scoring one (rejected) of the same prompt.

Writes, under --out_dir (default: this folder):
  train.jsonl         pairs from the training prompts
  eval.jsonl          pairs from disjoint held-out prompts
  prompts_eval.jsonl  the held-out tasks themselves (for sampling + gold-judging a trained policy)
Each pair line: {"id", "family", "prompt", "chosen", "rejected", "score_chosen", "score_rejected"}.
The shipped files come from the defaults (`python demo/make_data.py`): 5800 samples, ~23 min on 2 CPU cores.
"""
import argparse
import collections
import json
import os
import sys
import time

import torch
from tqdm import tqdm

import gold
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for model.py
import model  # noqa: E402
from flags import at_least, text  # noqa: E402


def sample(policy, tokenizer, prompts, k, max_new_tokens, batch_size):
    """`k` sampled completions for every prompt (a list of k strings per prompt), batched with left padding."""
    rows = [p for p in prompts for _ in range(k)]  # each prompt repeated k times, so its samples are contiguous
    texts = []
    for i in tqdm(range(0, len(rows), batch_size), desc="sampling"):
        chat = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in rows[i:i + batch_size]]
        batch = tokenizer(chat, return_tensors="pt", padding=True, add_special_tokens=False)  # template has its tokens
        with torch.no_grad():  # plain sampling at temperature 1; top_k=50 is the transformers default, made explicit
            out = policy.generate(**batch, do_sample=True, temperature=1.0, top_p=1.0, top_k=50,
                                  max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]  # left padding: every prompt ends at the same column
        texts += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return [texts[j * k:(j + 1) * k] for j in range(len(prompts))]


def make_pairs(task, completions, max_pairs):
    """Up to `max_pairs` disjoint (chosen, rejected) pairs: best vs worst, then second best vs second worst, ..."""
    scores = [gold.score(task, c) for c in completions]
    order = sorted((j for j, c in enumerate(completions) if c), key=lambda j: -scores[j])  # no empty replies; stable
    pairs = []
    for j in range(min(max_pairs, len(order) // 2)):
        c, r = order[j], order[-1 - j]
        if scores[c] > scores[r] and completions[c] != completions[r]:  # a clear winner, never a pair of equal texts
            pairs.append(dict(id=f"{task['id']}-{j}", family=task["family"], prompt=task["prompt"],
                              chosen=completions[c], rejected=completions[r],
                              score_chosen=scores[c], score_rejected=scores[r]))
    return pairs


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def report(name, pairs, n_prompts):
    counts = collections.Counter(p["family"] for p in pairs)
    mean = lambda key: sum(p[key] for p in pairs) / max(len(pairs), 1)
    print(f"{name}: {len(pairs)} pairs from {n_prompts} prompts; mean score chosen {mean('score_chosen'):.3f}, "
          f"rejected {mean('score_rejected'):.3f}")
    for family in gold.FAMILIES:
        print(f"  {family:12s} {counts[family]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n_train_prompts", type=at_least(1), default=1200)
    parser.add_argument("--n_eval_prompts", type=at_least(1), default=250)
    parser.add_argument("--samples_per_prompt", type=at_least(2), default=4)
    parser.add_argument("--max_pairs_per_prompt", type=at_least(1), default=2)
    parser.add_argument("--max_new_tokens", type=at_least(1), default=32)
    parser.add_argument("--batch_size", type=at_least(1), default=64)
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.add_argument("--model", type=text("a model"), default="smollm2-135m-instruct")
    parser.add_argument("--out_dir", type=text("a folder"), default=HERE)
    args = parser.parse_args()

    torch.set_num_threads(2)
    torch.manual_seed(args.seed)  # same flags, same machine -> same samples
    tokenizer = model.load_tokenizer(args.model)
    tokenizer.padding_side = "left"  # generation appends on the right, so prompts must end flush right
    policy = model.load_model(args.model)

    tasks = gold.make_tasks(args.n_train_prompts + args.n_eval_prompts, args.seed)  # distinct prompts, then split
    splits = {"train": tasks[:args.n_train_prompts], "eval": tasks[args.n_train_prompts:]}
    os.makedirs(args.out_dir, exist_ok=True)
    start = time.time()
    for name, split in splits.items():
        completions = sample(policy, tokenizer, [t["prompt"] for t in split], args.samples_per_prompt,
                             args.max_new_tokens, args.batch_size)
        pairs = [p for task, c in zip(split, completions) for p in make_pairs(task, c, args.max_pairs_per_prompt)]
        write_jsonl(os.path.join(args.out_dir, f"{name}.jsonl"), pairs)
        report(name, pairs, len(split))
    write_jsonl(os.path.join(args.out_dir, "prompts_eval.jsonl"), splits["eval"])
    print(f"sampled {len(tasks) * args.samples_per_prompt} completions in {time.time() - start:.0f}s")
