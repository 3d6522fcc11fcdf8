"""Each loss against an independent float64 computation written out with Python's math module.

Also the grader of LESSON.md's exercises: rewrite a loss in losses.py, then `pytest tests/test_losses.py -k dpo`
(or ipo, or kto): every test of a loss has the loss's name in its own, so that one word selects all of them. Each
failure names the case, the formula, what was expected and what came out.
"""
import math

import pytest
import torch

from grading import call
from losses import dpo_loss, ipo_loss, kto_loss


def random_logps(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [-50 * torch.rand(n, generator=g, dtype=torch.float64) for _ in range(4)]


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def returned(result, names, n):
    """The function returned a tuple of `names[1:]`, each a tensor with one value per example."""
    function, names = names[0], names[1:]
    if not (isinstance(result, tuple) and len(result) == len(names)):
        pytest.fail(f"{function} must return a tuple ({', '.join(names)}); got {type(result).__name__}"
                    f"{f' of {len(result)}' if isinstance(result, tuple) else ''}", pytrace=False)
    for name, value in zip(names, result):
        if not (isinstance(value, torch.Tensor) and value.shape == (n,)):
            pytest.fail(f"{function}: {name} must be a tensor of shape ({n},), one value per example (no mean over "
                        f"the batch); got {getattr(value, 'shape', type(value).__name__)}", pytrace=False)
    return result


def expect(got, want, case, rel=1e-10, abs_=1e-12):
    """One number against its independent computation; a failure says which case, what was expected, what came."""
    if not math.isclose(got, want, rel_tol=rel, abs_tol=abs_):
        single = rel < 1e-6 and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6)  # right to float32's digits only
        pytest.fail(f"{case}: expected {want!r}, got {got!r}" + (
            ": right to 6 digits, so the formula is right but it ran in float32; keep the inputs' dtype (float64 "
            "here): no .float(), no constant made with torch.tensor() without dtype=" if single else ""), pytrace=False)


DPO = ("dpo_loss", "losses", "chosen_rewards", "rejected_rewards")
IPO = ("ipo_loss", "losses", "chosen_rewards", "rejected_rewards")
KTO = ("kto_loss", "losses", "rewards")


@pytest.mark.parametrize("beta", [0.05, 0.1, 0.5])
def test_dpo_loss_matches_float64_closed_form(beta):
    pc, pr, rc, rr = random_logps()
    losses, chosen_rewards, rejected_rewards = returned(call(dpo_loss, pc, pr, rc, rr, beta), DPO, 16)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        case = f"dpo_loss with beta {beta}, pair {i} (margin h = {h:.4f})"
        expect(losses[i].item(), math.log(1 + math.exp(-beta * h)), f"{case}: loss -log sigmoid(beta h)")
        expect(chosen_rewards[i].item(), beta * (pc[i].item() - rc[i].item()),
               f"{case}: chosen reward beta (log pi(y_w) - log ref(y_w))")
        expect(rejected_rewards[i].item(), beta * (pr[i].item() - rr[i].item()),
               f"{case}: rejected reward beta (log pi(y_l) - log ref(y_l))")


@pytest.mark.parametrize("eps", [0.1, 0.3])
def test_dpo_loss_with_label_smoothing_is_conservative_dpo(eps):
    """cDPO (Mitchell 2023): the expected DPO loss when each label is flipped with probability eps."""
    pc, pr, rc, rr = random_logps(seed=7)
    losses, _, _ = returned(call(dpo_loss, pc, pr, rc, rr, 0.1, label_smoothing=eps), DPO, 16)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expect(losses[i].item(), (1 - eps) * math.log(1 + math.exp(-0.1 * h)) + eps * math.log(1 + math.exp(0.1 * h)),
               f"dpo_loss with label_smoothing {eps}, pair {i} (h = {h:.4f}): loss -(1 - eps) log sigmoid(beta h) "
               f"- eps log sigmoid(-beta h)")


def test_dpo_loss_is_log2_and_rewards_zero_when_policy_equals_reference():
    pc, pr, _, _ = random_logps()
    losses, chosen_rewards, rejected_rewards = returned(call(dpo_loss, pc, pr, pc.clone(), pr.clone(), beta=0.1), DPO,
                                                        16)
    for i in range(16):
        expect(losses[i].item(), math.log(2), f"dpo_loss when policy == reference, pair {i}: loss log 2", abs_=1e-15)
        expect(chosen_rewards[i].item(), 0.0, f"dpo_loss when policy == reference, pair {i}: chosen reward")
        expect(rejected_rewards[i].item(), 0.0, f"dpo_loss when policy == reference, pair {i}: rejected reward")


def test_dpo_gradient_is_minus_beta_sigmoid_of_minus_beta_h():
    pc, pr, rc, rr = random_logps(4)
    pc.requires_grad_(True)
    losses, _, _ = returned(call(dpo_loss, pc, pr, rc, rr, 0.1), DPO, 4)
    losses.sum().backward()
    assert pc.grad is not None, "dpo_loss: no gradient reaches the policy's chosen log-probs"
    for i in range(4):  # dL/d(log pi_c) = -beta * sigmoid(-beta * h)
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        expect(pc.grad[i].item(), -0.1 * sigmoid(-0.1 * h),
               f"dpo_loss, pair {i} (h = {h:.4f}): dL/d(log pi(y_w)) = -beta sigmoid(-beta h)")


def rewards_are_detached(function, rewards, names):
    """The implicit rewards are logged, never trained on: no gradient may flow through them."""
    attached = [name for name, r in zip(names, rewards) if r.requires_grad]
    if attached:
        pytest.fail(f"{function}: {' and '.join(attached)} carry a gradient (requires_grad is True), but the rewards "
                    f"are logged, never trained on: return beta * (log pi - log ref).detach()", pytrace=False)


def test_dpo_rewards_are_detached():
    pc, pr, rc, rr = random_logps(4)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    _, chosen_rewards, rejected_rewards = returned(call(dpo_loss, pc, pr, rc, rr, 0.1), DPO, 4)
    rewards_are_detached("dpo_loss", [chosen_rewards, rejected_rewards], DPO[2:])


def test_dpo_loss_is_exact_at_large_margins_in_float32():
    """beta h = -200: sigmoid(-200) = 1.4e-87 is 0 in float32, so -log(sigmoid(beta h)) is inf; log sigmoid is not."""
    beta = 0.1
    h = torch.tensor([-2000.0, -1000.0, 1000.0, 2000.0])  # beta h = -200, -100, 100, 200
    for eps in (0.0, 0.2):
        pc, zero = h.clone().requires_grad_(True), torch.zeros(4)
        losses, _, _ = returned(call(dpo_loss, pc, zero, zero, zero, beta, label_smoothing=eps), DPO, 4)
        losses.sum().backward()
        for i, m in enumerate(h.tolist()):
            case = (f"dpo_loss in float32 at a large margin, beta {beta}, label_smoothing {eps}, pair {i} (h = {m:g}, "
                    f"beta h = {beta * m:g}, where sigmoid(-|beta h|) underflows to 0 in float32)")
            # -log sigmoid(x) = log(1 + e^-x), written so that float64 neither overflows nor rounds it away
            want = (1 - eps) * math.log1p(math.exp(-beta * m)) + eps * math.log1p(math.exp(beta * m))
            expect(losses[i].item(), want, f"{case}: loss -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)",
                   rel=1e-6)
            expect(pc.grad[i].item(), -beta * ((1 - eps) * sigmoid(-beta * m) - eps * sigmoid(beta * m)),
                   f"{case}: dL/d(log pi(y_w)) = -beta ((1 - eps) sigmoid(-beta h) - eps sigmoid(beta h))", rel=1e-6,
                   abs_=1e-9)


@pytest.mark.parametrize("beta", [0.01, 0.1, 1.0])
def test_ipo_loss_matches_float64_closed_form(beta):
    pc, pr, rc, rr = random_logps(seed=1)
    losses, chosen_rewards, rejected_rewards = returned(call(ipo_loss, pc, pr, rc, rr, beta), IPO, 16)
    for i in range(len(pc)):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        case = f"ipo_loss with beta {beta}, pair {i} (h = {h:.4f})"
        expect(losses[i].item(), (h - 1 / (2 * beta)) ** 2, f"{case}: loss (h - 1/(2 beta))^2")
        expect(chosen_rewards[i].item(), beta * (pc[i].item() - rc[i].item()),
               f"{case}: chosen reward beta (log pi(y_w) - log ref(y_w))")
        expect(rejected_rewards[i].item(), beta * (pr[i].item() - rr[i].item()),
               f"{case}: rejected reward beta (log pi(y_l) - log ref(y_l))")


def test_ipo_loss_is_zero_exactly_at_the_target_margin():
    pc, pr, rc, rr = [torch.tensor([x], dtype=torch.float64) for x in (-10.0, -20.0, -12.0, -19.5)]
    h = (-10.0 + 12.0) - (-20.0 + 19.5)  # 2.5 = 1 / (2 * 0.2)
    losses, _, _ = returned(call(ipo_loss, pc, pr, rc, rr, beta=1 / (2 * h)), IPO, 1)
    expect(losses.item(), 0.0, "ipo_loss at margin h = 1/(2 beta) = 2.5", abs_=1e-24)


def test_ipo_rewards_are_detached():
    pc, pr, rc, rr = random_logps(4, seed=8)
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    _, chosen_rewards, rejected_rewards = returned(call(ipo_loss, pc, pr, rc, rr, 0.1), IPO, 4)
    rewards_are_detached("ipo_loss", [chosen_rewards, rejected_rewards], IPO[2:])


# the loss of an example, by `desirable`: what a failure message prints
KTO_LOSS = {True: ("desirable", "lambda_D (1 - sigmoid(beta (r - z))), r = log pi(y) - log ref(y), z = max(0, kl)"),
            False: ("undesirable", "lambda_U (1 - sigmoid(beta (z - r))), r = log pi(y) - log ref(y), z = max(0, kl)")}


def kto_reference(policy, ref, desirable, policy_kl, ref_kl, beta, lambda_d, lambda_u):
    """KTO written out per example in float64."""
    z = max(0.0, sum(a - b for a, b in zip(policy_kl, ref_kl)) / len(policy_kl))
    out = []
    for p, r, d in zip(policy, ref, desirable):
        reward = p - r
        out.append(lambda_d * (1 - sigmoid(beta * (reward - z))) if d else
                   lambda_u * (1 - sigmoid(beta * (z - reward))))
    return out, z


@pytest.mark.parametrize("kl_shift", [+3.0, -3.0])  # positive KL estimate, and a negative one that z clamps to 0
def test_kto_loss_matches_float64_closed_form(kl_shift):
    p, r, pkl, rkl = random_logps(8, seed=2)
    pkl = rkl + kl_shift + 0.1 * torch.randn(8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    desirable = torch.tensor([True, False] * 4)
    losses, rewards = returned(call(kto_loss, p, r, desirable, (pkl - rkl).mean(), beta=0.1, kto_lambda_d=1.0,
                                        kto_lambda_u=1.5), KTO, 8)
    expected, z = kto_reference(p.tolist(), r.tolist(), desirable.tolist(), pkl.tolist(), rkl.tolist(), 0.1, 1.0, 1.5)
    for i in range(8):
        formula = KTO_LOSS[bool(desirable[i])]
        expect(losses[i].item(), expected[i], f"kto_loss, {formula[0]} example {i}, KL estimate "
                                              f"{(pkl - rkl).mean():.3f} (so z = {z:.3f}): loss {formula[1]}")
        expect(rewards[i].item(), 0.1 * (p[i].item() - r[i].item()), f"kto_loss, example {i}: reward beta r")


def test_kto_reference_point_is_detached():
    p, r, pkl, rkl = random_logps(8, seed=4)
    pkl = (rkl + 2.0).requires_grad_(True)
    p.requires_grad_(True)
    desirable = torch.tensor([True] * 4 + [False] * 4)
    losses, _ = returned(call(kto_loss, p, r, desirable, (pkl - rkl).mean(), beta=0.1), KTO, 8)
    losses.sum().backward()
    assert pkl.grad is None, "kto_loss: a gradient flowed through z; the reference point is a baseline: .detach() it"
    assert p.grad is not None and torch.all(p.grad != 0), "kto_loss: no gradient reaches the policy's log-probs"


def test_kto_rewards_are_detached():
    p, r, pkl, rkl = random_logps(4, seed=9)
    p.requires_grad_(True)
    desirable = torch.tensor([True, True, False, False])
    _, rewards = returned(call(kto_loss, p, r, desirable, (pkl - rkl).mean(), beta=0.1), KTO, 4)
    rewards_are_detached("kto_loss", [rewards], KTO[2:])


def test_kto_loss_is_half_lambda_when_policy_equals_reference():
    p, _, kl_logps, _ = random_logps(6, seed=5)
    desirable = torch.tensor([True, True, True, False, False, False])
    losses, rewards = returned(call(kto_loss, p, p.clone(), desirable, (kl_logps - kl_logps).mean(), beta=0.1,
                                        kto_lambda_d=2.0, kto_lambda_u=1.0), KTO, 6)
    for i, want in enumerate([1.0, 1.0, 1.0, 0.5, 0.5, 0.5]):  # lambda (1 - sigmoid(0)) = lambda / 2
        expect(losses[i].item(), want, f"kto_loss when policy == reference and z = 0, example {i} "
                                       f"(lambda {'D = 2' if i < 3 else 'U = 1'}): loss {KTO_LOSS[i < 3][1]} = "
                                       f"lambda / 2", abs_=1e-15)
        expect(rewards[i].item(), 0.0, f"kto_loss when policy == reference, example {i}: reward beta r")


@pytest.mark.parametrize("function", ["dpo_loss", "ipo_loss", "kto_loss"])
def test_loss_is_a_pure_function_that_never_communicates(function, tmp_path, monkeypatch):
    """Called on one rank of a process group, a loss must not wait for the others (it would hang)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        def refuse(*args, **kwargs):
            pytest.fail(f"{function} called a collective (torch.distributed): a loss sees one rank's examples only; "
                        f"train.py reduces over ranks and passes the result in", pytrace=False)
        for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "barrier"):
            monkeypatch.setattr(dist, name, refuse)
        p, r, pkl, rkl = random_logps(4, seed=6)
        if function == "kto_loss":
            call(kto_loss, p, r, torch.tensor([True, True, False, False]), (pkl - rkl).mean(), beta=0.1)
        else:
            call({"dpo_loss": dpo_loss, "ipo_loss": ipo_loss}[function], p, r, pkl, rkl, beta=0.1)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
