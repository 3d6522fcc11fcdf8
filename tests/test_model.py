"""Per-sequence log-probs against a float64 recomputation, token by token."""
import pytest
import torch

from conftest import PAIRS, TINY
from data import collate, tokenize
from sources import load_rows
from model import load_model, sequence_logps


def test_sequence_logps_equal_a_float64_sum_over_completion_tokens(chat_tokenizer):
    model = load_model(TINY).double()
    examples = tokenize(load_rows(PAIRS)[:4], chat_tokenizer, 128, 64, log=lambda m: None)
    batch = collate(examples, pad_id=chat_tokenizer.pad_token_id)
    got = sequence_logps(model, batch)
    got_mean = sequence_logps(model, batch, average=True)
    for i, e in enumerate(examples * 2):
        completion = (e["chosen"] if i < 4 else e["rejected"]).tolist()
        ids = torch.tensor([e["prompt"].tolist() + completion])  # alone, unpadded
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        total = sum(torch.log_softmax(logits[len(e["prompt"]) + t - 1], -1)[tok].item() for t, tok in enumerate(completion))
        assert abs(got[i].item() - total) < 1e-9
        assert abs(got_mean[i].item() - total / len(completion)) < 1e-9


def test_chunked_token_logps_and_their_gradient_equal_a_full_float64_log_softmax():
    from model import token_logps
    g = torch.Generator().manual_seed(0)
    logits = (5 * torch.randn(3, 150, 50, generator=g)).to(torch.bfloat16).requires_grad_(True)  # 3 chunks of 64
    labels = torch.randint(0, 50, (3, 150), generator=g)
    weights = torch.randn(3, 150, generator=g, dtype=torch.float64)
    got = token_logps(logits, labels)
    (got.double() * weights).sum().backward()
    reference = logits.detach().double().requires_grad_(True)
    want = torch.log_softmax(reference, -1).gather(2, labels.unsqueeze(-1)).squeeze(-1)
    (want * weights).sum().backward()
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), want, atol=1e-5)  # bf16 inputs, fp32 arithmetic: no bf16 rounding of the result
    assert torch.allclose(logits.grad.double(), reference.grad, atol=2e-2, rtol=1e-2)  # the gradient is stored in bf16


def family_configs():
    """Tiny configs of the four architectures people train with this: each its own model_type and layout."""
    from transformers import GPT2Config, GPTNeoXConfig, Qwen2Config
    from model import load_config
    return {"llama": load_config(TINY),
            "gpt2": GPT2Config(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
                               eos_token_id=0),
            "gpt_neox": GPTNeoXConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, bos_token_id=0, eos_token_id=0),
            "qwen2": Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, intermediate_size=64)}


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_right_padded_rows_need_no_attention_mask(family):
    """sequence_logps passes no mask: each padded row's log-prob equals that of the row alone, in float64."""
    from transformers import AutoModelForCausalLM
    from data import pad
    from model import dropout_off
    torch.manual_seed(0)
    model = dropout_off(AutoModelForCausalLM.from_config(family_configs()[family])).double().eval()
    rows = [([5, 6, 7], [8, 9]), ([5, 6], [10, 11, 12, 13, 14]), ([3, 4, 5, 6, 7, 8], [9])]  # (prompt, completion)
    batch = pad([(torch.tensor(p), torch.tensor(c)) for p, c in rows], pad_id=0)
    got = sequence_logps(model, batch)
    for i, (prompt, completion) in enumerate(rows):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0]
        total = sum(torch.log_softmax(logits[len(prompt) + t - 1], -1)[tok].item() for t, tok in enumerate(completion))
        assert abs(got[i].item() - total) < 1e-9, (family, i)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_a_training_micro_step_reads_nothing_back_from_the_device(family, monkeypatch):
    """On the meta device a tensor has no values, so any read of one (.item(), bool(), nonzero, ...) is an error:
    forward, reference forward, loss, backward and clipping of one micro-step must run there. The one read left is
    transformers' own packed-sequence check, once per forward (listed in the README); it is counted, not run."""
    import copy
    import transformers.masking_utils
    from transformers import AutoModelForCausalLM
    from losses import dpo_loss
    from model import dropout_off
    checks = []
    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda ids: checks.append(1))
    with torch.device("meta"):
        policy = dropout_off(AutoModelForCausalLM.from_config(family_configs()[family]))
        reference = copy.deepcopy(policy).requires_grad_(False)
    policy.activation_checkpointing_enable({"use_reentrant": False})
    policy.train()
    batch = {"input_ids": torch.zeros(4, 20, dtype=torch.long, device="meta"),
             "loss_mask": torch.ones(4, 20, dtype=torch.bool, device="meta"), "first": 5}
    policy_logps = sequence_logps(policy, batch)
    with torch.no_grad():
        ref_logps = sequence_logps(reference, batch)
    losses, _, _ = dpo_loss(*policy_logps.chunk(2), *ref_logps.chunk(2), beta=0.1)
    losses.mean().backward()
    torch.nn.utils.clip_grad_norm_(policy.parameters(), 2.0)
    assert len(checks) == 2  # one per forward: policy and reference
