"""Preference data -> token tensors, with the same prompt tokens for chosen and rejected.

Every source becomes rows {"prompt": text or chat messages, "chosen": text, "rejected": text}:
  demo            the built-in set in data/ (SmolLM2 samples labelled by the gold judge of gold.py)
  hh              Anthropic/hh-rlhf: the prompt is the dialogue prefix that chosen and rejected share
  tldr            Reddit TL;DR comparisons of Stiennon et al. (trl-lib/tldr-preference)
  ultrafeedback   HuggingFaceH4/ultrafeedback_binarized
  PATH.jsonl      any local file with prompt/chosen/rejected (text, or lists of {"role", "content"} messages)

Inspect one:  python data.py hh --model EleutherAI/pythia-2.8b --max_length 1024
"""
import argparse
import json
import os

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = {"train": os.path.join(HERE, "data", "demo_train.jsonl"), "test": os.path.join(HERE, "data", "demo_eval.jsonl")}
HUB = {  # name: (hub id, config, train split, test split)
    "hh": ("Anthropic/hh-rlhf", None, "train", "test"),
    "tldr": ("trl-lib/tldr-preference", None, "train", "validation"),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", None, "train_prefs", "test_prefs"),
}


class DataError(SystemExit):
    """Bad input: a message for the user (file, line, what to do), not a traceback."""
    def __init__(self, message):
        super().__init__(f"error: {message}")


class BadRow(ValueError):
    """One malformed row; reported with its place (file:line), all of a file's at once."""


# ----------------------------------------------------------------------------------------------------------------
# rows: every source in one shape


def hh_dialogue(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}, ...]"""
    messages = []
    for chunk in text.split("\n\nHuman: ")[1:]:
        turns = chunk.split("\n\nAssistant: ")
        messages.append({"role": "user", "content": turns[0].strip()})
        messages += [{"role": "assistant", "content": t.strip()} for t in turns[1:]]
    return messages


def hh_row(row):
    """Split an HH pair (two whole dialogues) into the shared prompt and the two final answers."""
    marker = "\n\nAssistant:"
    common = os.path.commonprefix([row["chosen"], row["rejected"]])
    if marker not in common:
        raise BadRow("chosen and rejected share no dialogue prefix ending in '\\n\\nAssistant:'")
    cut = common.rfind(marker) + len(marker)  # the last assistant turn both dialogues start identically
    return {"prompt": hh_dialogue(row["chosen"][: cut - len(marker)]),
            "chosen": row["chosen"][cut:].strip(), "rejected": row["rejected"][cut:].strip()}


def last_answer(side):
    """A completion given as messages ends with the assistant's answer; the text of that answer."""
    if isinstance(side, list):
        if not side or not isinstance(side[-1], dict) or side[-1].get("role") != "assistant":
            raise BadRow("a completion given as messages must end with an assistant message")
        return side[-1].get("content")
    return side


def normalize(row):
    """Check one row and bring it to {"prompt", "chosen", "rejected"}, or raise BadRow saying what is wrong."""
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"expected a JSON object with prompt/chosen/rejected, got {type(row).__name__}")
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in row
               and not (k == "prompt" and isinstance(row.get("chosen"), list))]  # messages carry their own prompt
    if missing:
        raise BadRow(f"missing field(s) {', '.join(missing)}")
    prompt = row["prompt"] if "prompt" in row else row["chosen"][:-1]
    if isinstance(prompt, list):
        for m in prompt:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise BadRow(f"unknown message role in {m!r}: expected system, user or assistant")
            if not isinstance(m.get("content"), str):
                raise BadRow(f"message content must be text, got {m!r}")
    elif not isinstance(prompt, str):
        raise BadRow(f"prompt must be text or a list of messages, got {type(prompt).__name__}")
    out = {"prompt": prompt, "chosen": last_answer(row["chosen"]), "rejected": last_answer(row["rejected"])}
    for k in ("chosen", "rejected"):
        if not isinstance(out[k], str):
            raise BadRow(f"{k} must be text, got {type(out[k]).__name__}")
        if not out[k].strip():
            raise BadRow(f"{k} is empty")
    if out["chosen"] == out["rejected"]:
        raise BadRow("chosen and rejected are identical: there is no preference to learn")
    if isinstance(prompt, str) and not prompt.strip() or prompt == []:
        raise BadRow("prompt is empty")
    return out


def jsonl_lines(path):
    """(place, parsed row or BadRow) for each non-blank line of a JSONL file."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield f"{path}:{number}", BadRow(f"not valid UTF-8 (byte {e.start})")
                continue
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{number}", BadRow(f"not valid JSON ({e.msg}, column {e.colno})")


def checked(source, items, skip_bad_rows, log):
    """Normalize every (place, row); report all bad rows at once: an error, or with --skip_bad_rows a counted skip."""
    rows, problems = [], []
    for where, row in items:
        try:
            rows.append({**normalize(row), "where": where})
        except BadRow as e:
            problems.append(f"{where}: {e}")
    if problems:
        listing = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        if not skip_bad_rows:
            raise DataError(f"{source}: {len(problems)} bad row(s) of {len(problems) + len(rows)}:\n  {listing}\n"
                            "fix them, or pass --skip_bad_rows to leave them out (they are counted)")
        log(f"{source}: skipped {len(problems)} bad row(s) of {len(problems) + len(rows)} (--skip_bad_rows):\n  {listing}")
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def hub_rows(name, split):
    import datasets  # only the hub datasets need it
    hub_id, config, train_split, test_split = HUB[name]
    table = datasets.load_dataset(hub_id, config, split=train_split if split == "train" else test_split)
    for i, row in enumerate(table):
        try:
            yield f"{hub_id}[{i}]", hh_row(row) if name == "hh" else row
        except BadRow as e:
            yield f"{hub_id}[{i}]", e


def load_rows(name, split="train", skip_bad_rows=False, log=print):
    """The rows of a dataset by name (see the top of this file); split is "train" or "test"."""
    if name == "demo" or name.endswith(".jsonl"):
        path = DEMO[split] if name == "demo" else name
        return checked(path, jsonl_lines(path), skip_bad_rows, log)
    if name not in HUB:
        raise DataError(f"--dataset {name!r}: expected demo, {', '.join(HUB)} or a path ending in .jsonl")
    return checked(f"{name} ({split})", hub_rows(name, split), skip_bad_rows, log)


# ----------------------------------------------------------------------------------------------------------------
# tokens: render the prompt once, then each completion as its continuation


def plain_prompt(messages):
    """Models without a chat template see dialogues as Anthropic HH writes them."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def render(tokenizer, prompt, completion=None):
    """Token ids of the prompt as the model sees it, ready for the answer; with `completion`, followed by it."""
    if tokenizer.chat_template is not None:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if completion is None:
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        return tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                             tokenize=True)["input_ids"]
    text = prompt if isinstance(prompt, str) else plain_prompt(prompt)
    if completion is None:
        return tokenizer(text)["input_ids"]
    return tokenizer(text + plain_separator(prompt) + completion)["input_ids"] + [tokenizer.eos_token_id]


def plain_separator(prompt):
    return "" if isinstance(prompt, str) else " "  # HH writes "Assistant: answer"; text prompts carry their own


def encode(tokenizer, prompt, completion):
    """(prompt_ids, completion_ids) for one side. Tokenised jointly and sliced once, so that the prompt ids are the
    same ones whatever follows; the completion keeps its end-of-turn / EOS token."""
    prompt_ids, full = render(tokenizer, prompt), render(tokenizer, prompt, completion)
    if full[: len(prompt_ids)] == prompt_ids:
        return prompt_ids, full[len(prompt_ids):]
    if tokenizer.chat_template is not None:
        raise DataError(f"{tokenizer.name_or_path}: its chat template renders the prompt differently when an answer "
                        "follows, so prompt and completion cannot be split; use a model with a prefix-stable template")
    # a BPE merge across the boundary: tokenise the completion alone (never re-encode decoded text)
    rest = tokenizer(plain_separator(prompt) + completion, add_special_tokens=False)["input_ids"]
    return prompt_ids, rest + [tokenizer.eos_token_id]


def truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length):
    """Fit prompt + the longer completion into max_length: the prompt is cut from the left (the turn nearest the
    answer matters most), then each completion from the right. Never writes an EOS into a cut completion."""
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids
    keep = min(len(prompt_ids), max(max_prompt_length, max_length - longest))
    prompt_ids = prompt_ids[len(prompt_ids) - keep:]
    budget = max_length - len(prompt_ids)
    return prompt_ids, chosen_ids[:budget], rejected_ids[:budget]


def tokenize(rows, tokenizer, max_length, max_prompt_length, log=print):
    """Rows -> examples {"prompt", "chosen", "rejected": int32 tensors, "row": index}. Prints what it cut and dropped."""
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"--max_prompt_length {max_prompt_length} must be between 0 and --max_length {max_length}")
    examples, counts = [], {"prompt cut": 0, "completion cut": 0, "dropped (same tokens)": 0, "dropped (empty)": 0}
    for i, row in enumerate(rows):
        prompt_ids, chosen_ids = encode(tokenizer, row["prompt"], row["chosen"])
        _, rejected_ids = encode(tokenizer, row["prompt"], row["rejected"])
        p, c, r = truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length)
        counts["prompt cut"] += len(p) < len(prompt_ids)
        counts["completion cut"] += len(c) < len(chosen_ids) or len(r) < len(rejected_ids)
        if c == r:  # texts differ only in what the tokenizer or the cut removed: no preference left, zero gradient
            counts["dropped (same tokens)"] += 1
        elif not c or not r:
            counts["dropped (empty)"] += 1
        else:
            examples.append({"prompt": torch.tensor(p, dtype=torch.int32), "chosen": torch.tensor(c, dtype=torch.int32),
                             "rejected": torch.tensor(r, dtype=torch.int32), "row": i})
    log(f"tokenized {len(examples)} of {len(rows)} pairs (max_length {max_length}): "
        + ", ".join(f"{k} {v}" for k, v in counts.items()))
    if not examples:
        raise DataError("no pairs left after tokenization; see the counts above")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# batches: right-padded, chosen and rejected stacked for one forward pass


def pad(sequences, pad_id):
    """[(prompt_ids, completion_ids), ...] -> input_ids, attention_mask, loss_mask (1 on completion tokens), (N, T),
    and "first", the earliest completion position, as a Python int: the model call needs it, and reading it from a
    device tensor would make the CPU wait for the GPU."""
    T = max(len(p) + len(c) for p, c in sequences)
    input_ids = torch.full((len(sequences), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), T), dtype=torch.long)
    loss_mask = torch.zeros((len(sequences), T), dtype=torch.bool)
    for i, (p, c) in enumerate(sequences):
        input_ids[i, : len(p) + len(c)] = torch.cat([p, c])
        attention_mask[i, : len(p) + len(c)] = 1
        loss_mask[i, len(p): len(p) + len(c)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask,
            "first": min(len(p) for p, _ in sequences)}


def to_device(batch, device):
    """A batch's tensors (or one tensor) on `device`. From pinned (page-locked) memory the copy is asynchronous: the
    CPU goes on queueing work while the batch travels. Plain Python values (row ids, "first") stay on the host."""
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if not isinstance(batch, torch.Tensor):
        return batch
    return batch.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else batch.to(device)


def collate(examples, pad_id, method="dpo", max_length=None):
    """Pairs -> one batch. dpo/ipo: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1]. sft: the chosen rows.
    kto: the same 2B rows as unpaired examples (chosen desirable), plus "kl": each prompt with the completion of
    the next example (mismatched pairs, Ethayarajh et al.), which estimate KL(pi || ref)."""
    chosen = [(e["prompt"], e["chosen"]) for e in examples]
    rejected = [(e["prompt"], e["rejected"]) for e in examples]
    batch = pad(chosen if method == "sft" else chosen + rejected, pad_id)
    batch["rows"] = torch.tensor([e["row"] for e in examples])
    if method == "kto":
        if len(examples) < 2:
            raise DataError("KTO needs at least 2 pairs per device micro-batch for its mismatched-pair KL estimate")
        pairs = chosen + rejected
        shifted = [(p, pairs[(i + 1) % len(pairs)][1]) for i, (p, _) in enumerate(pairs)]
        batch["kl"] = pad([(p, c[: max_length - len(p)]) for p, c in shifted], pad_id)
    return batch


def batches(examples, micro_batch_size, rank, world_size, seed, epoch, skip=0, group_size=0):
    """This rank's micro-batches for one epoch. Every rank shuffles with the same seed and takes every world_size-th
    pair (as DistributedSampler does), so one process with the same global batch sees the same pairs per step.
    `skip` resumes mid-epoch. group_size > 0 (--group_by_length, with the global batch size): each global batch holds
    pairs of similar length, so that less of every forward pass is padding."""
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(len(examples), generator=g).tolist()
    if group_size:  # sort windows of 64 global batches by length, cut them into batches, shuffle the batches
        def length(i):  # the padded length of the pair's two rows
            return len(examples[i]["prompt"]) + max(len(examples[i]["chosen"]), len(examples[i]["rejected"]))
        window = 64 * group_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w: w + window], key=length)]
        groups = [order[b: b + group_size] for b in range(0, len(order), group_size)]
        tail = groups.pop() if len(groups[-1]) < group_size else []  # a partial batch stays last
        order = [i for b in torch.randperm(len(groups), generator=g).tolist() for i in groups[b]] + tail
    indices = order[rank: len(order) // world_size * world_size: world_size]
    for start in range(skip * micro_batch_size, len(indices) - micro_batch_size + 1, micro_batch_size):
        yield [examples[i] for i in indices[start: start + micro_batch_size]]


# ----------------------------------------------------------------------------------------------------------------
# python data.py DATASET: look before you train


def inspect(args):
    from model import load_tokenizer
    rows = load_rows(args.dataset, args.split, skip_bad_rows=True)  # list every problem of the file in one pass
    tokenizer = load_tokenizer(args.model)
    examples = tokenize(rows, tokenizer, args.max_length, args.max_prompt_length)
    for name in ("prompt", "chosen", "rejected"):
        lengths = torch.tensor([len(e[name]) for e in examples], dtype=torch.float)
        q = torch.quantile(lengths, torch.tensor([0.5, 0.9, 0.99])).tolist()
        print(f"{name:>8} tokens: mean {lengths.mean():.0f}  p50 {q[0]:.0f}  p90 {q[1]:.0f}  p99 {q[2]:.0f}  "
              f"max {lengths.max():.0f}")
    padding = {}
    for group_size in (0, args.batch_size):  # share of padded positions in the micro-batches of one epoch
        shapes = [collate(b, 0)["attention_mask"]
                  for b in batches(examples, args.micro_batch_size, 0, 1, seed=0, epoch=0, group_size=group_size)]
        padding[group_size] = 1 - sum(int(m.sum()) for m in shapes) / sum(m.numel() for m in shapes)
    print(f"padding in micro-batches of {args.micro_batch_size} pairs: {padding[0]:.1%} of positions, "
          f"{padding[args.batch_size]:.1%} with --group_by_length (global batch {args.batch_size})")
    e = examples[0]
    print(f"\nrow {e['row']} as the model sees it (completion between ⟦ ⟧):")
    print(tokenizer.decode(e["prompt"]) + "⟦" + tokenizer.decode(e["chosen"]) + "⟧   <- chosen")
    print("... same prompt ids ...⟦" + tokenizer.decode(e["rejected"]) + "⟧   <- rejected")


if __name__ == "__main__":
    from model import DEFAULT_MODEL
    parser = argparse.ArgumentParser(description="Inspect a preference dataset: counts, lengths, cuts, one example.")
    parser.add_argument("dataset", help="demo | hh | tldr | ultrafeedback | PATH.jsonl")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="whose tokenizer and chat template to use")
    parser.add_argument("--max_length", type=int, default=512)
    parser.add_argument("--max_prompt_length", type=int, default=256)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8)
    inspect(parser.parse_args())
