"""Preference pairs -> token tensors and batches, with the same prompt tokens for chosen and rejected.

The rows come from sources.py ({"prompt": text or chat messages, "chosen": text, "rejected": text, "where": place}).
A pair becomes tokens in encode_pair: the prompt rendered once (the chat template's generation prompt), each answer
tokenized as its continuation and ending with the template's end of turn, cut to fit at turn boundaries. Then the
batches: right-padded, chosen rows then rejected rows for one forward pass (collate), in the run's global batches.

Inspect a data set before training:  python data.py hh --model EleutherAI/pythia-2.8b --max_length 1024
"""
import argparse
import collections
import functools
import hashlib
import itertools
import json
import time

import torch
from jinja2 import TemplateError  # what a chat template's raise_exception raises (transformers)

import token_cache
from identity import same_prompt_tokens
from sources import DataError, load_rows, prompt_groups, report

# ----------------------------------------------------------------------------------------------------------------
# tokens: render the prompt once, then each completion as its continuation
#
# The rule: a prompt given as messages (HH, UltraFeedback, any message list) is a conversation: the tokenizer's chat
# template, or without one HH's '\n\nHuman: ...\n\nAssistant:' turns. A text prompt is one user turn under a chat
# template; without a template it is raw text that the completion continues as written (TL;DR's '... TL;DR:' +
# ' summary'), TRL's "standard" format. A completion ends with the template's end-of-turn token, or with EOS.
# A row the template refuses (its raise_exception: roles that do not alternate, a system message under a template
# without a system role) is a bad row, named with the template's message. We never rewrite the messages to please a
# template (e.g. fold a system message into the first user turn): the prompt would change silently, and per model.
REFUSED = "refused by the chat template"
# A special token's text written in a row (<|im_end|>, <|endoftext|>, <|eot_id|> in a scraped answer or prompt) would
# be read as that token: an end of turn mid-answer, which the policy learns to stop at, or a turn injected into the
# prompt. Such a row is a bad row too, named with the token; its text is never tokenized as plain text instead, since
# the model could not tell it from the token when it writes it.
SPECIAL = "special-token text"


def plain_prompt(messages):
    """Models without a chat template see dialogues as Anthropic HH writes them."""
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"\n\n{names[m['role']]}: {m['content']}" for m in messages) + "\n\nAssistant:"


def chat(prompt, completion=None):
    """The messages a chat template renders: a text prompt is one user turn, the completion the assistant's answer."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return messages if completion is None else messages + [{"role": "assistant", "content": completion}]


def render(tokenizer, prompt, completion=None):
    """Token ids of the prompt as the model sees it, ready for the answer; with `completion`, followed by it (and by
    what the template writes after an answer, or EOS)."""
    if tokenizer.chat_template is not None:
        return tokenizer.apply_chat_template(chat(prompt, completion), add_generation_prompt=completion is None,
                                             tokenize=True)["input_ids"]
    text = prompt if isinstance(prompt, str) else plain_prompt(prompt)
    if completion is None:
        return tokenizer(text)["input_ids"]
    return tokenizer(text + plain_separator(prompt) + completion)["input_ids"] + [tokenizer.eos_token_id]


def plain_separator(prompt):
    return "" if isinstance(prompt, str) else " "  # HH writes "Assistant: answer"; text prompts carry their own


ANSWER = "Sure, here it is: 42."  # any answer: what follows it in a rendered turn is the template's end of turn
TurnEnd = collections.namedtuple("TurnEnd", "text ids token")


def turn_end(tokenizer):
    """TurnEnd(text, ids, token): what a chat template writes after an assistant's answer, its ids, and the token a
    completion ends with. With a template that is the special token written right after the answer (<|im_end|>,
    <|eot_id|>, <end_of_turn>), found by rendering an answer, not by name; the whitespace after it belongs to the next
    turn. With no template, or one that marks no end, EOS. Sampling (evaluate.py) stops at this token: both agree."""
    if tokenizer.chat_template is None:
        return TurnEnd("", [], tokenizer.eos_token_id)
    try:
        text = tokenizer.apply_chat_template(chat("Hi", ANSWER), tokenize=False)
    except TemplateError as e:
        raise DataError(f"{tokenizer.name_or_path}: its chat template refuses a plain question and answer ({e}), so "
                        "no row can be rendered; use the model's own chat template, or fix it in its folder")
    after = text[text.rindex(ANSWER) + len(ANSWER):]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    added = tokenizer.added_tokens_decoder
    if ids and (ids[0] in tokenizer.all_special_ids or ids[0] in added and added[ids[0]].special):
        return TurnEnd(after, ids, ids[0])
    if tokenizer.eos_token_id is None:
        raise DataError(f"{tokenizer.name_or_path}: its chat template marks no end of an answer and it has no EOS "
                        "token, so a completion would have no end; give the tokenizer an eos_token")
    return TurnEnd(after, ids, tokenizer.eos_token_id)


def encode(tokenizer, prompt, completion, ending=None, prompt_ids=None):
    """(prompt_ids, completion_ids) for one side: the prompt ids exactly as sampling sees them (the same whatever
    follows), the completion ending with the end-of-turn token or EOS (turn_end). Tokenised jointly and sliced once;
    where the answer's first token merges with the end of the prompt, the answer is tokenised alone, from its text
    (never from decoded ids). prompt_ids: the prompt's, if rendered already."""
    after_text, after, end = ending or turn_end(tokenizer)
    prompt_ids, full = prompt_ids or render(tokenizer, prompt), render(tokenizer, prompt, completion)
    if tokenizer.chat_template is None:
        if full[: len(prompt_ids)] == prompt_ids:
            return prompt_ids, full[len(prompt_ids):]
        rest = tokenizer(plain_separator(prompt) + completion, add_special_tokens=False)["input_ids"]
        return prompt_ids, rest + [end]
    if full[: len(prompt_ids)] == prompt_ids and full[len(full) - len(after):] == after:
        return prompt_ids, full[len(prompt_ids): len(full) - len(after)] + [end]
    # e.g. a generation prompt ending in "\n\n" that the vocabulary merges with the answer: the answer as written
    prompt_text = tokenizer.apply_chat_template(chat(prompt), add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(chat(prompt, completion), tokenize=False)
    if not full_text.startswith(prompt_text) or not full_text.endswith(after_text):
        raise DataError(f"{tokenizer.name_or_path}: its chat template renders the prompt differently when an answer "
                        "follows, so prompt and completion cannot be split; use a model with a prefix-stable template")
    answer = full_text[len(prompt_text): len(full_text) - len(after_text)]
    return prompt_ids, tokenizer(answer, add_special_tokens=False)["input_ids"] + [end]


def cut_start(tokenizer, text, n):
    """`text` without (about) its first n tokens, cut between two tokens: text is cut, never decoded ids."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    return text[max(1, offsets[n][0]):] if n < len(offsets) else ""  # at least one character: the loop ends


def shorten(tokenizer, prompt, budget):
    """(prompt, turns dropped, text cut): the prompt made to fit `budget` tokens as a well-formed conversation. Drop
    the oldest exchanges (a user turn and the replies to it), keeping a system message and the last user turn; only if
    that alone is too long, cut the start of the first kept message's text (its end, nearest the answer, stays) and
    render it again through the template, so that headers, BOS and system prompt stay. A text prompt is cut the same
    way. prompt is None if the frame leaves no room for any of that text."""
    length = lambda p: len(render(tokenizer, p))  # noqa: E731
    dropped = False
    if isinstance(prompt, list):
        system = prompt[:1] if prompt[0]["role"] == "system" else []
        turns = prompt[len(system):]
        while length(system + turns) > budget:
            following = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), None)
            if following is None:
                break
            turns, dropped = turns[following:], True
        prompt = system + turns
        cut = len(system) if turns else 0  # the first kept message after the system message
        with_text = lambda text: prompt[:cut] + [{**prompt[cut], "content": text}] + prompt[cut + 1:]  # noqa: E731
        text = prompt[cut]["content"]
    else:
        with_text, text = (lambda text: text), prompt
    shorter = prompt
    while (over := length(shorter) - budget) > 0:
        text = cut_start(tokenizer, text, over)
        if not text.strip():  # an empty message: nothing is left to answer
            return None, dropped, True
        shorter = with_text(text)
    return shorter, dropped, shorter is not prompt


NO_IDS = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "turns_dropped": False, "text_cut": False,
          "completion_cut": False, "refusal": ""}  # a row that gives no pair (its status says why)


def fit_pair(row, tokenizer, ending, max_length, max_prompt_length):
    """One row -> its token ids, cut to fit max_length, and what was done to it. Chosen and rejected share one prompt:
    if prompt + the longer completion do not fit, the prompt is shortened (to max_prompt_length, or more if the
    completions leave room) by turns, then the completions are cut from the right (a cut one has no end token)."""
    prompt = json.loads(row["prompt"])
    prompt_ids, chosen = encode(tokenizer, prompt, row["chosen"], ending)
    _, rejected = encode(tokenizer, prompt, row["rejected"], ending, prompt_ids)
    budget = max(max_prompt_length, max_length - max(len(chosen), len(rejected)))
    dropped = text_cut = False
    if len(prompt_ids) > budget:
        prompt, dropped, text_cut = shorten(tokenizer, prompt, budget)
        if prompt is None:
            return {**NO_IDS, "turns_dropped": dropped, "text_cut": text_cut, "status": "dropped (prompt cannot fit)"}
        prompt_ids, chosen = encode(tokenizer, prompt, row["chosen"], ending)
        _, rejected = encode(tokenizer, prompt, row["rejected"], ending, prompt_ids)
    room = max_length - len(prompt_ids)
    completion_cut = len(chosen) > room or len(rejected) > room
    chosen, rejected = chosen[:room], rejected[:room]
    # texts that differ only in what the tokenizer or the cut removed: no preference left, zero gradient
    status = "dropped (same tokens)" if chosen == rejected else "kept"
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "turns_dropped": dropped,
            "text_cut": text_cut, "completion_cut": completion_cut, "status": status, "refusal": ""}


@functools.lru_cache(maxsize=8)
def special_tokens(tokenizer):
    """The texts of a tokenizer's special tokens, sorted: read once per tokenizer, not once per row."""
    added = tokenizer.added_tokens_decoder.values()
    return sorted({*tokenizer.all_special_tokens, *(t.content for t in added if t.special)} - {""})


def special_text(row, tokenizer):
    """'<token> in its chosen' for the first special token whose text a row's prompt or answers hold, else ''."""
    prompt = json.loads(row["prompt"])
    texts = {"prompt": [prompt] if isinstance(prompt, str) else [m["content"] for m in prompt],
             "chosen": [row["chosen"]], "rejected": [row["rejected"]]}
    specials = special_tokens(tokenizer)
    return next((f"{token} in its {part}" for part, parts in texts.items() for token in specials
                 if any(token in text for text in parts)), "")


def encode_pair(row, tokenizer, ending, max_length, max_prompt_length):
    """fit_pair's result, or for a row whose prompt or prompt + answer the chat template refuses, status REFUSED and
    the template's own message (kept in the cache like any result: a refused row is not rendered again); for a row
    that writes a special token's text, status SPECIAL and the token."""
    if found := special_text(row, tokenizer):
        return {**NO_IDS, "status": SPECIAL, "refusal": found}
    try:
        return fit_pair(row, tokenizer, ending, max_length, max_prompt_length)
    except TemplateError as e:  # what a template's raise_exception raises
        return {**NO_IDS, "status": REFUSED, "refusal": str(e)}


def refused(rows, table, tokenizer, skip_bad_rows, log):
    """Rows the chat template refused, and rows that write a special token's text, are bad rows: named with their
    place and the template's message or the token, an error unless skip_bad_rows (see skips_bad_rows), else counted
    in the log."""
    statuses = table.data.column("status").to_pylist()
    problems = [(rows[i].get("where", f"row {i}"), f"{statuses[i]}: {refusal}")
                for i, refusal in enumerate(table.data.column("refusal").to_pylist()) if refusal]
    advice = {REFUSED: f"the chat template of {tokenizer.name_or_path} refuses them: rewrite them as it requires "
                       "(often: a user turn first, then turns that alternate, a system message only where it has a "
                       "system role)",
              SPECIAL: f"the tokenizer of {tokenizer.name_or_path} would read that text as the special token itself "
                       "(an end of turn mid-answer, a turn injected into the prompt): remove it from the rows"}
    if problems and not skip_bad_rows:
        kinds = [advice[k] for k in advice if k in statuses]
        raise DataError(f"{report(problems, len(rows), 20)}\n" + "; ".join(kinds) + ", or pass --skip_bad_rows to "
                        "leave them out (they are counted)")
    if problems:
        log(f"skipped {report(problems, len(rows), 5)}")


def tokenize(rows, tokenizer, max_length, max_prompt_length, log=print, cache_dir=None, processes=None,
             skip_bad_rows=False):
    """Rows -> examples {"prompt", "chosen", "rejected": int32 tensors, "row": index}. Prints what it cut and dropped
    and the time it took. The result is kept on disk under cache_dir (default $TRDPO_TOKENIZED, or
    ~/.cache/trdpo/tokenized; token_cache.py): a second run, and the other ranks under torchrun, read it back.
    Rows the chat template refuses, or that write a special token's text, stop with their places, or with
    skip_bad_rows are left out and counted."""
    if not 0 < max_prompt_length < max_length:
        raise DataError(f"--max_prompt_length {max_prompt_length} must be between 0 and --max_length {max_length}")
    if not rows:
        return []
    start = time.time()
    key = token_cache.key(rows, tokenizer, max_length, max_prompt_length, code=__file__)  # what the ids depend on
    arguments = {"tokenizer": tokenizer, "ending": turn_end(tokenizer), "max_length": max_length,
                "max_prompt_length": max_prompt_length}  # encode_pair(row, **arguments)
    table, how = token_cache.table(rows, encode_pair, arguments, key, cache_dir, processes)
    refused(rows, table, tokenizer, skip_bad_rows, log)
    column = lambda name: table.data.column(name).to_pylist()  # noqa: E731
    status = column("status")
    prompts, chosen, rejected = (token_cache.ragged(table, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
    examples = [{"prompt": prompts[i], "chosen": chosen[i], "rejected": rejected[i], "row": i}
                for i, s in enumerate(status) if s == "kept"]
    counts = {"prompt turns dropped": sum(column("turns_dropped")), "prompt text cut": sum(column("text_cut")),
              "completion cut": sum(column("completion_cut")),
              **{s: status.count(s) for s in ("dropped (same tokens)", "dropped (prompt cannot fit)", REFUSED,
                                              SPECIAL)}}
    end = turn_end(tokenizer).token  # said where it differs from the EOS (Llama-3: <|eot_id|>, not <|end_of_text|>)
    ending = "" if end == tokenizer.eos_token_id else (f"; completions end with the chat template's end of turn "
                                                       f"{tokenizer.convert_ids_to_tokens(end)!r}, not with its EOS "
                                                       f"{tokenizer.eos_token!r}, and samples stop at it")
    log(f"tokenized {len(examples)} of {len(rows)} pairs (max_length {max_length}) in {time.time() - start:.1f} s "
        f"({how}): " + ", ".join(f"{k} {v}" for k, v in counts.items()) + ending)
    if not examples:
        raise DataError("no pairs left after tokenization; see the counts above (a prompt cannot fit when "
                        "--max_prompt_length leaves no room beside the chat template's own tokens; a template that "
                        "refuses every row wants another shape of conversation)")
    return examples


def fingerprint(examples):
    """A sha256 of the token ids of every pair, in order: a resumed run must train on the very pairs it began with."""
    h = hashlib.sha256()
    for e in examples:
        for name in ("prompt", "chosen", "rejected"):
            h.update(e[name].numpy().tobytes() + b"|")
    return h.hexdigest()


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


def collate(examples, pad_id, method="dpo", max_length=None, neighbours=None):
    """Pairs -> one batch. dpo/ipo: rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1]. sft: the chosen rows.
    kto: the same 2B rows as unpaired examples (chosen desirable), plus "kl": each prompt with the chosen and the
    rejected completion of its neighbour, the next pair with another prompt (Batches.neighbour; mismatched pairs,
    Ethayarajh et al.), on which KL(pi || ref) is estimated."""
    chosen = [(e["prompt"], e["chosen"]) for e in examples]
    rejected = [(e["prompt"], e["rejected"]) for e in examples]
    batch = pad(chosen if method == "sft" else chosen + rejected, pad_id)
    batch["rows"] = torch.tensor([e["row"] for e in examples])
    if method == "kto":
        mismatched = [(e["prompt"], n[side]) for side in ("chosen", "rejected") for e, n in zip(examples, neighbours)]
        batch["kl"] = pad([(p, c[: max_length - len(p)]) for p, c in mismatched], pad_id)
    return batch


def held_out_batches(examples, rank, world_size, micro_batch_size, pad_id):
    """This rank's share of the held-out pairs, as (batch, weights) of micro_batch_size pairs. A rank with fewer pairs
    gets weight-0 copies to make up the difference: every rank runs the same number of forwards (under FSDP each
    forward is all-gathers that every rank must join), and the metrics stay exact means over the pairs scored."""
    per_rank = -(-len(examples) // world_size)
    mine = examples[rank::world_size]
    weights = [1.0] * len(mine) + [0.0] * (per_rank - len(mine))
    mine = mine + examples[:1] * (per_rank - len(mine))
    return [(collate(mine[i: i + micro_batch_size], pad_id), torch.tensor(weights[i: i + micro_batch_size]))
            for i in range(0, per_rank, micro_batch_size)]


class Batches:
    """The run's global batches, numbered from 0 over all epochs: batch `index` is the same pairs whatever the number
    of processes and micro-batches, so the same command means the same optimization on 1 or 8 GPUs.

    Every epoch is a new shuffle, a function of (seed, epoch) alone, cut into len(pairs) // batch_size whole global
    batches; the few pairs left over (fewer than a batch) wait for the next epoch's shuffle. Rank r takes every
    world_size-th pair of a global batch (as DistributedSampler does) and cuts its share into micro-batches.
    group_by_length: each global batch holds pairs of similar length, so that less of every forward pass is padding."""

    def __init__(self, examples, batch_size, micro_batch_size, rank=0, world_size=1, seed=0, group_by_length=False):
        self.examples, self.batch_size, self.micro_batch_size = examples, batch_size, micro_batch_size
        self.rank, self.world_size, self.seed, self.group_by_length = rank, world_size, seed, group_by_length
        self.per_epoch = len(examples) // batch_size
        self.order = (None, [])  # (epoch, its order): computed once per epoch

    def epoch_order(self, epoch):
        """The pairs of one epoch in training order, whole global batches only."""
        if self.order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)  # one stream per (seed, epoch): seed s's
            order = torch.randperm(len(self.examples), generator=g).tolist()  # 2nd epoch is not seed s+1's 1st
            if self.group_by_length:  # sort windows of 64 global batches by length, cut into batches, shuffle those
                def length(i):  # the padded length of the pair's two rows
                    e = self.examples[i]
                    return len(e["prompt"]) + max(len(e["chosen"]), len(e["rejected"]))
                window = 64 * self.batch_size
                order = [i for w in range(0, len(order), window) for i in sorted(order[w: w + window], key=length)]
                whole = [order[b: b + self.batch_size] for b in range(0, self.per_epoch * self.batch_size,
                                                                      self.batch_size)]  # a partial one is left over
                order = [i for b in torch.randperm(len(whole), generator=g).tolist() for i in whole[b]]
            self.order = (epoch, order[: self.per_epoch * self.batch_size])
        return self.order[1]

    def pairs(self, index):
        """Every pair of global batch `index`, whatever the rank."""
        epoch, i = divmod(index, self.per_epoch)
        return [self.examples[j] for j in self.epoch_order(epoch)[i * self.batch_size: (i + 1) * self.batch_size]]

    def __call__(self, index):
        """This rank's micro-batches of global batch `index`: lists of (pair, its neighbour)."""
        batch = self.pairs(index)
        mine = [(batch[k], self.neighbour(batch, k, index)) for k in range(self.rank, len(batch), self.world_size)]
        return [mine[m: m + self.micro_batch_size] for m in range(0, len(mine), self.micro_batch_size)]

    def neighbour(self, batch, k, index):
        """KTO's mismatched pair for pair k of a global batch: the next pair after it (wrapping round the batch, then
        on in the epoch's order) whose prompt is another one. The next pair alone would often share its prompt where a
        prompt has several pairs and --group_by_length puts them side by side. The same on any layout; a data set of
        one prompt has no other, and gets the next pair."""
        epoch = self.epoch_order(index // self.per_epoch)
        others = itertools.chain(batch[k + 1:], batch[:k], (self.examples[j] for j in epoch))
        return next((e for e in others if not same_prompt_tokens(e, batch[k])), batch[(k + 1) % len(batch)])


# ----------------------------------------------------------------------------------------------------------------
# python data.py DATASET: look before you train


def inspect(args):
    from model import load_tokenizer
    tokenizer = load_tokenizer(args.model)  # first: a --model that cannot be read stops before the rows load
    rows = load_rows(args.dataset, args.split, skip_bad_rows=True, data_dir=args.data_dir)  # every problem at once
    examples = tokenize(rows, tokenizer, args.max_length, args.max_prompt_length, skip_bad_rows=True)
    per_prompt = [len(g) for g in prompt_groups(rows)]
    split = "--eval_pairs holds out whole prompts" if args.dataset.endswith(".jsonl") else "held out: the test split"
    print(f"{len(rows)} pairs of {len(per_prompt)} prompts ({len(rows) / len(per_prompt):.2f} pairs per prompt, "
          f"at most {max(per_prompt)}; {split})")
    for name in ("prompt", "chosen", "rejected"):
        lengths = torch.tensor([len(e[name]) for e in examples], dtype=torch.float)
        q = torch.quantile(lengths, torch.tensor([0.5, 0.9, 0.99])).tolist()
        print(f"{name:>8} tokens: mean {lengths.mean():.0f}  p50 {q[0]:.0f}  p90 {q[1]:.0f}  p99 {q[2]:.0f}  "
              f"max {lengths.max():.0f}")
    if len(examples) < args.batch_size:
        print(f"note: {len(examples)} pair(s) cannot fill one batch of --batch_size {args.batch_size}: train.py needs "
              f"at least that many")
    padding = {}
    for grouped in (False, True):  # share of padded positions in the micro-batches of one epoch
        epoch = Batches(examples, args.batch_size, args.micro_batch_size, group_by_length=grouped)
        shapes = [collate([pair for pair, _ in micro], 0)["attention_mask"]
                  for i in range(epoch.per_epoch) for micro in epoch(i)]
        positions = sum(m.numel() for m in shapes)
        padding[grouped] = f"{1 - sum(int(m.sum()) for m in shapes) / positions:.1%}" if positions else "n/a"
    print(f"padding in micro-batches of {args.micro_batch_size} pairs: {padding[False]} of positions, "
          f"{padding[True]} with --group_by_length (global batch {args.batch_size})")
    e = examples[0]
    print(f"\nrow {e['row']} as the model sees it (completion between ⟦ ⟧):")
    print(tokenizer.decode(e["prompt"]) + "⟦" + tokenizer.decode(e["chosen"]) + "⟧   <- chosen")
    print("... same prompt ids ...⟦" + tokenizer.decode(e["rejected"]) + "⟧   <- rejected")


if __name__ == "__main__":
    from guards import report_user_errors
    report_user_errors()
    from flags import at_least, text
    from locate import DEFAULT_MODEL
    parser = argparse.ArgumentParser(description="Inspect a preference dataset: counts, lengths, cuts, one example.")
    parser.add_argument("dataset", type=text("a data set"), help="demo | hh | tldr | ultrafeedback | PATH.jsonl")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    parser.add_argument("--data_dir", type=text("a folder"), help="an offline copy of the hub data set, in the hub "
                        "repository's layout")
    parser.add_argument("--model", type=text("a model"), default=DEFAULT_MODEL, help="whose tokenizer and chat "
                        "template to use")
    parser.add_argument("--max_length", type=at_least(2), default=512)
    parser.add_argument("--max_prompt_length", type=at_least(1), default=256, help="less than --max_length")
    parser.add_argument("--micro_batch_size", type=at_least(1), default=4)
    parser.add_argument("--batch_size", type=at_least(1), default=8)
    args = parser.parse_args()
    if args.max_prompt_length >= args.max_length:
        parser.error(f"--max_prompt_length {args.max_prompt_length} must be less than --max_length {args.max_length}")
    inspect(args)
