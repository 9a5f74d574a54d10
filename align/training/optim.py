"""The optimizer and its step: AdamW (torch or bitsandbytes 8-bit), the clipped step with its
non-finite guard, and the EMA of the trained weights used for evaluation and export."""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from align.errors import ConfigError, unknown_name_error

#: updates in a row with a NaN / inf gradient before a run stops
MAX_BAD_UPDATES = 3


class TrainingError(RuntimeError):
    """A run cannot go on (it diverged); one line."""


@dataclass
class OptimConfig:
    #: the optimizer, by name (OPTIMIZERS): "adamw" (torch), or "adamw8bit" (bitsandbytes: both moments
    #: in 8 bits, block-wise quantised, 2 bytes per trained parameter instead of 8; tensors under 4096
    #: elements keep 32-bit moments)
    name: str = "adamw"
    #: learning rate, constant over the run (3e-4: the Flow-GRPO reference's, as DDPO's)
    lr: float = 3e-4
    #: AdamW's decoupled weight decay (1e-4: the Flow-GRPO reference's)
    weight_decay: float = 1e-4
    #: AdamW's [beta1, beta2], the decay rates of the gradient's moment estimates (the reference's 0.9, 0.999)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    #: AdamW's epsilon, added to the second moment's square root (the reference's 1e-8)
    eps: float = 1e-8
    #: clip the total gradient norm of the trained parameters to this before each update (0: no clipping;
    #: 1.0: the Flow-GRPO reference's)
    max_grad_norm: float = 1.0
    #: exponential moving average of the trained weights (null: off), e.g. 0.99; evaluation and the
    #: LoRA export use it (the Flow-GRPO reference: 0.9, every 8 updates)
    ema_decay: float | None = None
    #: update the EMA every this many optimizer updates
    ema_every: int = 1


def adamw(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """torch's AdamW with fp32 moments."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay)


def adamw8bit(params, optim: OptimConfig) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: the same update with both moments stored block-wise in 8 bits."""
    bitsandbytes = import_bitsandbytes()
    return bitsandbytes.optim.AdamW8bit(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                        weight_decay=optim.weight_decay)


#: optim.name -> builder(trainable parameters, OptimConfig)
OPTIMIZERS = {"adamw": adamw, "adamw8bit": adamw8bit}


def import_bitsandbytes():
    """bitsandbytes, or a one-line ConfigError saying how to install it."""
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("optim.name adamw8bit needs bitsandbytes: pip install 'align-diffusion[bnb]'") from None
    return bitsandbytes


def check_optimizer(optim: OptimConfig) -> None:
    """Unknown optimizer names and a missing bitsandbytes fail here, before any model loads."""
    if optim.name not in OPTIMIZERS:
        raise unknown_name_error("optimizer", optim.name, OPTIMIZERS, field="optim.name")
    if optim.name == "adamw8bit":
        import_bitsandbytes()


def build_optimizer(params, optim: OptimConfig) -> torch.optim.Optimizer:
    check_optimizer(optim)
    return OPTIMIZERS[optim.name](params, optim)


def build_ema(params, optim: OptimConfig):
    """diffusers' EMAModel of the trained parameters (``optim.ema_decay``), or None when off."""
    if optim.ema_decay is None:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(params, decay=optim.ema_decay)


def optimizer_step(run) -> float | None:
    """Clip, step, zero once the accumulated minibatches complete an update; returns the gradient
    norm (before clipping), or None while gradients are still being accumulated.

    An update whose gradient is NaN / inf is skipped (one bad batch must not poison the
    weights) and counted in ``state.skipped_updates``; ``MAX_BAD_UPDATES`` in a row stop
    the run with a TrainingError. (fp16 runs leave this to accelerate's gradient scaler.)"""
    if not run.accelerator.sync_gradients:
        return None
    params = run.adapter.trainable_parameters()
    norm = float(run.accelerator.clip_grad_norm_(params, run.optim_config.max_grad_norm or math.inf))
    if not math.isfinite(norm) and run.accelerator.scaler is None:
        run.optimizer.zero_grad(set_to_none=True)
        run.state.skipped_updates += 1
        run.bad_updates += 1
        if run.bad_updates >= MAX_BAD_UPDATES:
            raise TrainingError(f"non-finite gradients in {run.bad_updates} updates in a row at iteration "
                                f"{run.state.iteration + 1}: the run diverged (lower optim.lr, check the "
                                f"rewards); the last checkpoint is intact")
        warnings.warn(f"non-finite gradient norm at iteration {run.state.iteration + 1}: update skipped",
                      stacklevel=2)
        return norm
    run.bad_updates = 0
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.updates += 1
    if run.ema is not None and run.state.updates % run.optim_config.ema_every == 0:
        run.ema.step(params)
    return norm


@contextmanager
def ema_weights(run):
    """Evaluate (and export) with the EMA weights when EMA is on."""
    if run.ema is None:
        yield
        return
    params = run.adapter.trainable_parameters()
    run.ema.store(params)
    run.ema.copy_to(params)
    try:
        yield
    finally:
        run.ema.restore(params)
