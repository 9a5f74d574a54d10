"""A fused Triton kernel of the stochastic flow steps with their log-prob (Flow-GRPO, DanceGRPO, CPS).

Each of these steps has a mean that is linear in the latent and the velocity, with per-row
coefficients, and a per-row noise std (``align/sampling/kernels.py`` has the reference formulas):

- Flow-GRPO: with k = std_t^2 / (2 sigma) and dt = sigma' - sigma,
  mean = (1 + k dt) x + (1 + k (1 - sigma)) dt v,  std = std_t sqrt(-dt);
- DanceGRPO: with c = eta^2 dt / (2 sigma),
  mean = (1 + c) x + (dt + c (1 - sigma)) v,  std = eta sqrt(sigma - sigma');
- CPS: with s = sigma' sin(a pi / 2) and r = sqrt(sigma'^2 - s^2),
  mean = (1 - sigma' + r) x + (r (1 - sigma) - (1 - sigma') sigma) v,  std = s.

One pass over the latents reads x, v and the noise (or the given next sample, when re-scoring),
in bf16 / fp16 / fp32, and writes the mean and the sample in fp32 together with each block's sum of
(sample - mean)^2; the per-row log-prob is formed from those sums in fp32:
Gaussian -sum d^2 / (2 std^2) - n (log std + log sqrt(2 pi)), or CPS's -sum d^2 (constants dropped),
divided by n for the mean reduction. Block sums are added in a fixed order (no atomics), so a step
is deterministic. A guided drift (``mean_shift``) moves the sample, not the reported mean.

:func:`fused_step` is called like the reference kernels and returns the same ``StepOut``. The
rollout selects it on CUDA for steps without gradients (``rollout.fused_step: auto``); ``on`` also
runs it on CPU tensors when Triton's interpreter is active (``TRITON_INTERPRET=1``), which is how
the tests check it against the reference; ``off`` keeps the torch kernels everywhere.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from align.sampling.kernels import LOG_SQRT_2PI, StepOut, flow_grpo_std, per_sample

#: the kernels this module fuses
FUSED_KERNELS = ("flow_grpo", "dance_grpo", "cps")
#: elements per program
BLOCK = 1024


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def can_fuse(kernel: str, x: Tensor, mode: str = "auto") -> bool:
    """Whether the fused kernel runs this step: a fused kernel, no gradient wanted, Triton present,
    and CUDA tensors (or, with ``mode`` "on", CPU tensors under the interpreter)."""
    if mode == "off" or kernel not in FUSED_KERNELS or torch.is_grad_enabled() or not triton_available():
        return False
    return x.is_cuda or (mode == "on" and interpreted())


def coefficients(kernel: str, sigma: Tensor, sigma_next: Tensor, **params) -> tuple[Tensor, Tensor, Tensor]:
    """(c_x, c_v, std), each (B,) fp32: mean = c_x x + c_v v (module docstring)."""
    dt = sigma_next - sigma
    if kernel == "flow_grpo":
        std_t = flow_grpo_std(sigma, sigma_next, params.get("noise_level", 0.7))
        k = std_t**2 / (2 * sigma)
        return 1 + k * dt, (1 + k * (1 - sigma)) * dt, std_t * torch.sqrt(-dt)
    if kernel == "dance_grpo":
        eta = params.get("eta", 0.3)
        c = eta**2 * dt / (2 * sigma)
        return 1 + c, dt + c * (1 - sigma), eta * torch.sqrt(sigma - sigma_next)
    if kernel == "cps":
        s = sigma_next * math.sin(params.get("noise_level", 0.7) * math.pi / 2)
        r = torch.sqrt((sigma_next**2 - s**2).clamp_min(0))
        return 1 - sigma_next + r, r * (1 - sigma) - (1 - sigma_next) * sigma, s
    raise ValueError(f"no fused form of step kernel {kernel!r} (fused: {', '.join(FUSED_KERNELS)})")


_KERNEL = None


def _compiled_kernel():
    """The Triton kernel, defined on first use (``import triton`` reads TRITON_INTERPRET then)."""
    global _KERNEL
    if _KERNEL is not None:
        return _KERNEL
    import triton
    import triton.language as tl

    @triton.jit
    def sde_step_kernel(x_ptr, v_ptr, noise_ptr, shift_ptr, prev_ptr, cx_ptr, cv_ptr, std_ptr,
                        sample_ptr, mean_ptr, partial_ptr, n, blocks,
                        HAS_SHIFT: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        block = tl.program_id(1)
        offsets = block * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        at = row.to(tl.int64) * n + offsets
        x = tl.load(x_ptr + at, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + at, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(cx_ptr + row) * x + tl.load(cv_ptr + row) * v
        if HAS_PREV:
            sample = tl.load(prev_ptr + at, mask=mask, other=0.0).to(tl.float32)
        else:
            noise = tl.load(noise_ptr + at, mask=mask, other=0.0).to(tl.float32)
            shifted = mean
            if HAS_SHIFT:
                shifted = mean + tl.load(shift_ptr + at, mask=mask, other=0.0).to(tl.float32)
            sample = shifted + tl.load(std_ptr + row) * noise
        tl.store(sample_ptr + at, sample, mask=mask)
        tl.store(mean_ptr + at, mean, mask=mask)
        d = tl.where(mask, sample - mean, 0.0)
        tl.store(partial_ptr + row * blocks + block, tl.sum(d * d, axis=0))

    _KERNEL = sde_step_kernel
    return _KERNEL


def fused_step(kernel: str, x: Tensor, model_out: Tensor, level, level_next, *, noise=None, prev_sample=None,
               generator=None, mean_shift=None, reduce: str = "mean", **params) -> StepOut:
    """The step ``kernel`` (flow_grpo, dance_grpo or cps) in one Triton pass; the same arguments and
    result as the reference kernel in ``align/sampling/kernels.py`` (no gradient)."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    rows = x.shape[0]
    n = x[0].numel()
    sigma, sigma_next = per_sample(level, x).reshape(rows), per_sample(level_next, x).reshape(rows)
    cx, cv, std = (c.float().expand(rows).contiguous() for c in coefficients(kernel, sigma, sigma_next, **params))
    if prev_sample is None and noise is None:  # drawn exactly as the reference kernels draw it
        noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device,
                            dtype=torch.float32).to(x.device)
    flat = [t.reshape(rows, n).contiguous() if t is not None else None for t in (x, model_out, noise, mean_shift,
                                                                               prev_sample)]
    dummy = flat[0]
    sample = torch.empty(rows, n, dtype=torch.float32, device=x.device)
    mean = torch.empty_like(sample)
    blocks = -(-n // BLOCK)
    partial = torch.empty(rows, blocks, dtype=torch.float32, device=x.device)
    _compiled_kernel()[(rows, blocks)](
        flat[0], flat[1], flat[2] if flat[2] is not None else dummy, flat[3] if flat[3] is not None else dummy,
        flat[4] if flat[4] is not None else dummy, cx, cv, std, sample, mean, partial, n, blocks,
        HAS_SHIFT=flat[3] is not None, HAS_PREV=flat[4] is not None, BLOCK=BLOCK)
    squares = partial.sum(dim=1)
    if kernel == "cps":
        log_prob = -squares
    elif bool((std > 0).all()):
        log_prob = -squares / (2 * std**2) - n * (torch.log(std) + LOG_SQRT_2PI)
    else:  # a deterministic step has no density
        log_prob = torch.zeros(rows, device=x.device)
    if reduce == "mean":
        log_prob = log_prob / n
    return StepOut(sample.reshape(x.shape), mean.reshape(x.shape), std, log_prob)


def fused_or_reference(kernel: str, reference, mode: str = "auto"):
    """A step function with the reference kernel's signature that runs :func:`fused_step` where
    :func:`can_fuse` allows (decided per call: a step that keeps its gradient takes the reference)."""
    if mode == "off" or kernel not in FUSED_KERNELS:
        return reference

    def step(x, model_out, level, level_next, **kwargs):
        if can_fuse(kernel, x, mode) and not model_out.requires_grad:
            return fused_step(kernel, x, model_out, level, level_next, **kwargs)
        return reference(x, model_out, level, level_next, **kwargs)

    return step
