"""What each rank holds, in bytes: the README's memory table, counted rather than estimated.

The count walks the tensors a rank holds and adds each storage once (a DDP gradient that is a view into its bucket
counts with the bucket): the policy's parameters and buffers, their gradients, the optimizer's state, the reference,
DDP's gradient buckets where the gradients are not views into them, and every other tensor Python can still reach
(data, held-out log-probs, anything a checkpoint load left behind). It cannot see what lives only inside C++ (NCCL
buffers, the caching allocator's free blocks, activations saved for backward), so it is the state a run keeps
between steps, not its peak.
"""
import gc
import json
import os
import warnings

import torch
import torch.distributed as dist

from fsdp import local_shard


def held_bytes(policy, reference, optimizer=None, ddp=None):
    """{what: bytes} held by this rank; `policy` unwrapped, `ddp` the DDP wrapper if there is one."""
    seen = set()

    def count(tensors):
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = local_shard(t).untyped_storage()  # an FSDP2 DTensor holds only its shard
            if storage.nbytes() == 0 or (storage.data_ptr(), storage.device) in seen:
                continue
            seen.add((storage.data_ptr(), storage.device))
            total += storage.nbytes()
        return total

    grads = [p.grad for p in policy.parameters() if p.grad is not None]
    held = {"policy": count([*policy.parameters(), *policy.buffers()]), "gradients": count(grads),
            "optimizer": count(v for s in optimizer.state.values() for v in s.values()) if optimizer else 0,
            "reference": count([*reference.parameters(), *reference.buffers()]) if reference is not None else 0,
            "ddp_buckets": 0}
    if ddp is not None:  # DDP always holds its buckets; gradients that are views into them are the same bytes
        buckets = sum(int(b) for b in ddp._get_ddp_logging_data()["bucket_sizes"].split(","))
        in_buckets = {(g.untyped_storage().data_ptr(), g.untyped_storage().nbytes()) for g in grads if g._is_view()}
        held["ddp_buckets"] = buckets - sum(nbytes for _, nbytes in in_buckets)
    with warnings.catch_warnings():  # isinstance() on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        held["other"] = count(o for o in gc.get_objects() if isinstance(o, torch.Tensor))
    return held


def count_parameters(model):
    """The model's parameter count (an FSDP2 DTensor reports the whole tensor's size, not the shard's)."""
    return sum(p.numel() for p in model.parameters())


class Report:
    """Bytes held at moments of a run, per parameter of the model: a log line (rank 0) and out_dir/memory.json (every
    rank's counts): {"parameters", "ranks": [{moment: {what: bytes}}]} of the run's first process, and each resumed
    process's after those before it, in "resumed": [{"step": the checkpoint's step (`resumed_at`), "ranks": ...}]."""

    def __init__(self, out_dir, n_params, log, resumed_at=None):
        self.path, self.n_params, self.log, self.moments = os.path.join(out_dir, "memory.json"), n_params, log, {}
        self.resumed_at, self.earlier = resumed_at, None

    def __call__(self, when, policy, reference, optimizer=None, ddp=None):
        self.moments[when] = held_bytes(policy, reference, optimizer, ddp)
        every = [self.moments]
        if dist.is_initialized():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, self.moments)
        if not dist.is_initialized() or dist.get_rank() == 0:
            if self.resumed_at is None:
                report = {"parameters": self.n_params, "ranks": every}
            else:  # the processes before this one stay as they were
                if self.earlier is None:
                    self.earlier = json.load(open(self.path)) if os.path.exists(self.path) else {}
                resumed = [*self.earlier.get("resumed", []), {"step": self.resumed_at, "ranks": every}]
                report = {"parameters": self.n_params, "ranks": [], **self.earlier, "resumed": resumed}
            with open(self.path, "w") as f:
                json.dump(report, f, indent=1)
        held = self.moments[when]
        self.log(f"memory {when}, rank 0, bytes per parameter: " + ", ".join(
            f"{k} {v / self.n_params:.2f}" for k, v in held.items()) + f" = {sum(held.values()) / self.n_params:.2f}")
