"""The graders grade: each mistake students really make in LESSON.md's exercises, put in place of the function, makes
the lesson's own grading command fail, with a message that names the case: wrong targets, signs, shapes, missing
clamps and detaches, swapped weights, off-by-one schedules, a copy that aliases the policy, a bf16 mix, and errors
torch raises (a bool mask in arithmetic, a dtype mismatch, DDP's module. names), which tests/grading.py turns into a
sentence. Every assert of a grader carries a message: a student reads it instead of a traceback."""
import ast
import os
import re

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT

LESSON = open(os.path.join(ROOT, "LESSON.md")).read()
# the exercises' table: | `function` | `file.py` | `python -m pytest -q tests/test_x.py -k word` |
EXERCISES = {function: (path, word) for function, path, word in re.findall(
    r"^\| `(\w+)` \| `\w+\.py` \| `python -m pytest -q (tests/\S+) -k (\w+)` \|$", LESSON, re.M)}


def dpo_forgets_beta(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_rewards_not_detached(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc), beta * (pr - rr)


def dpo_log_of_sigmoid(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * torch.log(torch.sigmoid(beta * h)) \
        - label_smoothing * torch.log(torch.sigmoid(-beta * h))
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def ipo_rewards_not_detached(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return (h - 1 / (2 * beta)) ** 2, beta * (pc - rc), beta * (pr - rr)


def kto_rewards_not_detached(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    rewards = policy_logps - ref_logps
    z = kl.detach().clamp(min=0)
    losses = torch.where(desirable, kto_lambda_d * (1 - torch.sigmoid(beta * (rewards - z))),
                         kto_lambda_u * (1 - torch.sigmoid(beta * (z - rewards))))
    return losses, beta * rewards


@torch.no_grad()
def update_over_state_dict(reference, policy, alpha):
    policy = getattr(policy, "module", policy)
    for r, p in zip(reference.state_dict().values(), policy.state_dict().values()):  # a tied tensor comes twice
        r.mul_(1 - alpha).add_(p.to(r.dtype), alpha=alpha)


@torch.no_grad()
def update_in_the_policy_dtype(reference, policy, alpha):
    policy = getattr(policy, "module", policy)
    for r, p in zip(reference.parameters(), policy.parameters()):
        r.copy_(alpha * p + (1 - alpha) * r)  # alpha * p is rounded to the policy's bf16


def should_update_from_zero(step, tau):
    return (step + 1) % tau == 0


def should_update_at_one(step, tau):
    return step % tau == 1  # due after steps 1, 9, 17: never with tau 1


def should_update_first_step(step, tau):
    return (step - 1) % tau == 0  # due after steps 1, 9, 17


def dpo_swapped(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pr - rr) - (pc - rc)  # the rejected answer's log-ratio first
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_sign(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = (1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_mean(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses.mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_smoothing_swapped(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -label_smoothing * F.logsigmoid(beta * h) - (1 - label_smoothing) * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def dpo_rewards_without_beta(pc, pr, rc, rr, beta, label_smoothing=0.0):
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, (pc - rc).detach(), (pr - rr).detach()


def ipo_target_one_over_beta(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return (h - 1 / beta) ** 2, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def ipo_mean(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    return ((h - 1 / (2 * beta)) ** 2).mean(), beta * (pc - rc).detach(), beta * (pr - rr).detach()


def kto(policy_logps, ref_logps, desirable, kl, beta, lambda_d, lambda_u, z):
    rewards = policy_logps - ref_logps
    losses = torch.where(desirable, lambda_d * (1 - torch.sigmoid(beta * (rewards - z))),
                         lambda_u * (1 - torch.sigmoid(beta * (z - rewards))))
    return losses, beta * rewards.detach()


def kto_no_clamp(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    return kto(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d, kto_lambda_u, z=kl.detach())


def kto_z_not_detached(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    return kto(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d, kto_lambda_u, z=kl.clamp(min=0))


def kto_lambdas_swapped(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    return kto(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_u, kto_lambda_d, z=kl.detach().clamp(min=0))


def kto_bool_arithmetic(policy_logps, ref_logps, desirable, kl, beta, kto_lambda_d=1.0, kto_lambda_u=1.0):
    rewards = policy_logps - ref_logps
    z = kl.detach().clamp(min=0)
    losses = desirable * kto_lambda_d * (1 - torch.sigmoid(beta * (rewards - z))) + \
        (1 - desirable) * kto_lambda_u * (1 - torch.sigmoid(beta * (z - rewards)))  # torch: no `-` on a bool tensor
    return losses, beta * rewards.detach()


def unwrap(policy):
    return getattr(policy, "module", policy)


@torch.no_grad()
def update_aliasing(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        if alpha == 1:
            r.data = p.data  # the reference's tensor is now the policy's memory
        else:
            r.lerp_(p.to(r.dtype), alpha)


@torch.no_grad()
def update_assign(reference, policy, alpha):
    if alpha == 1:
        reference.load_state_dict(unwrap(policy).state_dict(), assign=True)  # assign: the policy's tensors themselves
    else:
        for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
            r.lerp_(p.to(r.dtype), alpha)


@torch.no_grad()
def update_load_state_dict_wrapped(reference, policy, alpha):
    if alpha == 1:
        reference.load_state_dict(policy.state_dict())  # a copy, but under DDP every key reads module.NAME
    else:
        for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
            r.lerp_(p.to(r.dtype), alpha)


@torch.no_grad()
def update_weights_swapped(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        r.copy_((1 - alpha) * p.to(r.dtype) + alpha * r)


@torch.no_grad()
def update_bf16_lerp_without_cast(reference, policy, alpha):
    torch._foreach_lerp_(list(reference.parameters()), list(unwrap(policy).parameters()), alpha)


@torch.no_grad()
def update_rebinds(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        r = alpha * p.to(r.dtype) + (1 - alpha) * r  # a new tensor bound to a local name: the reference never moves


@torch.no_grad()
def update_only_trainable(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        if r.requires_grad:  # the optimizer's idiom: train.py's reference has none, and never moves
            r.lerp_(p.to(r.dtype), alpha)


@torch.no_grad()
def update_ema_form(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        r.add_(alpha * (p.to(r.dtype) - r))  # at alpha 1, r + (p - r): not always p in floating point


def update_without_no_grad(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        r.lerp_(p.to(r.dtype), alpha)  # the reference's tensors now hang on the policy's autograd graph


def update_into_the_policy(reference, policy, alpha):
    for r, p in zip(reference.parameters(), unwrap(policy).parameters()):
        r.copy_(p.mul_(alpha).add_(r, alpha=1 - alpha))  # an in-place op on the policy's trainable leaf


@torch.no_grad()
def update_generator_twice(reference, policy, alpha):
    policy_params = unwrap(policy).parameters()  # a generator: any() below uses it up
    ref_params = list(reference.parameters())
    if any(p.dtype != r.dtype for p, r in zip(policy_params, ref_params)):
        policy_params = (p.to(r.dtype) for p, r in zip(policy_params, ref_params))
    torch._foreach_lerp_(ref_params, list(policy_params), alpha)


def ipo_rejected_reward_twice(pc, pr, rc, rr, beta):
    h = (pc - rc) - (pr - rr)
    chosen_rewards = beta * (pc - rc).detach()
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, chosen_rewards


def dpo_in_place(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                 label_smoothing=0.0):
    policy_chosen_logps -= ref_chosen_logps  # the log-ratios computed in the inputs' own memory
    policy_rejected_logps -= ref_rejected_logps
    h = policy_chosen_logps - policy_rejected_logps
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * policy_chosen_logps.detach(), beta * policy_rejected_logps.detach()


def dpo_in_float32(pc, pr, rc, rr, beta, label_smoothing=0.0):
    pc, pr, rc, rr = pc.float(), pr.float(), rc.float(), rr.float()  # the right formula, float32 arithmetic
    h = (pc - rc) - (pr - rr)
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, beta * (pc - rc).detach(), beta * (pr - rr).detach()


def plain_logps(model, batch, average=False, shift=1, mask="loss_mask", dim=-1, mean=None):
    """A plain-PyTorch sequence_logps, with the knobs where its typical mistakes live."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    logits, labels = (logits[:, :-1], ids[:, 1:]) if shift else (logits, ids)
    m = batch[mask][:, 1:] if shift else batch[mask]
    logps = (logits.log_softmax(dim).gather(-1, labels.unsqueeze(-1)).squeeze(-1) * m).sum(-1)
    return logps / m.sum(-1) if (average if mean is None else mean) else logps


def logps_no_shift(model, batch, average=False):
    return plain_logps(model, batch, average, shift=0)


def logps_prompt_counted(model, batch, average=False):
    return plain_logps(model, batch, average, mask="attention_mask")


def logps_mean_always(model, batch, average=False):
    return plain_logps(model, batch, average, mean=True)


def logps_softmax_over_time(model, batch, average=False):
    return plain_logps(model, batch, average, dim=1)


MISTAKES = [  # (the function, what the student wrote, the wrong version, what the grader's message must say)
    ("dpo_loss", "forgets beta (LESSON.md's example)", dpo_forgets_beta,
     r"dpo_loss with beta 0\.05, pair 0 \(margin h = -68\.2072\): loss -log sigmoid\(beta h\): expected 3\.44"),
    ("dpo_loss", "rewards not detached", dpo_rewards_not_detached,
     r"dpo_loss: chosen_rewards and rejected_rewards carry a gradient"),
    ("dpo_loss", "-log(sigmoid(beta h)) instead of -logsigmoid(beta h)", dpo_log_of_sigmoid,
     r"dpo_loss in float32 at a large margin, .* beta h = -200, .*: expected 200\.0, got inf"),
    ("ipo_loss", "rewards not detached", ipo_rewards_not_detached,
     r"ipo_loss: chosen_rewards and rejected_rewards carry a gradient"),
    ("kto_loss", "rewards not detached", kto_rewards_not_detached, r"kto_loss: rewards carry a gradient"),
    ("update_reference", "a loop over state_dict() (a tied tensor mixed twice)", update_over_state_dict,
     r"update_reference with alpha 0\.5 on a model whose input and output embeddings are one tied tensor .* "
     r"reference embed\.weight .* element \[0, 0\]: expected"),
    ("update_reference", "alpha * policy computed in the policy's bf16", update_in_the_policy_dtype,
     r"update_reference with alpha 0\.01, 100 times, fp32 reference .*: expected 0\.0049528\d*, got 0\.00557"),
    ("should_update", "counts optimizer steps from 0", should_update_from_zero,
     r"should_update with tau 8, .*: the reference is due after steps \[8, 16\], got \[7, 15\]"),
    ("should_update", "step % tau == 1", should_update_at_one,
     r"should_update with tau 8, .*: the reference is due after steps \[8, 16\], got \[1, 9, 17\]"),
    ("should_update", "(step - 1) % tau == 0", should_update_first_step,
     r"should_update with tau 8, .*: the reference is due after steps \[8, 16\], got \[1, 9, 17\]"),
    ("dpo_loss", "chosen and rejected swapped in the margin", dpo_swapped,
     r"dpo_loss with beta 0\.05, pair 0 \(margin h = -68\.2072\): loss -log sigmoid\(beta h\): expected"),
    ("dpo_loss", "loses the minus sign", dpo_sign, r"dpo_loss with beta 0\.05, pair 0 .*: loss -log sigmoid"),
    ("dpo_loss", "returns the batch's mean", dpo_mean,
     r"dpo_loss: losses must be a tensor of shape \(16,\), one value per example \(no mean over the batch\)"),
    ("dpo_loss", "label smoothing's weights swapped", dpo_smoothing_swapped,
     r"dpo_loss with label_smoothing 0\.1, pair 0 .*: loss -\(1 - eps\) log sigmoid\(beta h\)"),
    ("dpo_loss", "rewards without beta", dpo_rewards_without_beta,
     r"dpo_loss with beta 0\.05, pair 0 .*: chosen reward"),
    ("ipo_loss", "target 1/beta instead of 1/(2 beta)", ipo_target_one_over_beta,
     r"ipo_loss with beta 0\.01, pair 0 .*: loss \(h - 1/\(2 beta\)\)\^2: expected"),
    ("ipo_loss", "returns the batch's mean", ipo_mean, r"ipo_loss: losses must be a tensor of shape \(16,\)"),
    ("kto_loss", "no clamp: z = kl, negative too", kto_no_clamp, r"kto_loss, .*KL estimate -2\.994 \(so z = 0\.000\)"),
    ("kto_loss", "z not detached", kto_z_not_detached, r"kto_loss: a gradient flowed through z"),
    ("kto_loss", "lambda_D and lambda_U swapped", kto_lambdas_swapped,
     r"kto_loss, desirable example 0, .*: loss lambda_D \(1 - sigmoid\(beta \(r - z\)\)\), .*: expected"),
    ("kto_loss", "the bool mask in arithmetic (1 - desirable)", kto_bool_arithmetic,
     r"kto_loss raised RuntimeError \(.*\): likely a bool mask \(`desirable`\) used in arithmetic"),
    ("update_reference", "r.data = p.data (an alias, not a copy)", update_aliasing,
     r"update_reference with alpha 1\.0: the policy then trained on, and reference 0\.weight moved with it: the "
     r"reference shares the policy's memory"),
    ("update_reference", "load_state_dict(..., assign=True)", update_assign,
     r"update_reference with alpha 1\.0: the policy then trained on, .* shares the policy's memory"),
    ("update_reference", "load_state_dict(policy.state_dict()) on a DDP-wrapped policy", update_load_state_dict_wrapped,
     r"update_reference raised RuntimeError .*: likely the policy is wrapped in DDP: its model is policy\.module"),
    ("update_reference", "alpha and 1 - alpha swapped", update_weights_swapped,
     r"update_reference with alpha 0\.3: reference 0\.weight should be alpha \* policy \+ \(1 - alpha\) \* "
     r"reference: element"),
    ("update_reference", "a bf16 lerp without a cast", update_bf16_lerp_without_cast,
     r"update_reference raised RuntimeError .*: likely the policy is bf16 and the reference fp32: mix in the "
     r"reference's dtype"),
    ("update_reference", "rebinds a local name instead of writing in place", update_rebinds,
     r"update_reference with alpha 0\.3: reference 0\.weight should be alpha \* policy"),
    ("update_reference", "updates only the tensors with requires_grad (train.py's reference has none)",
     update_only_trainable, r"update_reference with alpha 0\.3: .*, but no tensor of the reference moved: .*a test "
                            r"of requires_grad skips all of them"),
    ("update_reference", "r.add_(alpha * (p - r)), which rounds at alpha 1", update_ema_form,
     r"update_reference with alpha 1 \(the hard update\), on a policy unrelated to the reference: .*bit-exact copy, "
     r"and r \+ alpha \(p - r\) rounds .*r\.lerp_\(p, alpha\)"),
    ("update_reference", "mixes without torch.no_grad()", update_without_no_grad,
     r"update_reference with alpha 0\.3: reference 0\.weight now requires grad .*: mix under torch\.no_grad\(\)"),
    ("update_reference", "mixes in the policy's own tensor (p.mul_)", update_into_the_policy,
     r"update_reference raised RuntimeError .*: likely an in-place operation on a tensor that requires grad: "
     r"change a model's weights under torch\.no_grad\(\)"),
    ("update_reference", "uses a generator of parameters twice", update_generator_twice,
     r"update_reference raised RuntimeError .*: likely two lists of tensors of different lengths: a generator"),
    ("ipo_loss", "returns the chosen reward twice", ipo_rejected_reward_twice,
     r"ipo_loss with beta 0\.01, pair 0 .*: rejected reward beta \(log pi\(y_l\) - log ref\(y_l\)\): expected"),
    ("dpo_loss", "computes the log-ratios in its inputs' memory (-=)", dpo_in_place,
     r"dpo_loss changed its input policy_chosen_logps in place .*compute new tensors"),
    ("dpo_loss", "the right formula in float32", dpo_in_float32,
     r"dpo_loss with beta 0\.05, pair 0 .*: expected 3\.44285475\d*, got 3\.44285464\d*: right to 6 digits, .*keep "
     r"the inputs' dtype"),
    ("sequence_logps", "no shift between logits and labels", logps_no_shift,
     r"sequence_logps with average=False, row 0 .*: likely the logits at position t predict token t \+ 1"),
    ("sequence_logps", "the prompt's tokens counted (the attention mask)", logps_prompt_counted,
     r"sequence_logps with average=False, row 0 .*: likely the prompt's tokens were counted"),
    ("sequence_logps", "the mean over tokens where the sum is asked", logps_mean_always,
     r"sequence_logps with average=False, row 0 .*: likely average=False returns the sum"),
    ("sequence_logps", "log_softmax over the positions (dim 1)", logps_softmax_over_time,
     r"sequence_logps with average=False, row 0 .*: likely the softmax ran over the positions"),
]


class Failures:
    """The failure messages of a pytest session run in this process."""

    def __init__(self):
        self.messages = []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.messages.append(f"{report.nodeid}: {report.longreprtext}")


def test_each_exercise_has_one_grading_command():
    assert sorted(EXERCISES) == ["dpo_loss", "ipo_loss", "kto_loss", "sequence_logps", "should_update",
                                 "update_reference"], \
        f"LESSON.md's exercises table should grade the six functions, one `-k word` each; read {EXERCISES}"


@pytest.mark.slow  # a grading session per mistake: seconds each, too many for make test-fast
@pytest.mark.parametrize("function, mistake, wrong, message", MISTAKES, ids=[f"{f}: {m}" for f, m, _, _ in MISTAKES])
def test_the_grading_command_fails_on_a_typical_mistake(function, mistake, wrong, message, monkeypatch, tmp_path):
    path, word = EXERCISES[function]
    grader = __import__(os.path.basename(path).removesuffix(".py"))  # tests/ is on sys.path, as pytest put it
    monkeypatch.setattr(grader, function, wrong)  # what `from losses import dpo_loss` bound, now the student's
    monkeypatch.setattr(wrong, "__name__", function)  # named as the student's is
    failures = Failures()
    status = pytest.main([os.path.join(ROOT, path), "-k", word, "-q", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path}"], plugins=[failures])  # its own temporary folders: ours stay
    assert status == pytest.ExitCode.TESTS_FAILED, f"pytest {path} -k {word} passed {function} that {mistake}"
    assert any(re.search(message, m, re.S) for m in failures.messages), \
        f"pytest {path} -k {word} failed {function} that {mistake}, but no message matches {message!r}:\n" + \
        "\n".join(failures.messages)


@pytest.mark.parametrize("path", ["tests/test_losses.py", "tests/test_ref_update.py", "tests/test_sequence_logps.py"])
def test_every_assert_of_a_grader_carries_a_message(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    bare = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert) and node.msg is None]
    assert not bare, f"{path}: asserts without a message at lines {bare}: a student would read a bare traceback"
