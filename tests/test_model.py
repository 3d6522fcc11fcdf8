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
