"""Preference data sources: every data set becomes rows of one shape, checked, with each row's place.

    {"prompt": text or chat messages, "chosen": text, "rejected": text, "where": "file:line" or "source[i]"}

  demo            the built-in set in demo/ (SmolLM2 samples labelled by the demo's gold judge, demo/gold.py)
  hh              Anthropic/hh-rlhf: the prompt is the dialogue prefix that chosen and rejected share
  tldr            Reddit TL;DR comparisons of Stiennon et al. (trl-lib/tldr-preference)
  ultrafeedback   HuggingFaceH4/ultrafeedback_binarized: the messages before the final answers are the prompt
  PATH.jsonl      any local file with prompt/chosen/rejected (text, or lists of {"role", "content"} messages)

The hub sets are read from the hub, or with data_dir (--data_dir) from an offline copy of the hub repository. A bad
row is named with its place: a user's file stops the run with all of them (unless --skip_bad_rows); the hub sets,
known to be dirty, skip and count them. Another lab's schema is a change to normalize() alone. data.py turns the
rows into tokens.
"""
import json
import os

import torch

from guards import UserError
from identity import prompt_key

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO = {"train": os.path.join(HERE, "demo", "train.jsonl"), "test": os.path.join(HERE, "demo", "eval.jsonl")}
HUB = {  # name: (hub id, train split, test split)
    "hh": ("Anthropic/hh-rlhf", "train", "test"),
    "tldr": ("trl-lib/tldr-preference", "train", "validation"),
    "ultrafeedback": ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs", "test_prefs"),
}


class DataError(UserError):
    """Bad data: a message for the user (file, line, what to do), not a traceback."""


class BadRow(ValueError):
    """One malformed row; reported with its place (file:line), all of a file's at once."""


# ----------------------------------------------------------------------------------------------------------------
# rows: every source in one shape


def hh_dialogue(text):
    """'\\n\\nHuman: a\\n\\nAssistant: b ...' -> [{"role": "user", "content": "a"}, {"role": "assistant", ...}, ...],
    the turns as written: one that starts with the assistant keeps that turn (a chat template may refuse it)."""
    first, *chunks = text.split("\n\nHuman: ")
    before = first.split("\n\nAssistant: ")  # what precedes the first Human turn: Assistant turns, or nothing
    if before[0].strip():
        raise BadRow(f"the dialogue starts with {before[0][:40]!r}, not with a Human: or Assistant: turn")
    messages = [{"role": "assistant", "content": t.strip()} for t in before[1:]]
    for chunk in chunks:
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
    chosen, rejected = row["chosen"][cut:].strip(), row["rejected"][cut:].strip()
    if "\n\nHuman:" in chosen or "\n\nHuman:" in rejected:
        raise BadRow("chosen and rejected differ before their last assistant turn: the answers are whole dialogues")
    return {"prompt": hh_dialogue(row["chosen"][: cut - len(marker)]), "chosen": chosen, "rejected": rejected}


def last_answer(side):
    """A completion given as messages ends with the assistant's answer; the text of that answer."""
    if isinstance(side, list):
        if not side or not isinstance(side[-1], dict) or side[-1].get("role") != "assistant":
            raise BadRow("a completion given as messages must end with an assistant message")
        return side[-1].get("content")
    return side


def conversation(row):
    """The prompt of a row. Completions given as messages (UltraFeedback) carry the conversation before the final
    answer, system message and earlier turns included: that is the prompt, and a `prompt` given beside it must agree
    with it (as text: its last user message). A prompt that is a conversation gets turn markers on every model."""
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, list) != isinstance(rejected, list):
        raise BadRow("chosen and rejected must both be text or both be lists of messages")
    if not isinstance(chosen, list):
        return prompt
    earlier = chosen[:-1]
    if earlier != rejected[:-1]:
        raise BadRow("chosen and rejected messages differ before their final answers")
    if not earlier:
        return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    users = [m.get("content") for m in earlier if isinstance(m, dict) and m.get("role") == "user"]
    if isinstance(prompt, str) and (not users or not isinstance(users[-1], str) or users[-1].strip() != prompt.strip()):
        raise BadRow(f"prompt {prompt[:60]!r} is not the last user message before the answers in chosen/rejected")
    if isinstance(prompt, list) and prompt != earlier:
        raise BadRow("prompt messages differ from the messages before the answers in chosen/rejected")
    return earlier


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
    prompt = conversation(row)
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


def report(problems, total, examples):
    """'N bad row(s) of M (reason: count, ...):' and the first `examples` of them with their places."""
    reasons = {}
    for _, reason in problems:
        reasons[reason] = reasons.get(reason, 0) + 1
    listing = "\n  ".join(f"{where}: {reason}" for where, reason in problems[:examples])
    more = f"\n  ... and {len(problems) - examples} more" if len(problems) > examples else ""
    by_reason = "; ".join(f"{reason}: {n}" for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return f"{len(problems)} bad row(s) of {total} ({by_reason}):\n  {listing}{more}"


def checked(source, items, skip_bad_rows, log):
    """Normalize every (place, row); report all bad rows at once: an error, or when skipping a count and examples."""
    rows, problems = [], []
    for where, row in items:
        try:
            rows.append({**normalize(row), "where": where})
        except BadRow as e:
            problems.append((where, str(e)))
    if problems:
        if not skip_bad_rows:
            raise DataError(f"{source}: {report(problems, len(problems) + len(rows), 20)}\n"
                            "fix them, or pass --skip_bad_rows to leave them out (they are counted)")
        log(f"{source}: skipped {report(problems, len(problems) + len(rows), 5)}")
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def hub_split(name, split, data_dir=None):
    """(source, table) of a hub data set's split ("train" or "test": the hub's own names are in HUB), read from the hub
    or from data_dir, an offline copy in the hub repository's layout (e.g. hh-rlhf/*/test.jsonl.gz,
    ultrafeedback_binarized/data/test_prefs-00000-of-00001.parquet), which `datasets` reads the same way."""
    import datasets  # only the hub datasets need it
    hub_id, train_split, test_split = HUB[name]
    split = train_split if split == "train" else test_split
    if data_dir is not None and not os.path.isdir(data_dir):
        raise DataError(f"--data_dir {data_dir}: no such folder (expected an offline copy of {hub_id})")
    try:
        return f"{data_dir or hub_id} {split}", datasets.load_dataset(data_dir or hub_id, split=split)
    except ConnectionError as e:
        raise DataError(f"{hub_id}: the hub cannot be reached ({e}). Copy the data set where it can (`hf download "
                        f"{hub_id} --repo-type dataset --local-dir DIR`) and pass --data_dir DIR")
    except ValueError as e:  # an offline copy without this split
        raise DataError(f"{data_dir or hub_id}: no split {split!r} ({e}); an offline copy of {hub_id} needs the "
                        f"hub's file layout, in which file names carry the split")


def hub_row(name, row):
    """A hub table's row in the common shape, or the BadRow saying why it cannot be."""
    try:
        return hh_row(row) if name == "hh" else row
    except BadRow as e:
        return e


def skips_bad_rows(name, skip_bad_rows):
    """Whether bad rows are left out (counted) instead of stopping the run: always for the named hub sets, which are
    known to be dirty (HH has empty and identical answers); for a user's file or the demo, with --skip_bad_rows."""
    return skip_bad_rows or name in HUB


def split_rows(name, split, data_dir=None):
    """The one place a --dataset name is read: (source, table, parse). table[i] is a raw row (a file's lines are read
    at once; a hub table's rows when asked for), parse(i, raw) -> (its place, the row in the common shape, or the
    BadRow saying why it cannot be). split is "train" or "test"."""
    if name == "demo" or name.endswith(".jsonl"):
        if data_dir is not None:
            raise DataError(f"--data_dir is for an offline copy of {', '.join(HUB)}; --dataset {name} is a file")
        path = DEMO[split] if name == "demo" else name
        return path, list(jsonl_lines(path)), lambda i, line: line  # a line is (place, parsed row or BadRow)
    if name not in HUB:
        raise DataError(f"--dataset {name!r}: expected demo, {', '.join(HUB)} or a path ending in .jsonl")
    source, table = hub_split(name, split, data_dir)
    return source, table, lambda i, raw: (f"{source}[{i}]", hub_row(name, raw))


def load_rows(name, split="train", skip_bad_rows=False, log=print, data_dir=None):
    """The rows of a dataset's split, every one checked; bad rows stop the run, all listed in one message, or are
    skipped and counted (skips_bad_rows)."""
    source, table, parse = split_rows(name, split, data_dir)
    return checked(source, (parse(i, raw) for i, raw in enumerate(table)), skips_bad_rows(name, skip_bad_rows), log)


def shuffled(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def held_out(name, n, seed=0, skip_bad_rows=False, log=print, data_dir=None, trained=frozenset()):
    """n pairs drawn at random from the test split (of a file: from all its rows), in the order drawn. The draw depends
    on the seed alone, so every rank and every run holding the same seed gets the same pairs. Only the drawn rows are
    checked; a bad one (skipped and counted where skips_bad_rows) is replaced by the next draw, and so is one whose
    prompt (identity.prompt_key) is in `trained`, the prompts trained on (counted and said)."""
    if n <= 0:
        return []
    source, table, parse = split_rows(name, "test", data_dir)
    rows, problems, seen = [], [], 0
    for i in shuffled(len(table), seed):
        where, raw = parse(i, table[i])
        try:
            row = {**normalize(raw), "where": where}
        except BadRow as e:
            if not skips_bad_rows(name, skip_bad_rows):
                raise DataError(f"{where}: {e}\nfix it, or pass --skip_bad_rows to leave such rows out")
            problems.append((where, str(e)))
            continue
        seen += 1
        if prompt_key(row["prompt"]) not in trained:
            rows.append(row)
        if len(rows) == n:
            break
    log(f"held out {len(rows)} pairs drawn at random (seed {seed}) from {source} ({len(table)} rows)"
        + (f"; left out {seen - len(rows)} of the {seen} good rows drawn: their prompt is trained on"
           if seen > len(rows) else "")
        + (f"; skipped {report(problems, f'the {seen + len(problems)} drawn', 3)}" if problems else ""))
    if not rows:
        raise DataError(f"{source}: no usable rows")
    return rows


def prompt_groups(rows):
    """The rows' indices grouped by prompt (its conversation, identity.prompt_key: as text or as one message alike),
    in the order of each prompt's first row: the pairs of one prompt (several samples of a policy, UltraFeedback's
    "all pairs", a ranking, duplicates) are held out, or trained on, together."""
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(prompt_key(row["prompt"]), []).append(i)  # the conversation, however it is written
    return list(groups.values())


def load_splits(name, eval_pairs, seed=0, skip_bad_rows=False, log=print, data_dir=None):
    """(training rows, held-out rows). demo and the hub sets: the train split, and eval_pairs pairs drawn at random
    from the test split (held_out), less those whose prompt the train split holds too (counted). A JSONL file has no
    test split: whole prompts, drawn at random, are held out with all their pairs until eval_pairs rows are (one pair
    per prompt: eval_pairs rows), and the others train, so that no held-out prompt is trained on. eval_pairs = 0 holds
    out nothing."""
    if eval_pairs < 0:
        raise DataError(f"--eval_pairs {eval_pairs} must be 0 (no held-out pairs) or more")
    rows = load_rows(name, "train", skip_bad_rows, log, data_dir)
    if not name.endswith(".jsonl"):
        trained = {prompt_key(r["prompt"]) for r in rows}  # a test row may repeat a training prompt: left out, counted
        return rows, held_out(name, eval_pairs, seed, skip_bad_rows, log, data_dir, trained)
    groups, held, prompts = prompt_groups(rows), [], 0
    for g in shuffled(len(groups), seed):  # one pair per prompt: the rows drawn as if drawn one by one
        if len(held) >= eval_pairs:
            break
        held, prompts = held + groups[g], prompts + 1
    if len(held) == len(rows):
        raise DataError(f"--eval_pairs {eval_pairs} would hold out all {len(rows)} pairs of {name} ({len(groups)} "
                        "prompt(s), each held out with all its pairs), leaving none to train on; lower it (0 holds out "
                        "nothing)")
    if held:
        log(f"held out {len(held)} of the {len(rows)} pairs of {name}: {prompts} of its {len(groups)} prompts with all "
            f"their pairs, drawn at random (seed {seed})")
    kept = set(range(len(rows))) - set(held)
    return [r for i, r in enumerate(rows) if i in kept], [rows[i] for i in held]
