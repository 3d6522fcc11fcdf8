import copy
import torch
from ref_update import update_reference
for dtype in (torch.float32, torch.bfloat16):
    policy = torch.nn.Linear(4, 4, bias=False)
    torch.nn.init.constant_(policy.weight, 1.0)
    reference = copy.deepcopy(policy).to(dtype).requires_grad_(False)  # as train.py builds it
    torch.nn.init.constant_(reference.weight, 0.9921875)  # 1 - 2**-7: the reference starts just below the policy
    for _ in range(100):
        update_reference(reference, policy, alpha=0.01)
    print(f"{str(dtype):15} after 100 soft updates: {reference.weight[0, 0].item():.7f}   "
          f"closed form: {1 + (0.9921875 - 1) * 0.99 ** 100:.7f}")
