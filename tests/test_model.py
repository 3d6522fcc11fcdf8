"""Per-sequence log-probs against a float64 recomputation, token by token."""
import torch

from conftest import PAIRS, TINY
from data import collate, load_rows, tokenize
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
