"""Each method of losses.METHODS is one entry, and everything a run does with it follows from the entry (fast): its
loss runs on the log-probs of its pairing, its own flags reach train.py, and how its loss reads a sequence's log-probs
(summed, or per-token means) is asked of the entry by train.py's training and held-out metrics and by evaluate.py."""
import pytest
import torch

from losses import METHODS, as_read, reduction
from test_flags import parser_of


@pytest.mark.parametrize("method", METHODS)
def test_a_method_declares_a_loss_a_pairing_a_reduction_and_its_own_flags(method):
    loss, pairing, reduced, own = METHODS[method]
    assert callable(loss) and pairing in ("paired", "unpaired") and reduced in ("sum", "mean")
    train = parser_of("train.py")
    for name, (default, _, _) in own.items():  # each offered by train.py, with its default
        assert train.get_default(name) == default, f"--{name} of {method} is not a train.py flag"
    assert {method, f"tr_{method}"} <= set(next(a for a in train._actions if a.dest == "method").choices)


@pytest.mark.parametrize("method", METHODS)
def test_a_loss_runs_on_the_log_probs_of_its_pairing_with_its_own_flags(method):
    loss, pairing, _, own = METHODS[method]
    defaults = {name: default for name, (default, _, _) in own.items()}
    policy, ref = torch.tensor([-3.0, -5.0, -4.0, -6.0]), torch.tensor([-3.5, -4.5, -4.0, -6.5])  # 2 pairs
    if pairing == "paired":
        losses, chosen, rejected = loss(*policy.chunk(2), *ref.chunk(2), 0.1, **defaults)
    else:
        losses, rewards = loss(policy, ref, torch.tensor([True, True, False, False]), torch.tensor(0.2), 0.1,
                               **defaults)
    assert torch.isfinite(losses).all() and len(losses) in (2, 4)


def test_a_runs_reduction_is_its_methods_and_ipo_average_reads_the_mean():
    for method, (_, _, reduced, _) in METHODS.items():
        assert reduction({"method": method}) == reduction({"method": f"tr_{method}"}) == reduced
    assert reduction({"method": "tr_ipo", "ipo_average": True}) == reduction({"method": "ipo", "ipo_average": True}) \
        == "mean"
    assert reduction({"method": "sft"}) == reduction({}) == "sum"  # SFT, and a plain model given as a checkpoint


def test_summed_log_probs_are_read_per_completion_token_under_the_mean():
    logps, mask = torch.tensor([-6.0, -2.0]), torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    assert as_read(logps, mask, "sum").tolist() == [-6.0, -2.0]
    assert as_read(logps, mask, "mean").tolist() == [-2.0, -1.0]


def test_evaluate_reads_an_ipo_average_runs_reward_accuracy_on_per_token_means():
    """A pair whose chosen answer (10 tokens) gained 2 nats over SFT and whose rejected answer (1 token) gained 1:
    summed, the chosen one gained more (+1); per token it gained less (0.2 against 1.0). An --ipo_average run trained
    on the per-token margin, so its accuracy is 0 there; it was always read on sums (1)."""
    from evaluate import reward_accuracy
    mask = torch.zeros(2, 12)
    mask[0, 2:12], mask[1, 2] = 1, 1  # the chosen row 10 completion tokens, the rejected row 1
    policy, sft = [torch.tensor([-10.0, -1.0])], [torch.tensor([-12.0, -2.0])]
    batches = [{"loss_mask": mask}]
    assert reward_accuracy(policy, sft, batches, reduction({"method": "tr_ipo", "ipo_average": True})) == 0.0
    assert reward_accuracy(policy, sft, batches, reduction({"method": "tr_ipo"})) == 1.0
