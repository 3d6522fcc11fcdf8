"""Each loss against an independent float64 computation written out with Python's math module."""
import math

import pytest
import torch

from losses import dpo_loss, ipo_loss, kto_loss


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-50 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_loss_matches_float64_closed_form(beta):
    pc, pr, rc, rr = random_logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, beta)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx(math.log(1 + math.exp(-beta * h)), rel=1e-12, abs=1e-12)
        assert chosen_rewards[i].item() == pytest.approx(beta * (pc[i].item() - rc[i].item()), rel=1e-12)
        assert rejected_rewards[i].item() == pytest.approx(beta * (pr[i].item() - rr[i].item()), rel=1e-12)


def test_dpo_loss_is_log2_and_rewards_zero_when_policy_equals_reference():
    pc, pr, _, _ = random_logps()
    losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1)
    assert torch.allclose(losses, torch.full_like(losses, math.log(2)), rtol=0, atol=1e-15)
    assert torch.all(chosen_rewards == 0) and torch.all(rejected_rewards == 0)


def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_beta_h():
    pc, pr, rc, rr = random_logps(4)
    pc.requires_grad_(True)
    losses, _, _ = dpo_loss(pc, pr, rc, rr, 0.1)
    losses.sum().backward()
    for i in range(4):  # dL/d(log pi_c) = -beta * sigmoid(-beta * h)
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert pc.grad[i].item() == pytest.approx(-0.1 * sigmoid(-0.1 * h), rel=1e-10)


def test_rewards_are_detached():
    pc, pr, rc, rr = random_logps(4)
    pc.requires_grad_(True)
    _, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, 0.1)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_ipo_loss_matches_float64_closed_form(beta):
    pc, pr, rc, rr = random_logps(seed=1)
    losses, _, _ = ipo_loss(pc, pr, rc, rr, beta)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        assert losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)


def test_ipo_loss_is_zero_exactly_at_the_target_margin():
    pc, pr, rc, rr = [torch.tensor([x], dtype=torch.float64) for x in (-10.0, -20.0, -12.0, -19.5)]
    h = (-10.0 + 12.0) - (-20.0 + 19.5)  # 2.5 = 1 / (2 * 0.2)
    losses, _, _ = ipo_loss(pc, pr, rc, rr, beta=1 / (2 * h))
    assert losses.item() == pytest.approx(0.0, abs=1e-24)


def kto_reference(policy, ref, desirable, policy_kl, ref_kl, beta, lambda_d, lambda_u):
    """KTO written out per example in float64."""
    z = max(0.0, sum(a - b for a, b in zip(policy_kl, ref_kl)) / len(policy_kl))
    out = []
    for p, r, d in zip(policy, ref, desirable):
        reward = p - r
        out.append(lambda_d * (1 - sigmoid(beta * (reward - z))) if d else lambda_u * (1 - sigmoid(beta * (z - reward))))
    return out, z


@pytest.mark.parametrize("kl_shift", [+3.0, -3.0])  # positive KL estimate, and a negative one that z clamps to 0
def test_kto_loss_matches_float64_closed_form(kl_shift):
    p, r, pkl, rkl = random_logps(8, seed=2)
    pkl = rkl + kl_shift + 0.1 * torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    desirable = torch.tensor([True, False] * 4)
    losses, rewards = kto_loss(p, r, desirable, (pkl - rkl).mean(), beta=0.1, lambda_d=1.0, lambda_u=1.5)
    expected, z = kto_reference(p.tolist(), r.tolist(), desirable.tolist(), pkl.tolist(), rkl.tolist(), 0.1, 1.0, 1.5)
    assert losses.tolist() == pytest.approx(expected, rel=1e-12)
    assert (z == 0.0) == (kl_shift < 0)
    assert rewards.tolist() == pytest.approx([0.1 * (a - b) for a, b in zip(p.tolist(), r.tolist())], rel=1e-12)


def test_kto_reference_point_is_detached():
    p, r, pkl, rkl = random_logps(8, seed=4)
    pkl = (rkl + 2.0).requires_grad_(True)
    p.requires_grad_(True)
    losses, _ = kto_loss(p, r, torch.tensor([True] * 4 + [False] * 4), (pkl - rkl).mean(), beta=0.1)
    losses.sum().backward()
    assert pkl.grad is None  # no gradient flows through z
    assert p.grad is not None and torch.all(p.grad != 0)


def test_kto_loss_is_half_lambda_when_policy_equals_reference():
    p, _, kl_logps, _ = random_logps(6, seed=5)
    desirable = torch.tensor([True, True, True, False, False, False])
    losses, rewards = kto_loss(p, p.clone(), desirable, (kl_logps - kl_logps).mean(), beta=0.1, lambda_d=2.0,
                               lambda_u=1.0)
    assert losses.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.5, 0.5, 0.5], abs=1e-15)
    assert torch.all(rewards == 0)


def test_losses_are_pure_functions_that_never_communicate(tmp_path, monkeypatch):
    """Called on one rank of a process group, a loss must not wait for the others (it would hang)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        def refuse(*args, **kwargs):
            raise AssertionError("a loss function called a collective")
        for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "barrier"):
            monkeypatch.setattr(dist, name, refuse)
        p, r, pkl, rkl = random_logps(4, seed=6)
        kto_loss(p, r, torch.tensor([True, True, False, False]), (pkl - rkl).mean(), beta=0.1)
        dpo_loss(p, r, pkl, rkl, beta=0.1)
        ipo_loss(p, r, pkl, rkl, beta=0.1)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
