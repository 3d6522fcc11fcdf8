"""What the graders (tests/test_losses.py, tests/test_ref_update.py, tests/test_sequence_logps.py) share: the
student's function is called through `call`, so that an exception in it reaches the student as one sentence that
names the likely mistake, not as a traceback into torch, and a function that writes into its inputs is told so first
(it is then graded on copies, never on its own overwritten inputs)."""
import inspect
import re

import pytest
import torch

# (what torch's message says, what the student most likely wrote, and what to write instead)
HINTS = [
    (r"leaf Variable that requires grad is being used in an in-place operation",
     "an in-place operation on a tensor that requires grad: change a model's weights under torch.no_grad() "
     "(@torch.no_grad() above the def), and never change an input of a loss in place (compute a new tensor: "
     "h = (a - b) - (c - d))"),
    (r"lists must have the same number of tensors",
     "two lists of tensors of different lengths: a generator (model.parameters(), or (p for p in ...)) is used up "
     "after one pass, and a second pass over it is empty; take list(model.parameters()) once and use the list"),
    (r"with a bool tensor|bool.*not supported|Boolean value of Tensor",
     "a bool mask (`desirable`) used in arithmetic or in `if`: torch refuses `1 - desirable` and `-desirable`; choose "
     "per example with torch.where(desirable, loss_if_desirable, loss_if_undesirable)"),
    (r"[Ee]xpected .*(dtype|scalar type)|dtype.*(BFloat16|Float)|(BFloat16|Float).*(BFloat16|Float)",
     "the policy is bf16 and the reference fp32: mix in the reference's dtype, casting the policy's tensor first "
     "(p.to(r.dtype)); a bf16 mix would round small steps away"),
    (r"Missing key|Unexpected key|module\.",
     "the policy is wrapped in DDP: its model is policy.module, and DDP's state_dict() names every tensor "
     "module.NAME; unwrap it first (policy = getattr(policy, 'module', policy)) and take the tensors from "
     "parameters()"),
    (r"[Ii]ndex tensor must have|index .* out of bounds|out of range",
     "an index beyond the tensor: the labels index the vocabulary, the last dimension of the logits (N, T, V): "
     "gather(-1, labels.unsqueeze(-1)) with labels of the logits' own length (T - 1 after the shift by one)"),
    (r"size of tensor|shape|dimension",
     "the tensors have the shapes the exercise gives (a loss: (B,), one value per example): combine them "
     "element-wise, without reducing or reshaping"),
]


def call(function, *args, **kwargs):
    """function(*args, **kwargs) on copies of its tensor arguments (a gradient still flows to the originals); a
    function that changes a copy in place, or raises, fails the test with a sentence: what happened, what to do."""
    copies = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    try:
        result = function(*copies, **kwargs)
    except Exception as e:  # the student's code: any error at all is a grade, not a crash of the grader
        error = e
    else:
        changed_inputs(function, args, copies)
        return result
    said = str(error).strip().splitlines()[0] if str(error).strip() else ""
    hint = next((h for pattern, h in HINTS if re.search(pattern, str(error))), "read the equation in LESSON.md again")
    pytest.fail(f"{function.__name__} raised {type(error).__name__} ({said}): likely {hint}", pytrace=False)


def changed_inputs(function, originals, copies):
    """Fail, naming the argument, if the function wrote into one of its tensor inputs."""
    try:
        names = list(inspect.signature(function).parameters)
    except (TypeError, ValueError):
        names = []
    for i, (original, copy) in enumerate(zip(originals, copies)):
        if isinstance(original, torch.Tensor) and not (copy.shape == original.shape and
                                                       torch.equal(copy.detach(), original.detach())):
            name = names[i] if i < len(names) else f"argument {i + 1}"
            pytest.fail(f"{function.__name__} changed its input {name} in place (an in-place operation such as -=, "
                        f"+= or .sub_() on it): train.py uses its inputs again after the call, so a function must "
                        f"leave them as they were; compute new tensors (h = (a - b) - (c - d))", pytrace=False)
