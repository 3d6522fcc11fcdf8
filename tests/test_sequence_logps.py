"""model.sequence_logps against an independent float64 computation, token by token, of each row alone.

Also the grader of LESSON.md's sequence_logps exercise: rewrite sequence_logps in model.py (plain PyTorch will do),
then `pytest tests/test_sequence_logps.py -k sequence_logps`. A failure names the row, what was expected and what
came out, and, where the result is what a typical mistake gives (the shift by one between logits and labels, the
completion mask, sum against mean, the softmax's dimension), that mistake and its fix.
"""
import math

import pytest
import torch

from data import pad
from grading import call
from model import sequence_logps

# (prompt, completion) token ids: prompts and completions of different lengths, so that rows are right-padded and
# the first completion token sits at a different position in each row
ROWS = [([5, 6, 7], [8, 9, 10, 11]), ([5, 6], [12, 13, 14, 15, 16, 17]), ([3, 4, 5, 6, 7, 8], [9, 20]),
        ([21, 22, 23, 24], [25])]
PAD = 0


def tiny_model():
    """A one-layer Llama in float64 whose next-token distributions are far from uniform (a wrong token costs nats)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=1.0, pad_token_id=PAD)
    return LlamaForCausalLM(config).double().eval()


def batch():
    """The rows as train.py batches them (data.pad): input_ids, attention_mask, loss_mask (True on completion
    tokens), each (N, T), and first, the earliest completion position."""
    return pad([(torch.tensor(p), torch.tensor(c)) for p, c in ROWS], pad_id=PAD)


def expected(model, average):
    """Each row alone, unpadded: the sum (or mean) over its completion tokens y_t of log softmax(logits)[y_t], the
    logits at the position before y_t, in float64 with Python's math."""
    out = []
    for prompt, completion in ROWS:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + completion])).logits[0].tolist()
        total = 0.0
        for t, token in enumerate(completion):
            row = logits[len(prompt) + t - 1]  # position len(prompt) + t - 1 predicts completion token t
            top = max(row)
            total += row[token] - top - math.log(sum(math.exp(x - top) for x in row))
        out.append(total / len(completion) if average else total)
    return out


# what each typical wrong version returns on the batch, and the sentence a student reads
SHIFT = "the logits at position t predict token t + 1: pair logits[:, :-1] with labels input_ids[:, 1:]"
MISTAKES = {
    "no shift": SHIFT + " (here each token was scored by the logits at its own position)",
    "shifted the other way": SHIFT + " (here logits[:, 1:] were paired with input_ids[:, :-1])",
    "mask not shifted": "the mask was not shifted with the labels: the labels are input_ids[:, 1:], so their mask is "
                        "loss_mask[:, 1:] (loss_mask[:, :-1] counts the prompt's last token and drops the "
                        "completion's last)",
    "prompt counted": "the prompt's tokens were counted: only completion tokens count, where loss_mask is True (the "
                      "attention mask covers the prompt too)",
    "no mask": "every position was counted, the prompt's and the padding's: multiply by the completion mask "
               "loss_mask[:, 1:] before summing",
    "softmax over time": "the softmax ran over the positions (dim 1): normalise over the vocabulary, the last "
                         "dimension of logits (N, T, V): log_softmax(dim=-1)",
    "softmax over the batch": "the softmax ran over the rows (dim 0): normalise over the vocabulary, the last "
                              "dimension of logits (N, T, V): log_softmax(dim=-1)",
    "probabilities": "probabilities were summed, not log-probabilities: log_softmax, not softmax",
    "mean over all positions": "the mean ran over every position (T - 1 of them): divide by the number of completion "
                               "tokens, loss_mask[:, 1:].sum(-1)",
    "mean": "average=False returns the sum over the completion tokens, not their mean: a sequence's log-prob is the "
            "sum of its tokens'",
    "sum": "average=True returns the mean over the completion tokens: the sum divided by their number, "
           "loss_mask[:, 1:].sum(-1)",
}


def wrong_versions(model, b, average):
    """{mistake: (N,) what a version with that mistake returns}, in float64 from the padded batch's logits."""
    ids, mask, attention = b["input_ids"], b["loss_mask"].double(), b["attention_mask"].double()
    with torch.no_grad():
        logits = model(input_ids=ids).logits

    def scores(logp, labels):
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)

    right = scores(logits[:, :-1].log_softmax(-1), ids[:, 1:])
    kept = {  # (token scores, mask) of each mistake: summed, or averaged over the mask
        "no shift": (scores(logits.log_softmax(-1), ids), mask),
        "shifted the other way": (scores(logits[:, 1:].log_softmax(-1), ids[:, :-1]), mask[:, 1:]),
        "mask not shifted": (right, mask[:, :-1]),
        "prompt counted": (right, attention[:, 1:]),
        "no mask": (right, torch.ones_like(right)),
        "softmax over time": (scores(logits[:, :-1].log_softmax(1), ids[:, 1:]), mask[:, 1:]),
        "softmax over the batch": (scores(logits[:, :-1].log_softmax(0), ids[:, 1:]), mask[:, 1:]),
        "probabilities": (scores(logits[:, :-1].softmax(-1), ids[:, 1:]), mask[:, 1:]),
    }
    out = {name: (s * m).sum(-1) / (m.sum(-1) if average else 1) for name, (s, m) in kept.items()}
    out["mean over all positions"] = (right * mask[:, 1:]).mean(-1)
    total = (right * mask[:, 1:]).sum(-1)
    out["sum" if average else "mean"] = total if average else total / mask[:, 1:].sum(-1)
    return out


def graded(model, average):
    """The student's (N,) result, checked for its type and shape."""
    got = call(sequence_logps, model, batch(), average=average)
    if not (isinstance(got, torch.Tensor) and got.shape == (len(ROWS),)):
        pytest.fail(f"sequence_logps must return a tensor of shape ({len(ROWS)},), one log-prob per row of the batch; "
                    f"got {getattr(got, 'shape', type(got).__name__)}", pytrace=False)
    return got


def check(got, model, average):
    want = expected(model, average)
    what = "mean" if average else "sum"
    for i, ((prompt, completion), w) in enumerate(zip(ROWS, want)):
        g = got[i].item()
        if not math.isclose(g, w, rel_tol=1e-5, abs_tol=1e-6):  # float32 arithmetic is accepted
            likely = [MISTAKES[name] for name, version in wrong_versions(model, batch(), average).items()
                      if torch.allclose(got.detach().double(), version, rtol=1e-5, atol=1e-6)]
            pytest.fail(f"sequence_logps with average={average}, row {i} ({len(prompt)} prompt and "
                        f"{len(completion)} completion tokens, right-padded): the {what} over the completion tokens "
                        f"y_t of log softmax(logits at the position before y_t)[y_t]: expected {w!r}, got {g!r}"
                        + (f": likely {likely[0]}" if likely else ""), pytrace=False)


def test_sequence_logps_is_the_sum_of_the_completion_tokens_log_probs():
    model = tiny_model()
    check(graded(model, average=False), model, average=False)


def test_sequence_logps_with_average_is_the_mean_over_the_completion_tokens():
    model = tiny_model()
    check(graded(model, average=True), model, average=True)


def test_sequence_logps_passes_the_gradient_to_the_model():
    """train.py trains the policy through these log-probs: the caller decides when no gradient is needed."""
    model = tiny_model()
    got = graded(model, average=False)
    if not got.requires_grad:
        pytest.fail("sequence_logps returned log-probs without a gradient (no torch.no_grad(), .detach() or .item() "
                    "inside: train.py trains the policy through them, and runs the reference under no_grad itself)",
                    pytrace=False)
    got.sum().backward()
    assert model.lm_head.weight.grad is not None and model.lm_head.weight.grad.abs().sum() > 0, \
        "sequence_logps: no gradient reaches the model's weights"
