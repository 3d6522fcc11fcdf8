"""The paper's update rule against float64 arithmetic, its schedule, and its precision.

Also the grader of LESSON.md's exercises: rewrite update_reference or should_update in ref_update.py, then
`pytest tests/test_ref_update.py -k update_reference` (or `-k should_update`): every test of a function has the
function's name in its own. Each failure names the case, the formula, what was expected and what came out.
"""
import copy

import pytest
import torch

from grading import call
from ref_update import should_update, update_reference


def as_train_py_builds_it(policy):
    """The reference as train.py builds it: a copy of the policy that never trains (requires_grad False)."""
    return copy.deepcopy(policy).requires_grad_(False)


def two_models(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    policy = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(dtype)
    reference = as_train_py_builds_it(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))  # the policy has moved away from the reference
    return policy, reference


class TiedLM(torch.nn.Module):
    """A model whose input and output embeddings are one tensor, as SmolLM2's (tie_word_embeddings): state_dict()
    names it twice (embed.weight, head.weight), parameters() yields it once."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(16, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied: one Parameter under two names


def tied_models(seed=0):
    torch.manual_seed(seed)
    policy = TiedLM()
    reference = as_train_py_builds_it(policy)  # deepcopy keeps the tie: one tensor in the reference too
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    return policy, reference


def same(got, want, case, exact=False):
    """Tensors equal (bit for bit if `exact`); a failure shows the first element that differs."""
    ok = torch.equal(got, want) if exact else torch.allclose(got, want, rtol=1e-6, atol=1e-7)
    if not ok:
        i = (got != want).nonzero()[0].tolist() if exact else ((got - want).abs() > 1e-7 + 1e-6 * want.abs()).nonzero()[
            0].tolist()
        pytest.fail(f"{case}: element {i}: expected {want[tuple(i)].item()!r}, got {got[tuple(i)].item()!r}",
                    pytrace=False)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_update_reference_matches_float64_mix(alpha):
    policy, reference = two_models()
    before = [r.clone() for r in reference.parameters()]
    expected = [alpha * p.double() + (1 - alpha) * r.double() for p, r in zip(policy.parameters(), before)]
    call(update_reference, reference, policy, alpha)
    unmoved = alpha > 0 and all(torch.equal(r, b) for r, b in zip(reference.parameters(), before))
    for (name, got), want in zip(reference.named_parameters(), expected):
        same(got.double(), want, f"update_reference with alpha {alpha}: reference {name} should be "
                                 f"alpha * policy + (1 - alpha) * reference" + (
                                     ", but no tensor of the reference moved: write into every tensor of "
                                     "reference.parameters() in place (r.lerp_(p, alpha)); train.py's reference "
                                     "never trains (requires_grad False), so a test of requires_grad skips all of "
                                     "them, and a new tensor bound to a name changes nothing" if unmoved else ""))


def test_update_reference_leaves_the_reference_outside_autograd():
    policy, reference = two_models()
    call(update_reference, reference, policy, 0.3)
    for name, r in reference.named_parameters():
        assert not r.requires_grad and r.grad_fn is None, (
            f"update_reference with alpha 0.3: reference {name} now requires grad (its value came from the policy's "
            f"autograd graph), but the reference never trains: mix under torch.no_grad() (@torch.no_grad() above "
            f"the def)")


def test_update_reference_hard_update_copies_bitwise():
    policy, reference = two_models(seed=1)[0], two_models(seed=2)[1]  # unrelated: r + (p - r) is then not p
    call(update_reference, reference, policy, 1.0)
    for (name, r), p in zip(reference.named_parameters(), policy.parameters()):
        same(r, p, f"update_reference with alpha 1 (the hard update), on a policy unrelated to the reference: "
                   f"reference {name} must be a bit-exact copy, and r + alpha (p - r) rounds (in floating point "
                   f"r + (p - r) is not always p): write r.lerp_(p, alpha) (exact at alpha 1) or "
                   f"r.mul_(1 - alpha).add_(p, alpha=alpha)", exact=True)


def test_update_reference_with_alpha_zero_leaves_reference_bitwise_unchanged():
    policy, reference = two_models()
    before = [r.clone() for r in reference.parameters()]
    call(update_reference, reference, policy, 0.0)
    for (name, r), b in zip(reference.named_parameters(), before):
        same(r, b, f"update_reference with alpha 0: reference {name} must not move at all", exact=True)


def test_update_reference_does_not_touch_the_policy():
    policy, reference = two_models()
    before = [p.clone() for p in policy.parameters()]
    call(update_reference, reference, policy, 0.6)
    for (name, p), b in zip(policy.named_parameters(), before):
        same(p, b, f"update_reference must only change the reference; the policy's {name} changed", exact=True)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_update_reference_mixes_a_tied_tensor_once(alpha):
    policy, reference = tied_models()
    assert reference.head.weight is reference.embed.weight, "the test's reference lost its tie"
    expected = {name: alpha * p.double() + (1 - alpha) * r.double()
                for (name, p), r in zip(policy.named_parameters(), reference.parameters())}
    call(update_reference, reference, policy, alpha)
    for name, got in reference.named_parameters():
        same(got.double(), expected[name], f"update_reference with alpha {alpha} on a model whose input and output "
                                           f"embeddings are one tied tensor (as SmolLM2's): reference {name} should "
                                           f"be alpha * policy + (1 - alpha) * reference, mixed once (mixed twice, "
                                           f"as a loop over state_dict() does, the policy's weight is "
                                           f"1 - (1 - alpha)^2 = {1 - (1 - alpha) ** 2:g})")


def test_should_update_every_tau_optimizer_steps_counted_from_one():
    for tau, steps, want in [(8, range(1, 21), [8, 16]), (1, range(1, 6), [1, 2, 3, 4, 5]),
                             (512, [511, 512, 1024], [512, 1024])]:
        got = [s for s in steps if call(should_update, s, tau)]
        if got != want:
            pytest.fail(f"should_update with tau {tau}, optimizer steps {list(steps)} (counted from 1): the "
                        f"reference is due after steps {want}, got {got}", pytrace=False)


def soft_updates_100_times(reference_dtype):
    """A bf16 policy sitting 1% away from its reference (weights near 1): alpha = 0.01 applied 100 times."""
    policy = torch.nn.Linear(64, 64, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        policy.weight.fill_(1.0)
    reference = copy.deepcopy(policy).to(reference_dtype)
    with torch.no_grad():
        reference.weight.fill_(0.9921875)  # exactly representable in bf16: 1 - 2^-7
    for _ in range(100):
        call(update_reference, reference, policy, 0.01)
    # closed form: ref_n = theta + (ref_0 - theta) * (1 - alpha)^n
    expected = 1.0 + (0.9921875 - 1.0) * (1 - 0.01) ** 100
    moved = reference.weight.double().mean().item() - 0.9921875
    return moved, expected - 0.9921875


def test_update_reference_in_fp32_does_not_stall_at_small_alpha():
    moved, expected = soft_updates_100_times(torch.float32)  # what train.py does: the reference stays fp32
    if abs(moved - expected) > 1e-4 * abs(expected):
        pytest.fail(f"update_reference with alpha 0.01, 100 times, fp32 reference 2^-7 below a bf16 policy: the "
                    f"reference should move by 2^-7 (1 - (1 - alpha)^100) (mix in the reference's fp32, after "
                    f"upcasting the policy): expected {expected!r}, got {moved!r}", pytrace=False)


def test_update_reference_in_bf16_would_stall_at_small_alpha():
    moved, expected = soft_updates_100_times(torch.bfloat16)  # the bf16 lerp rounds every small step away
    if abs(moved - expected) <= 0.5 * abs(expected):
        pytest.fail(f"update_reference with alpha 0.01, 100 times, bf16 reference 2^-7 below a bf16 policy: each "
                    f"step, 0.01 x 2^-7, is far below half of bf16's spacing near 1 (2^-9), so the reference should "
                    f"stall (this is why train.py keeps it in fp32): expected a move far from {expected!r}, got "
                    f"{moved!r}", pytrace=False)


def trains_on(policy):
    """The policy's next optimizer steps: every tensor changed in place, as optimizers write."""
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)


def stays_put(reference, copied, case):
    for (name, r), c in zip(reference.named_parameters(), copied):
        same(r, c, f"{case}: the policy then trained on, and reference {name} moved with it: the reference shares "
                   f"the policy's memory (`r.data = p.data` or load_state_dict(..., assign=True) makes the reference "
                   f"another name for the policy's tensors, and TR becomes a copy every step); copy the values into "
                   f"the reference's own tensors: r.copy_(p) or r.lerp_(p, alpha)", exact=True)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_update_reference_makes_a_copy_that_stays_put_when_the_policy_trains_on(alpha):
    policy, reference = two_models()
    call(update_reference, reference, policy, alpha)
    copied = [r.clone() for r in reference.parameters()]
    trains_on(policy)
    stays_put(reference, copied, f"update_reference with alpha {alpha}")


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_update_reference_unwraps_ddp_and_needs_no_communication(alpha, tmp_path, monkeypatch):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        policy, reference = two_models()
        wrapped = torch.nn.parallel.DistributedDataParallel(policy)  # (built before collectives are refused)

        def refuse(*args, **kwargs):
            pytest.fail("update_reference called a collective (torch.distributed): the DDP replicas are identical, "
                        "so each rank mixes its own reference with no communication", pytrace=False)
        for name in ("all_reduce", "all_gather", "broadcast", "reduce", "all_gather_into_tensor", "barrier"):
            monkeypatch.setattr(dist, name, refuse)
        call(update_reference, reference, wrapped, alpha)  # e.g. a KeyError: DDP's state_dict() says module.NAME
        monkeypatch.undo()
        case = f"update_reference with alpha {alpha} and the policy wrapped in DDP (its parameters under .module)"
        for (name, got), p, r in zip(reference.named_parameters(), policy.parameters(), two_models()[1].parameters()):
            same(got.double(), alpha * p.double() + (1 - alpha) * r.double(),
                 f"{case}: reference {name} should be alpha * policy + (1 - alpha) * reference")
        copied = [r.clone() for r in reference.parameters()]
        trains_on(wrapped.module)
        stays_put(reference, copied, case)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
