"""The graders grade: each mistake students really make in LESSON.md's exercises, put in place of the function, makes
the lesson's own grading command fail, with a message that names the case. One wrong version per hole that once let
a mistake pass (issue 16), and the lesson's example; the graders' other checks are read in tests/test_losses.py and
tests/test_ref_update.py. Every assert of a grader carries a message: a student reads it instead of a traceback."""
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
]


class Failures:
    """The failure messages of a pytest session run in this process."""

    def __init__(self):
        self.messages = []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            self.messages.append(f"{report.nodeid}: {report.longreprtext}")


def test_each_exercise_has_one_grading_command():
    assert sorted(EXERCISES) == ["dpo_loss", "ipo_loss", "kto_loss", "should_update", "update_reference"], \
        f"LESSON.md's exercises table should grade the five functions, one `-k word` each; read {EXERCISES}"


@pytest.mark.parametrize("function, mistake, wrong, message", MISTAKES, ids=[f"{f}: {m}" for f, m, _, _ in MISTAKES])
def test_the_grading_command_fails_on_a_typical_mistake(function, mistake, wrong, message, monkeypatch, tmp_path):
    path, word = EXERCISES[function]
    grader = __import__(os.path.basename(path).removesuffix(".py"))  # tests/ is on sys.path, as pytest put it
    monkeypatch.setattr(grader, function, wrong)  # what `from losses import dpo_loss` bound, now the student's
    failures = Failures()
    status = pytest.main([os.path.join(ROOT, path), "-k", word, "-q", "-p", "no:cacheprovider",
                          f"--basetemp={tmp_path}"], plugins=[failures])  # its own temporary folders: ours stay
    assert status == pytest.ExitCode.TESTS_FAILED, f"pytest {path} -k {word} passed {function} that {mistake}"
    assert any(re.search(message, m, re.S) for m in failures.messages), \
        f"pytest {path} -k {word} failed {function} that {mistake}, but no message matches {message!r}:\n" + \
        "\n".join(failures.messages)


@pytest.mark.parametrize("path", ["tests/test_losses.py", "tests/test_ref_update.py"])
def test_every_assert_of_a_grader_carries_a_message(path):
    tree = ast.parse(open(os.path.join(ROOT, path)).read())
    bare = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Assert) and node.msg is None]
    assert not bare, f"{path}: asserts without a message at lines {bare}: a student would read a bare traceback"
