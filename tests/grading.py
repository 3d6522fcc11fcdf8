"""What the graders (tests/test_losses.py, tests/test_ref_update.py) share: the student's function is called through
`call`, so that an exception in it reaches the student as one sentence that names the likely mistake, not as a
traceback into torch."""
import re

import pytest

# (what torch's message says, what the student most likely wrote, and what to write instead)
HINTS = [
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
    (r"size of tensor|shape|dimension",
     "the tensors have shape (B,), one value per example: combine them element-wise, without reducing or reshaping"),
]


def call(function, *args, **kwargs):
    """function(*args, **kwargs); an exception fails the test with a sentence: what was raised, and what to do."""
    try:
        return function(*args, **kwargs)
    except Exception as e:  # the student's code: any error at all is a grade, not a crash of the grader
        error = e
    said = str(error).strip().splitlines()[0] if str(error).strip() else ""
    hint = next((h for pattern, h in HINTS if re.search(pattern, str(error))), "read the equation in LESSON.md again")
    pytest.fail(f"{function.__name__} raised {type(error).__name__} ({said}): likely {hint}", pytrace=False)
