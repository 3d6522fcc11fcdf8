"""When two things are the same: by what they are, never by a name, a path or a spelling.

  a prompt          its conversation (prompt_key): the messages a chat template renders, a text prompt being one user
                    turn; so a prompt written as text in one row and as a one-message list in another is one prompt;
                    once tokenized, its token ids under the run's tokenizer (same_prompt_tokens)
  a model           a fingerprint of its weights and tokenizer files (model_fingerprint), recorded when a run starts
  a configuration   its train.py flags as train.py's parser reads them (configuration): `--method ipo --ipo_average`
                    is not `--method ipo`, and `--tau=16` is `--tau 16`

sources.py holds out whole prompts by prompt_key and leaves out of a hub set's test draw every prompt its train split
holds; evaluate.py leaves out every prompt the runs trained on, whatever file --prompts names. train.py keeps the
model's fingerprint in every checkpoint: --resume refuses other weights under the same --model, and evaluate.py
refuses a --baseline that is not the model each run started from. study.py names and reuses results by configuration.
"""
import hashlib
import json
import os
import shlex
import struct

from guards import UserError

# ----------------------------------------------------------------------------------------------------------------
# a prompt: its conversation


def prompt_key(prompt):
    """The conversation a prompt is, as text: each message's role and its text without surrounding whitespace, a text
    prompt being one user message (under a chat template both render to the same token ids). Rows with one key hold
    one prompt. (Without a chat template a text prompt is continued as written, so the two render differently there;
    they are still one question, and a question trained on is never scored as held out.)"""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return json.dumps([[m["role"], m["content"].strip()] for m in messages], ensure_ascii=False)


def same_prompt_tokens(a, b):
    """Whether two tokenized pairs have one prompt, where only their tokens are at hand (data.Batches' choice of KTO's
    mismatched rows): their prompt token ids under the run's tokenizer are equal."""
    return a["prompt"].equal(b["prompt"])


# ----------------------------------------------------------------------------------------------------------------
# a model: a fingerprint of its weights and tokenizer

SAMPLES, BLOCK = 16, 256  # bytes read of each tensor: 16 blocks of 256, spread over it (all of a smaller one)
WEIGHT_FILES = (".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")  # weights without a safetensors header


def spread(h, f, begin, end):
    """Hash SAMPLES blocks of BLOCK bytes spread evenly over bytes [begin, end) of file f (all of them if fewer)."""
    if end - begin <= SAMPLES * BLOCK:
        f.seek(begin)
        return h.update(f.read(end - begin))
    for i in range(SAMPLES):
        f.seek(begin + (end - begin - BLOCK) * i // (SAMPLES - 1))
        h.update(f.read(BLOCK))


def hash_file(h, path):
    """A weight file by a sample (a safetensors file: its header, every tensor's name, dtype, shape and place, then
    each tensor sampled; another weight file: its size and a sample of each of 256 equal parts); any other file (config,
    tokenizer, chat template) whole."""
    size = os.path.getsize(path)
    h.update(f"{os.path.basename(path)} {size}\n".encode())
    with open(path, "rb") as f:
        if path.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", f.read(8))
            header = f.read(n)
            h.update(header)
            for name, tensor in sorted(json.loads(header).items()):
                if name != "__metadata__":
                    spread(h, f, 8 + n + tensor["data_offsets"][0], 8 + n + tensor["data_offsets"][1])
        elif path.endswith(WEIGHT_FILES):
            for part in range(256):
                spread(h, f, size * part // 256, size * (part + 1) // 256)
        else:
            h.update(f.read())


def model_fingerprint(name, flag="--model", seed=0):
    """A sha256 of what a model argument loads (locate.py): every file of its folder (weights sampled: hash_file), and
    of its tokenizer's folder where that is another (a config .json's: the default model's); a config .json by its
    text and the seed of its random weights; a hub id by the commit its files come from. A model folder written again
    with other weights under the same path gets another fingerprint. It reads 4 KiB of each tensor, however large:
    1.6 MB of Pythia-2.8B's 11 GB (DESIGN.md, "What is compared by content")."""
    from locate import locate
    source = locate(name, flag)
    if source.kind == "hub":
        from huggingface_hub import try_to_load_from_cache
        cached = try_to_load_from_cache(name, "config.json")  # .../snapshots/COMMIT/config.json, fetched by locate
        return f"hub {name}@{os.path.basename(os.path.dirname(cached)) if isinstance(cached, str) else 'unknown'}"
    h = hashlib.sha256(f"seed {seed}\n".encode() if source.kind == "config" else b"")
    for where in dict.fromkeys([source.path, source.tokenizer]):  # one folder, or a config and a tokenizer folder
        files = [where] if os.path.isfile(where) else [os.path.join(where, f) for f in sorted(os.listdir(where))]
        for path in (f for f in files if os.path.isfile(f)):
            hash_file(h, path)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# a configuration: its parsed flags


def configuration(config):
    """train.py flags as its parser reads them: {flag: its value, or True for a flag that takes none (store_true)}.
    train.py takes no positional argument, so the words after a flag, up to the next flag, are its value; `--f=v` is
    `--f v`; a flag given twice keeps its last value (tests/test_identity.py checks this against train.py's parser)."""
    parsed, flag = {}, None
    for word in shlex.split(config):
        if word.startswith("--"):
            flag, equals, value = word[2:].partition("=")
            parsed[flag] = value if equals else True
        elif flag is None:
            raise UserError(f"{config!r}: {word!r} follows no flag; give flags only, e.g. --method dpo --tau 16")
        else:
            parsed[flag] = word if parsed[flag] is True else f"{parsed[flag]} {word}"
    return parsed


def configuration_name(config):
    """A configuration's name from its parsed flags: the method (train.py's default: tr_dpo), then each other flag in
    alphabetical order, its value written after it: "--method tr_dpo --tau 16" -> "tr_dpo-tau16", "--method ipo
    --ipo_average" -> "ipo-ipo_average". Configurations that parse alike get one name."""
    flags = configuration(config)
    method = flags.pop("method", "tr_dpo")
    return "-".join([method] + [k if v is True else k + v for k, v in sorted(flags.items())])
