"""Checkpoint reading and validation shared by the model-based rewards.

A missing file or a state dict that does not fit the model is one ``CheckpointError`` line that names
the file and says what was expected (missing / unexpected keys, shapes), instead of a long
``load_state_dict`` traceback. ``CheckpointError`` is a ``ConfigError`` (the weights path is a config
value), so the CLI prints it as one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from align.errors import ConfigError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ConfigError):
    """A checkpoint file is missing or does not fit the model it is loaded into; one line."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r} (valid: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def _sample(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_state_dict(path: str | Path, what: str) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file (``weights_only`` loading);
    a ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a ``module.`` prefix are removed."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what}: no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            # tensors only: never a pickle of arbitrary objects, never a TorchScript archive (both
            # can run code); convert those to safetensors first
            state = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{what}: cannot read checkpoint {path}: {first}") from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{what}: {path} is not a state dict of tensors")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor | torch.Size | tuple],
                     path: str | Path, what: str, *, ignore: Iterable[str] = ()) -> None:
    """Raise a one-line CheckpointError unless ``state`` has exactly the keys and shapes of ``expected``
    (a state dict or ``{key: shape}``); keys in ``ignore`` are not required."""
    ignore = set(ignore)
    shapes = {k: tuple(v.shape) if isinstance(v, Tensor) else tuple(v) for k, v in expected.items()}
    missing = [k for k in shapes if k not in state and k not in ignore]
    unexpected = [k for k in state if k not in shapes and k not in ignore]
    problems = []
    if missing:
        problems.append(f"missing keys {_sample(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_sample(unexpected)}")
    wrong = [(k, tuple(state[k].shape), shapes[k]) for k in shapes if k in state and tuple(state[k].shape) != shapes[k]]
    if wrong:
        k, got, want = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        problems.append(f"{k} has shape {list(got)}, expected {list(want)}{more}")
    if problems:
        raise CheckpointError(f"{what}: checkpoint {path} does not fit: {'; '.join(problems)}")


def load_into(module: nn.Module, path: str | Path, what: str, *, ignore: Iterable[str] = (),
              rename: dict[str, str] | None = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``module`` after checking every key and shape."""
    state = read_state_dict(path, what)
    if rename:
        state = {_rename(k, rename): v for k, v in state.items()}
    expected = module.state_dict()
    # scalar-vs-1d parameters (logit_scale) are the same thing in different releases
    for key, value in list(state.items()):
        if key in expected and value.numel() == expected[key].numel() == 1:
            state[key] = value.reshape(expected[key].shape)
    check_state_dict(state, expected, path, what, ignore=ignore)
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return module


def _rename(key: str, rename: dict[str, str]) -> str:
    for old, new in rename.items():
        if key.startswith(old):
            return new + key[len(old):]
    return key


def freeze(module: nn.Module) -> nn.Module:
    """Eval mode, no parameter gradients (gradients still flow to the inputs)."""
    module.eval()
    module.requires_grad_(False)
    return module
