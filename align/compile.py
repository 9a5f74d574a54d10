"""``run.compile``: torch.compile of the denoiser, regional where the model has repeated blocks.

Compiling each repeated transformer block (diffusers' ``_repeated_blocks``, or the blocks named in
:data:`REPEATED_BLOCKS` for models that do not declare them) compiles one block once and reuses it
for every layer, so compile time stays small and LoRA / adapter switches recompile one block; a model
without repeated blocks (the embedded toy UNet) is compiled whole. Modules are compiled in place
(``nn.Module.compile``) after the LoRA is attached, so rollouts and training passes both run the
compiled code."""

from __future__ import annotations

import torch

#: compiled variants kept per block: a Flow-GRPO iteration alone meets grad on / off x LoRA on / off x
#: CFG half / whole batch x the last block's layout, more than dynamo's default of 8 (past which
#: it silently runs the block eagerly)
RECOMPILE_LIMIT = 64

#: repeated blocks of models whose diffusers class does not declare ``_repeated_blocks``
REPEATED_BLOCKS = {"SD3Transformer2DModel": ["JointTransformerBlock"], "WanTransformer3DModel": ["WanTransformerBlock"]}


def repeated_block_names(model: torch.nn.Module) -> list[str]:
    return list(getattr(model, "_repeated_blocks", None) or []) or REPEATED_BLOCKS.get(type(model).__name__, [])


def compile_denoiser(adapter, **options) -> int:
    """Compile the adapter's denoiser in place (``options`` go to torch.compile); returns the number
    of modules compiled (the repeated blocks, or 1 for the whole model)."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), RECOMPILE_LIMIT))
            break
    base = adapter.base_denoiser
    names = repeated_block_names(base)
    blocks = [m for m in base.modules() if type(m).__name__ in names] if names else []
    for block in blocks or [base]:
        block.compile(**options)
    return len(blocks) or 1
