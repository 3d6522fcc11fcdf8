"""The paper's contribution: the reference model moves (Gorbatovski et al. 2024, "Learn Your Reference Model").

One rule, two readings. Every `tau` optimizer steps the reference is mixed towards the policy with weight `alpha`:

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref

  - soft update (TR-X^alpha):  --alpha 0.6             every step (tau = 1): an exponential moving average whose
                                                       lag behind the policy is (1 - alpha) / alpha steps
  - hard update (TR-X^tau):    --tau 512               alpha = 1: theta_ref <- theta every 512 steps, lag ~tau / 2
  - TRL's reading of Table 1:  --alpha 0.6 --tau 512   a partial copy every 512 steps
  - vanilla DPO/IPO/KTO is alpha = 0 (or tau = infinity): the reference never moves.

Naming trap: in RL code (cleanrl, DDPG) `tau` is the mixing weight; in this paper `tau` is the period and `alpha`
the weight. alpha is the weight of the *policy*.
"""
import torch


def should_update(step, tau):
    """True after optimizer step `step` (counted from 1) when the reference is due; micro-steps do not count."""
    return step % tau == 0


def local(t):
    """This rank's piece of a parameter: an FSDP2 parameter is a DTensor, whose shard .to_local() gives."""
    return t.to_local() if hasattr(t, "to_local") else t  # (no DTensor import: 0.5 s at every start of a DDP run)


@torch.no_grad()
def update_reference(reference, policy, alpha):
    """In place: theta_ref <- alpha * theta + (1 - alpha) * theta_ref, over all tensors in one fused call.

    `policy` may be wrapped in DDP (its replicas are identical, so every rank updates its own reference with no
    communication) or sharded with FSDP2 (both models sharded alike: the update is shard-local, no all-gather).
    Keep the reference in fp32 even when the policy trains in bf16: with alpha = 0.01 a bf16 lerp rounds each
    small step away and the reference stalls; tests/test_ref_update.py shows both.
    """
    policy = getattr(policy, "module", policy)  # unwrap DDP
    ref_params = [local(r) for r in reference.parameters()]
    policy_params = [local(p).to(r.dtype) for r, p in zip(ref_params, policy.parameters())]  # upcast a bf16 policy
    if alpha == 1:  # hard update: an exact copy, bit for bit
        torch._foreach_copy_(ref_params, policy_params)
    else:
        # TR soft update (Gorbatovski et al.): theta_ref <- theta_ref + alpha * (theta - theta_ref)
        torch._foreach_lerp_(ref_params, policy_params, alpha)
