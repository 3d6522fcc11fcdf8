"""FSDP2 (`train.py --fsdp`): the policy and the reference sharded over the processes, built without a whole model on
any device.

DDP gives every GPU a whole copy of everything: the fp32 policy, its gradients, AdamW's two moments and the fp32
reference, 20 bytes per parameter. FSDP2 gives each of N ranks 1/N of every tensor instead; a decoder block's weights
are all-gathered (in bf16 under --dtype bf16) just for its forward and backward, and its gradients reduce-scattered
back to shards. Policy and reference are sharded alike, so the reference update is the same fused lerp on each
rank's own pieces: no gathered model, no communication (TRL's ZeRO-3 sync gathers both models whole on every rank).

Building: both models are created on the meta device (no memory), sharded, and only then given memory, each rank
for its own shards. Rank 0 reads the weights into CPU memory and broadcasts them one tensor at a time; every rank
keeps its slice of each (and buffers, such as rotary frequencies, whole). The reference then copies
the policy's shards locally.

The torch.distributed.fsdp imports happen inside the functions: plain and DDP runs never pay for them; nor does
ref_update.py's import of local_shard pull in transformers (toy.py and plot.py start 1.3 s sooner).
"""
import torch
import torch.distributed as dist


def local_shard(t):
    """This rank's piece of a parameter: an FSDP2 parameter is a DTensor, whose shard .to_local() gives; any other
    tensor is its own piece. (Duck-typed: importing DTensor costs 0.5 s at every start of a run.)"""
    return t.to_local() if hasattr(t, "to_local") else t


def shard(model, use_bf16, reshard_root=False):
    """fully_shard every decoder block, then the root (embeddings, final norm, head): each rank keeps 1/N of them.
    The policy's root keeps its gathered weights from forward to backward (FSDP2's default for a root: its backward
    starts with them), so the root must be resharded by hand after a forward without backward (`reshard`). The
    reference has no backward: its root reshards after every forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
    for block in [m for m in model.modules() if type(m).__name__ in model._no_split_modules]:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp, reshard_after_forward=True if reshard_root else None)


def reshard(model):
    """After a forward without backward (evaluation, KTO's KL estimate): the policy's root gives back its gathered
    weights, so that evaluation, the reference update and checkpoints see shards, never whole tensors."""
    if hasattr(model, "reshard"):  # an FSDP2 module; plain and DDP models have nothing to give back
        model.reshard()


def empty_sharded(name, device, use_bf16, grad_ckpt=False, dtype=torch.float32, reshard_root=False):
    """The model `name`, sharded, with uninitialised shards and buffers on `device`: no rank ever holds it whole."""
    from transformers import AutoModelForCausalLM
    from model import dropout_off, load_config
    with torch.device("meta"):  # parameters and buffers without memory (tied embeddings stay one tensor)
        model = AutoModelForCausalLM.from_config(load_config(name), dtype=torch.float32)
    for p in model.parameters():  # the weights in `dtype`; buffers (rotary frequencies) stay as the model made them
        p.data = p.data.to(dtype)
    dropout_off(model).eval()
    if grad_ckpt:  # recompute activations in backward: memory for compute
        model.activation_checkpointing_enable({"use_reentrant": False})
        model.train()  # HF checkpoints only in train mode; every dropout is 0
    shard(model, use_bf16, reshard_root)
    return model.to_empty(device=device)  # memory for this rank's shards only, and for the (small) buffers


def build(name, device, use_bf16, grad_ckpt, seed, with_reference, master, reference_dtype=torch.float32):
    """(policy, reference) sharded over the processes, both equal to the model `name` (the SFT model).

    reference_dtype bf16 is exact only where the reference is never mixed (hard copies, vanilla) and compute is bf16:
    FSDP all-gathers the fp32 policy's shards cast to bf16, the very values a bf16 copy holds, so both forwards
    compute alike (tests/test_distributed.py). A soft update needs fp32 (ref_update.py)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from model import load_model
    policy = empty_sharded(name, device, use_bf16, grad_ckpt)
    full = load_model(name, seed=seed) if master else None  # rank 0 only, in CPU memory
    set_model_state_dict(policy, full.state_dict() if master else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    with torch.no_grad():  # buffers too (e.g. rotary inv_freq: computed at init, in no state dict), from rank 0
        for n, b in policy.named_buffers():
            if master:
                b.copy_(full.get_buffer(n))
            dist.broadcast(b, src=0)
    del full
    reference = None
    if with_reference:
        reference = empty_sharded(name, device, use_bf16, dtype=reference_dtype, reshard_root=True)
        reference.requires_grad_(False)  # no backward
        with torch.no_grad():  # the reference starts as the policy: each rank copies its own shards, and the buffers
            for (_, r), (_, b) in zip(reference.named_buffers(), policy.named_buffers()):
                r.copy_(b)
            shards = [local_shard(r) for r in reference.parameters()]
            torch._foreach_copy_(shards, [local_shard(p).to(r.dtype) for r, p in zip(shards, policy.parameters())])
    return policy, reference
