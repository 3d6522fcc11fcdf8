"""Models: how a forward pass becomes per-sequence log-probs (sequence_logps), and the models a run uses, loaded with
every dropout off. What a model argument may be (the built-in model, a checkpoint, a folder, a config, a GGUF file,
a hub id) is locate.py's concern.
"""
import os

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from guards import UserError
from locate import TOKENIZER_FILES, locate, named, reading

# ----------------------------------------------------------------------------------------------------------------
# log-probs: log pi(y|x) for every row of a batch, from one forward pass


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
    """(N,) log pi(y|x): the sum over completion tokens of log pi(y_t | x, y_<t); the mean instead if `average`.

    In plain PyTorch, for logits (N, T, V) and completion mask (N, T), with position t predicting token t + 1:
        logps = (logits[:, :-1].log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2) * mask[:, 1:]).sum(-1)
    The code below computes exactly that (tests/test_model.py checks it against a float64 token-by-token sum), with
    two optimizations: logits only from the first completion position on, and token_logps' chunked fp32
    log-normaliser instead of a full fp32 log_softmax over the vocabulary."""
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


# ----------------------------------------------------------------------------------------------------------------
# loading: tokenizer, config and model of a model argument, dropout off

def load_tokenizer(name, log=print, flag="--model"):
    """The tokenizer of `name` (a config .json gets the default model's tokenizer)."""
    source = locate(name, flag)
    if os.path.isdir(source.tokenizer) and not any(os.path.exists(os.path.join(source.tokenizer, f))
                                                   for f in TOKENIZER_FILES):
        raise UserError(f"{named(flag, name)} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])} in "
                        f"{source.tokenizer}): save it beside the weights with tokenizer.save_pretrained(DIR)")
    with reading(flag, name, source.kind, source.tokenizer):
        tokenizer = AutoTokenizer.from_pretrained(source.tokenizer)
    if tokenizer.pad_token is None:  # padding is masked out everywhere, so any id will do
        tokenizer.pad_token = tokenizer.eos_token
        log(f"note: {name} has no pad token; padding with eos ({tokenizer.eos_token!r}), always masked out")
    if tokenizer.chat_template is None:
        log(f"note: {name} has no chat template; prompts are rendered as plain text (Human:/Assistant: turns)")
    return tokenizer


def source_config(source, flag, name):
    """The model's config with every dropout rate set to 0, whatever the family calls it: `attention_dropout`
    (Llama, Qwen2), `hidden_dropout` (GPT-NeoX), `resid_pdrop`/`embd_pdrop`/`attn_pdrop` (GPT-2, GPT-J, Phi)."""
    with reading(flag, name, source.kind, source.path):
        config = AutoConfig.from_pretrained(source.path)
    for key, value in config.to_dict().items():
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
            setattr(config, key, 0.0)
    return config


def load_config(name, flag="--model"):
    """The config of a model argument, every dropout rate 0 (source_config)."""
    return source_config(locate(name, flag), flag, name)


def learned_positions(config):
    """The positions a model of `config` has an embedding for (GPT-2's wpe, OPT's embed_positions): no longer
    sequence can pass its forward. None where positions are computed (rotary, ALiBi). Read from the model built on the
    meta device: no memory, no weights read."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    tokens = model.get_input_embeddings()
    learned = any(isinstance(m, torch.nn.Embedding) and m is not tokens for m in model.modules())
    return getattr(config, "max_position_embeddings", None) if learned else None


def check_model_flags(parser, args):
    """train.py's flags whose domain is the model's: checked once its config is read, before any tokenizing or forward
    (a model that cannot be found, or whose config or weights files cannot be read, stops here too, in a sentence).
    --max_length may not pass the positions a model learned (an IndexError in the first forward, a device-side assert
    on CUDA); rotary and ALiBi models take any length."""
    positions = learned_positions(load_config(args.model))
    if positions and args.max_length > positions:
        parser.error(f"--max_length {args.max_length} is beyond the {positions} positions --model {args.model} has "
                     f"learned: pass --max_length {positions} or less")


def dropout_off(model):
    """p = 0 in every nn.Dropout, in case a family hard-codes a rate its config does not name. Policy and reference
    log-ratios must be deterministic, also in train mode (gradient checkpointing needs it)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def load_model(name, dtype=torch.float32, seed=0, flag="--model"):
    """A causal LM in `dtype` with every dropout off: policy and reference log-ratios must be deterministic."""
    source = locate(name, flag)
    config = source_config(source, flag, name)
    if source.kind == "config":
        torch.manual_seed(seed)  # the same random init on every rank and in every run
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        with reading(flag, name, source.kind, source.path):
            model = AutoModelForCausalLM.from_pretrained(source.path, config=config, dtype=dtype)
    return dropout_off(model).eval()
