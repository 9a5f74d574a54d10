"""``run.fully_shard``: FSDP2 sharding of the denoiser with torch's ``fully_shard``, and the gathers
a sharded run needs to save what it trains.

Each block named by the model's ``_no_split_modules`` (diffusers transformers declare theirs), or
its repeated blocks (:mod:`align.compile`), is sharded, then the root: a block's weights are gathered
for its forward and freed after, so a process holds 1 / N of the weights plus one block. This is the
sharding accelerate's FSDP2 plugin applies on GPUs (``configs/accelerate/fsdp.yaml``); accelerate
has no FSDP for CPU processes (it runs them as DDP over gloo), so ``run.fully_shard`` applies it
there itself, and the CPU tests shard with it.

Sharded parameters (and the optimizer's state of them) are DTensors: :func:`full_tensors` gathers
them into whole tensors, a collective every process must enter in the same order, so checkpoints
and LoRA exports gather on every process and write on the main one; :func:`shard_like` cuts a
whole tensor back into a parameter's shard when a checkpoint is loaded.
"""

from __future__ import annotations

import torch


def block_names(model: torch.nn.Module) -> list[str]:
    from align.compile import repeated_block_names

    return list(getattr(model, "_no_split_modules", None) or []) or repeated_block_names(model)


def shard_denoiser(adapter) -> int:
    """Shard the adapter's denoiser in place (its blocks, then the root; the default device mesh
    over every process); returns the number of modules sharded."""
    from torch.distributed.fsdp import fully_shard

    base = adapter.base_denoiser
    names = set(block_names(base))
    blocks = [m for m in base.modules() if type(m).__name__ in names]
    for block in blocks:
        fully_shard(block)
    fully_shard(base)
    return len(blocks) + 1


def has_sharded(params) -> bool:
    """Whether any of ``params`` is a DTensor (FSDP2, whoever applied it)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch without the public DTensor: nothing here is sharded
        return False
    return any(isinstance(p, DTensor) for p in params)


def full_tensors(value):
    """``value`` (a tensor, or dicts / lists / tuples of them) with every DTensor gathered whole."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return value
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.full_tensor()
    if isinstance(value, dict):
        return {k: full_tensors(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full_tensors(v) for v in value)
    return value


def shard_like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``reference`` is: the same shard of the same mesh for a DTensor (a whole
    tensor of the reference's shape), else ``full`` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(reference, DTensor) and not isinstance(full, DTensor) and full.shape == reference.shape:
        return distribute_tensor(full.to(reference.device), reference.device_mesh, reference.placements)
    return full
