"""Tiny models of the four families users bring, with tokenizers shaped like the real ones, built from SmolLM2's
tokenizer (no download). In SmolLM2's vocabulary id 0 is <|endoftext|>, 1 <|im_start|>, 2 <|im_end|>.

  pythia  GPT-NeoX; EOS = BOS = <|endoftext|> = id 0, no pad token, no chat template
  gpt2    GPT-2; resid/embd/attn_pdrop 0.1 as GPT-2 ships them, EOS id 0, no pad token, no chat template
  llama   Llama; Llama-3's chat template, which writes a BOS (<|begin_of_text|>) and ends turns with <|eot_id|>, an
          EOS (<|end_of_text|>) that is not the end of turn, Llama-3's pre-tokenizer (runs of newlines are one
          piece), and a BOS put before any plain text
  qwen2   Qwen2; Qwen2.5's ChatML template (a default system prompt), EOS <|im_end|>, pad <|endoftext|>, and
          Qwen2.5-Instruct's generation_config (repetition_penalty 1.05, temperature 0.7, top-p 0.8, top-k 20)
"""
import copy

import torch
from tokenizers import Regex, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

LLAMA3_TEMPLATE = (  # Meta-Llama-3-8B-Instruct's template, as shipped
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's template without its tool-calling branches
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    "<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")  # Llama-3's tokenizer.json
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BEGIN_OF_TEXT, END_OF_TEXT, EOT_ID = 49152, 49153, 49156  # the ids the five added tokens get, in that order
IM_END, ENDOFTEXT = 2, 0


def tokenizer_of(family, smollm2):
    t = copy.deepcopy(smollm2)
    if family in ("pythia", "gpt2"):
        t.chat_template = None
        t.bos_token = t.eos_token = "<|endoftext|>"
        t.pad_token = None
    elif family == "llama":
        t.add_tokens(LLAMA3_TOKENS, special_tokens=True)
        t.bos_token, t.eos_token, t.pad_token = "<|begin_of_text|>", "<|end_of_text|>", None
        t.backend_tokenizer.post_processor = TemplateProcessing(  # Llama-3 puts a BOS before any text it tokenizes
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>",
                                                                                              BEGIN_OF_TEXT)])
        t.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        t.chat_template = LLAMA3_TEMPLATE
    elif family == "qwen2":
        t.bos_token, t.eos_token, t.pad_token = None, "<|im_end|>", "<|endoftext|>"
        t.chat_template = QWEN25_TEMPLATE
    return t


def config_of(family, vocab_size):
    small = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, max_position_embeddings=256)
    if family == "pythia":
        return GPTNeoXConfig(**small, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    if family == "gpt2":  # GPT-2's own names; its dropout rates are left at GPT-2's 0.1
        return GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=256, bos_token_id=0,
                          eos_token_id=0)
    if family == "llama":
        return LlamaConfig(**small, num_key_value_heads=2, bos_token_id=BEGIN_OF_TEXT, eos_token_id=END_OF_TEXT,
                           tie_word_embeddings=True)
    return Qwen2Config(**small, num_key_value_heads=2, eos_token_id=IM_END, tie_word_embeddings=True)


def generation_config_of(family):
    if family == "llama":  # Meta ships both ends: the end of the text and the end of a turn
        return GenerationConfig(bos_token_id=BEGIN_OF_TEXT, eos_token_id=[END_OF_TEXT, EOT_ID])
    if family == "qwen2":  # Qwen2.5-Instruct's
        return GenerationConfig(bos_token_id=ENDOFTEXT, eos_token_id=[IM_END, ENDOFTEXT], pad_token_id=ENDOFTEXT,
                                do_sample=True, repetition_penalty=1.05, temperature=0.7, top_p=0.8, top_k=20)
    return GenerationConfig(bos_token_id=0, eos_token_id=0)


def save_family(family, smollm2, folder, seed=0):
    """A model folder as a user downloads it: config, random weights, tokenizer, generation_config."""
    tokenizer = tokenizer_of(family, smollm2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_of(family, len(tokenizer)))
    model.generation_config = generation_config_of(family)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
