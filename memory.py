"""What each rank holds, in bytes: the README's memory table, counted rather than estimated.

The count walks the tensors a rank holds and adds each storage once (a DDP gradient that is a view into its bucket
counts with the bucket): the policy's parameters and buffers, their gradients, the optimizer's state, the reference,
DDP's gradient buckets when the gradients are not views into them, and every other tensor Python can still reach
(data, held-out log-probs, anything a checkpoint load left behind). It cannot see what lives only inside C++ (NCCL
buffers, the caching allocator's free blocks, activations saved for backward), so it is the state a run keeps
between steps, not its peak.
"""
import gc
import warnings

import torch

from ref_update import local


def held_bytes(policy, reference, optimizer=None, ddp=None):
    """{what: bytes} held by this rank; `policy` unwrapped, `ddp` the DDP wrapper if there is one."""
    seen = set()

    def count(tensors):
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = local(t).untyped_storage()  # an FSDP2 DTensor holds only its shard
            if storage.nbytes() == 0 or (storage.data_ptr(), storage.device) in seen:
                continue
            seen.add((storage.data_ptr(), storage.device))
            total += storage.nbytes()
        return total

    held = {"policy": count([*policy.parameters(), *policy.buffers()]),
            "gradients": count(p.grad for p in policy.parameters()),
            "optimizer": count(v for s in optimizer.state.values() for v in s.values()) if optimizer else 0,
            "reference": count([*reference.parameters(), *reference.buffers()]) if reference is not None else 0,
            # without gradient_as_bucket_view DDP copies every gradient into buckets of its own: 4 more bytes/param
            "ddp_buckets": 0 if ddp is None or ddp.gradient_as_bucket_view else
            sum(int(b) for b in ddp._get_ddp_logging_data()["bucket_sizes"].split(","))}
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        held["other"] = count(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    return held


def parameters(model):
    """The model's parameter count (an FSDP2 DTensor reports the whole tensor's size, not the shard's)."""
    return sum(p.numel() for p in model.parameters())
