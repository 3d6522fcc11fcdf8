"""The tokenization cache: data.tokenize's table of token ids, computed once and kept on disk.

Tokenizing runs through `datasets` map, in several processes (up to 8) for sets of LARGE pairs or more; the table is
saved under $TRDPO_TOKENIZED (default ~/.cache/trdpo/tokenized), one folder per key, a hash of everything the ids
depend on. A second run with the same key reads the folder instead; under torchrun rank 0 tokenizes while the other
ranks wait, then they read its folder. Measured figures: DESIGN.md.
"""
import hashlib
import json
import os
import shutil

import torch

CACHE = os.environ.get("TRDPO_TOKENIZED", os.path.join(os.environ.get("TRDPO_CACHE", os.path.expanduser(
    "~/.cache/trdpo")), "tokenized"))
LARGE = 10_000  # rows from which tokenization runs in several processes (below, starting them costs more than it saves)


def key(rows, tokenizer, max_length, max_prompt_length, code):
    """A hash of everything the token ids depend on: the rows, the tokenizer (vocabulary, merges, special tokens,
    pre/post-processing), its chat template, the lengths, and `code`, the file that encodes them (data.py)."""
    import tokenizers
    import transformers
    h = hashlib.sha256()
    with open(os.path.abspath(code), "rb") as f:
        h.update(f.read())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, tokenizer.bos_token_id,
                         tokenizer.eos_token_id, max_length, max_prompt_length, transformers.__version__,
                         tokenizers.__version__]).encode())
    for r in rows:
        h.update(json.dumps([r["prompt"], r["chosen"], r["rejected"]]).encode() + b"\n")
    return h.hexdigest()[:32]


def table(rows, encode, arguments, key, cache_dir=None, processes=None):
    """(table of encode(row, **arguments) for every row, how it was obtained): read from the cache, or computed with
    `datasets` map (in several processes for a large set) and written to the cache under a temporary name, then
    renamed."""
    import datasets
    path = os.path.join(cache_dir or CACHE, key)
    if os.path.isdir(path):
        return datasets.load_from_disk(path), f"read from the cache {path}"
    processes = processes or (min(8, os.cpu_count() or 1) if len(rows) >= LARGE else 1)
    bars_were_off = datasets.are_progress_bars_disabled()
    if len(rows) < LARGE:  # a progress bar only where it is worth watching
        datasets.disable_progress_bars()
    ids = datasets.List(datasets.Value("int32"))
    features = datasets.Features({"prompt_ids": ids, "chosen_ids": ids, "rejected_ids": ids, "status": datasets.Value(
        "string"), "refusal": datasets.Value("string"),
        **{k: datasets.Value("bool") for k in ("turns_dropped", "text_cut", "completion_cut")}})
    texts = datasets.Dataset.from_dict({"prompt": [json.dumps(r["prompt"]) for r in rows],  # text or messages
                                        "chosen": [r["chosen"] for r in rows],
                                        "rejected": [r["rejected"] for r in rows]})
    result = texts.map(encode, fn_kwargs=arguments, num_proc=processes if processes > 1 else None,
                       remove_columns=["prompt", "chosen", "rejected"], features=features, new_fingerprint=key,
                       desc="tokenizing")
    how = f"in {processes} process{'es' if processes > 1 else ''}"
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        result.save_to_disk(tmp)
        if not os.path.isdir(path):  # another process may have finished the same first
            os.rename(tmp, path)
        how += f", cached in {path}"
    except OSError as e:  # a read-only or full disk: go on without the cache
        how += f", not cached ({e})"
    shutil.rmtree(tmp, ignore_errors=True)
    if not bars_were_off:
        datasets.enable_progress_bars()
    return result, how


def ragged(table, name):
    """A column of int32 lists -> one tensor per row, views of one flat tensor read in one pass (not row by row)."""
    import pyarrow.compute as pc
    column = table.data.column(name).combine_chunks()
    flat = torch.from_numpy(column.flatten().to_numpy(zero_copy_only=False).copy())
    return torch.split(flat, pc.list_value_length(column).to_numpy().tolist())
