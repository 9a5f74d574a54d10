"""Step kernels: pure functions that take one denoising step and report its Gaussian log-prob.

Every kernel has the signature

    kernel(x, model_out, level, level_next, *, noise=None, prev_sample=None, generator=None,
           mean_shift=None, reduce="mean", **params) -> StepOut

``level`` / ``level_next`` are sigmas for flow models (1 = noise, 0 = clean) and cumulative alphas
(alpha_bar) for DDPM-family models; each is a float, a 0-d tensor or a (B,) tensor. Pass ``noise``
(or let the kernel draw it from ``generator``) to sample, or ``prev_sample`` to re-score a stored
transition. ``mean_shift`` is a drift added to the sample only (guided sampling): the reported
log-prob uses the unguided mean, so training distils the guidance into the model.

All math runs in float32 whatever the model dtype (float64 when the inputs are float64: gradient
checks). Log-probs are the mean over latent elements by
default (as the public reference implementations do: ratios stay near 1); ``reduce="sum"`` gives the
full-dimensional log-density.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from align.errors import ConfigError, unknown_name_error

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@dataclass
class StepOut:
    prev_sample: Tensor  # the next (less noisy) sample, float32
    mean: Tensor  # the Gaussian mean of the step (unguided)
    std: Tensor  # (B,) standard deviation of the step noise (0 for deterministic steps)
    log_prob: Tensor  # (B,) log-prob of prev_sample under N(mean, std^2)


def upcast(t: Tensor) -> Tensor:
    """float32, or float64 for a float64 tensor (kernels never compute below float32)."""
    return t if t.dtype == torch.float64 else t.float()


def per_sample(value: float | Tensor, x: Tensor) -> Tensor:
    """A float, 0-d or (B,) tensor -> float32 (float64 for a float64 x) tensor of shape
    (B, 1, ..., 1) that broadcasts over x."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    v = torch.as_tensor(value, dtype=dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def reduce_elements(values: Tensor, reduce: str = "mean") -> Tensor:
    """Mean (default) or sum over every dimension but the batch."""
    dims = tuple(range(1, values.ndim))
    if reduce == "mean":
        return values.mean(dim=dims)
    if reduce == "sum":
        return values.sum(dim=dims)
    raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")


def gaussian_log_prob(sample: Tensor, mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """log N(sample; mean, std^2) per element, reduced over elements:
    -(sample - mean)^2 / (2 std^2) - log std - log sqrt(2 pi).

    With one std per sample (shape (B, 1, ..., 1), every step kernel's), the per-sample terms come
    out of the reduction: -reduce((sample - mean)^2) / (2 std^2) - n (log std + log sqrt(2 pi)),
    n = 1 for "mean" and the element count for "sum" (two passes over the elements instead of six)."""
    std = upcast(std)
    difference = upcast(sample) - upcast(mean)
    if std.numel() == std.shape[0] and std.ndim == difference.ndim:
        per = std.reshape(-1)
        count = 1 if reduce == "mean" else difference[0].numel()
        return -reduce_elements(difference.square(), reduce) / (2 * per**2) - count * (torch.log(per) + LOG_SQRT_2PI)
    elementwise = -(difference**2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return reduce_elements(elementwise, reduce)


def _finish(mean: Tensor, std: Tensor, x: Tensor, noise, prev_sample, generator, mean_shift,
            reduce: str, log_prob_fn=None) -> StepOut:
    """Sample (or take) the next state and score it against the unguided mean."""
    if prev_sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None
                                else generator.device, dtype=torch.float32).to(x.device)
        shifted = mean if mean_shift is None else mean + upcast(mean_shift)
        prev_sample = shifted + std * upcast(noise)
    else:
        prev_sample = upcast(prev_sample)
    if log_prob_fn is not None:
        log_prob = log_prob_fn(prev_sample, mean)
    elif bool((std > 0).all()):
        log_prob = gaussian_log_prob(prev_sample, mean, std, reduce)
    else:  # a deterministic step has no density
        log_prob = torch.zeros(x.shape[0], device=x.device)
    return StepOut(prev_sample, mean, std.reshape(x.shape[0], -1)[:, 0].expand(x.shape[0]), log_prob)


def _deterministic(mean: Tensor, x: Tensor, prev_sample, mean_shift) -> StepOut:
    """A deterministic step: the sample is the mean plus the drift; the reported mean stays the
    unguided one, as for the stochastic kernels; no density (log-prob 0)."""
    if prev_sample is None:
        prev_sample = mean if mean_shift is None else mean + upcast(mean_shift)
    zeros = torch.zeros(x.shape[0], device=x.device)
    return StepOut(upcast(prev_sample), mean, zeros, zeros)


# --- flow models (velocity v ~ eps - x0, x_sigma = (1 - sigma) x0 + sigma eps) ----------------------


def euler_step(x, model_out, level, level_next, *, noise=None, prev_sample=None, generator=None,
               mean_shift=None, reduce="mean") -> StepOut:
    """ODE (Euler): x' = x + v dt, dt = sigma' - sigma. Deterministic, log-prob 0."""
    x, v = upcast(x), upcast(model_out)
    dt = per_sample(level_next, x) - per_sample(level, x)
    mean = x + v * dt
    return _deterministic(mean, x, prev_sample, mean_shift)


def flow_grpo_std(sigma: Tensor, sigma_next: Tensor, noise_level: float) -> Tensor:
    """std_t = a sqrt(sigma / (1 - sigma)); at sigma = 1 the denominator uses the next sigma."""
    denominator = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    return noise_level * torch.sqrt(sigma / denominator)


def flow_grpo_sde_step(x, model_out, level, level_next, *, noise=None, prev_sample=None,
                       generator=None, mean_shift=None, reduce="mean", noise_level=0.7) -> StepOut:
    """Flow-GRPO SDE: mean = x + [v + std_t^2 (x + (1 - sigma) v) / (2 sigma)] dt,
    x' = mean + std_t sqrt(-dt) eps."""
    x, v = upcast(x), upcast(model_out)
    sigma, sigma_next = per_sample(level, x), per_sample(level_next, x)
    dt = sigma_next - sigma
    std_t = flow_grpo_std(sigma, sigma_next, noise_level)
    # mean = a x + b v with per-sample a = 1 + std_t^2 dt / (2 sigma), b = dt (1 + std_t^2 (1 - sigma) / (2 sigma))
    half_var = std_t**2 / (2 * sigma)
    mean = (1 + half_var * dt) * x + (dt * (1 + half_var * (1 - sigma))) * v
    std = std_t * torch.sqrt(-dt)
    return _finish(mean, std, x, noise, prev_sample, generator, mean_shift, reduce)


def dance_grpo_sde_step(x, model_out, level, level_next, *, noise=None, prev_sample=None,
                        generator=None, mean_shift=None, reduce="mean", eta=0.3) -> StepOut:
    """DanceGRPO SDE: score = -(x + (1 - sigma) v) / sigma; mean = x + v dt - 0.5 eta^2 score dt;
    std = eta sqrt(sigma - sigma')."""
    x, v = upcast(x), upcast(model_out)
    sigma, sigma_next = per_sample(level, x), per_sample(level_next, x)
    dt = sigma_next - sigma
    score = -(x + (1 - sigma) * v) / sigma
    mean = x + v * dt - 0.5 * eta**2 * score * dt
    std = eta * torch.sqrt(sigma - sigma_next)
    return _finish(mean, std, x, noise, prev_sample, generator, mean_shift, reduce)


def cps_step(x, model_out, level, level_next, *, noise=None, prev_sample=None, generator=None,
             mean_shift=None, reduce="mean", noise_level=0.7) -> StepOut:
    """Coefficients-preserving sampling: s = sigma' sin(a pi / 2), x0_hat = x - sigma v,
    x1_hat = x + (1 - sigma) v, mean = (1 - sigma') x0_hat + sqrt(sigma'^2 - s^2) x1_hat,
    x' = mean + s eps, log p = -mean((x' - mean)^2) (constants dropped, as in the method)."""
    x, v = upcast(x), upcast(model_out)
    sigma, sigma_next = per_sample(level, x), per_sample(level_next, x)
    s = sigma_next * math.sin(noise_level * math.pi / 2)
    x0_hat = x - sigma * v
    x1_hat = x + (1 - sigma) * v
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - s**2).clamp_min(0)) * x1_hat
    return _finish(mean, s, x, noise, prev_sample, generator, mean_shift, reduce,
                   log_prob_fn=lambda sample, m: -reduce_elements((sample - m) ** 2, reduce))


def dpm_solver_2m_step(x, model_out, level, level_next, *, noise=None, prev_sample=None, generator=None,
                       mean_shift=None, reduce="mean", prev_x0=None, level_prev=None) -> StepOut:
    """DPM-Solver++ (2M) for flow models, deterministic (log-prob 0). With alpha = 1 - sigma, the
    data prediction x0 = x - sigma v and c = alpha' - sigma' alpha / sigma (= -alpha' (e^-h - 1),
    h = lambda' - lambda, lambda = log(alpha / sigma)):
    first order  x' = (sigma' / sigma) x + c x0;
    second order x' = (sigma' / sigma) x + c x0 + c/2 (x0 - x0_prev) / r, r = (lambda - lambda_prev) / h,
    used when the previous step's x0 (``prev_x0``, at ``level_prev``) is given, the previous level is
    below 1 and the step does not end at sigma' = 0 (the final step is first order, as diffusers'
    ``lower_order_final``)."""
    x, v = upcast(x), upcast(model_out)
    sigma, sigma_next = per_sample(level, x), per_sample(level_next, x)
    alpha, alpha_next = 1 - sigma, 1 - sigma_next
    x0 = x - sigma * v
    c = alpha_next - sigma_next * alpha / sigma
    mean = (sigma_next / sigma) * x + c * x0
    if prev_x0 is not None and level_prev is not None:
        sigma_prev = per_sample(level_prev, x)
        second = (sigma_prev < 1) & (sigma_next > 0)
        if bool(second.any()):
            def lam(s):  # log(alpha / sigma), only where the second-order step applies (finite there)
                s = torch.where(second, s, torch.full_like(s, 0.5))
                return torch.log((1 - s) / s)

            r = (lam(sigma) - lam(sigma_prev)) / (lam(sigma_next) - lam(sigma))
            correction = 0.5 * c * (x0 - upcast(prev_x0)) / torch.where(second, r, torch.ones_like(r))
            mean = mean + torch.where(second, correction, torch.zeros_like(correction))
    return _deterministic(mean, x, prev_sample, mean_shift)


# --- DDPM-family models (UNet, eps or v prediction, levels = alpha_bar) -----------------------------


def ddim_x0_eps(x: Tensor, model_out: Tensor, alpha: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) from the model output at x_t with cumulative alpha ``alpha``."""
    if prediction_type == "epsilon":
        eps = model_out
        x0 = (x - torch.sqrt(1 - alpha) * eps) / torch.sqrt(alpha)
    elif prediction_type == "v_prediction":
        x0 = torch.sqrt(alpha) * x - torch.sqrt(1 - alpha) * model_out
        eps = torch.sqrt(alpha) * model_out + torch.sqrt(1 - alpha) * x
    else:
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    return x0, eps


def ddim_step(x, model_out, level, level_next, *, noise=None, prev_sample=None, generator=None,
              mean_shift=None, reduce="mean", eta=1.0, prediction_type="epsilon",
              clip_sample: float | None = None) -> StepOut:
    """DDIM with log-prob (DDPO): var = (1 - a') / (1 - a) (1 - a / a'), std = eta sqrt(var),
    mean = sqrt(a') x0_hat + sqrt(1 - a' - std^2) eps_hat, x' = mean + std eps. eta = 0 is the
    deterministic DDIM ODE."""
    x, out = upcast(x), upcast(model_out)
    alpha, alpha_next = per_sample(level, x), per_sample(level_next, x)
    x0, eps = ddim_x0_eps(x, out, alpha, prediction_type)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    variance = (1 - alpha_next) / (1 - alpha) * (1 - alpha / alpha_next)
    std = eta * torch.sqrt(variance.clamp_min(0))
    mean = torch.sqrt(alpha_next) * x0 + torch.sqrt((1 - alpha_next - std**2).clamp_min(0)) * eps
    if eta == 0:
        return _deterministic(mean, x, prev_sample, mean_shift)
    return _finish(mean, std, x, noise, prev_sample, generator, mean_shift, reduce)


def ddim_ode_step(x, model_out, level, level_next, **kwargs) -> StepOut:
    """Deterministic DDIM (eta = 0): the ODE of DDPM-family models."""
    kwargs["eta"] = 0.0
    return ddim_step(x, model_out, level, level_next, **kwargs)


# --- x0 from a model output -------------------------------------------------------------------------


def x0_hat(x: Tensor, model_out: Tensor, level, kind: str = "flow", prediction_type: str = "flow") -> Tensor:
    """The model's clean-sample estimate at x: flow models x - sigma v; DDPM-family models
    (x - sqrt(1 - a) eps) / sqrt(a) (eps prediction) or sqrt(a) x - sqrt(1 - a) v (v prediction)."""
    x, out = upcast(x), upcast(model_out)
    if kind == "flow":
        return x - per_sample(level, x) * out
    return ddim_x0_eps(x, out, per_sample(level, x), prediction_type)[0]


# --- registry ------------------------------------------------------------------------------------

Kernel = Callable[..., StepOut]


@dataclass(frozen=True)
class KernelSpec:
    """One step kernel: its function, the schedule kind it applies to ("flow", "ddpm", or "any" for
    the ODE, which resolves to the deterministic kernel of the schedule), the parameter that sets its
    noise level (scaled at tree splits and by per-step multipliers) and its default parameters."""

    name: str
    fn: Kernel | None
    schedule_kind: str
    noise_param: str | None
    defaults: dict = field(default_factory=dict)
    #: a multistep solver: the rollout passes each row's previous x0 (``prev_x0``) and level
    #: (``level_prev``)
    multistep: bool = False

    @property
    def stochastic(self) -> bool:
        return self.noise_param is not None

    def params(self, overrides: dict | None = None, prediction_type: str | None = None) -> dict:
        """The defaults merged with ``overrides``; DDIM also takes the model's prediction type."""
        params = {**self.defaults, **(overrides or {})}
        if self.schedule_kind == "ddpm" and prediction_type is not None:
            params.setdefault("prediction_type", prediction_type)
        return params

    def check_params(self, params: dict, field: str = "rollout.kernel_params") -> None:
        """A ConfigError for a parameter this kernel does not take (with the valid names), or a noise
        parameter that is not > 0."""
        import inspect

        fixed = {"x", "model_out", "level", "level_next", "noise", "prev_sample", "generator", "mean_shift",
                 "reduce", "prev_x0", "level_prev"}
        valid = [] if self.fn is None else [p for p in inspect.signature(self.fn).parameters if p not in fixed]
        for key, value in (params or {}).items():
            if key not in valid:
                raise unknown_name_error(f"parameter of step kernel {self.name!r}", key, valid or ["(none)"],
                                         field=field)
            if key == self.noise_param and not (isinstance(value, (int, float)) and value > 0):
                raise ConfigError(f"{field}.{key} must be > 0, got {value}")

    def scaled(self, params: dict, scale: float) -> dict:
        """``params`` with the noise parameter multiplied by ``scale``."""
        if scale == 1.0 or self.noise_param is None:
            return params
        return {**params, self.noise_param: params[self.noise_param] * scale}

    def resolve(self, schedule_kind: str) -> Kernel:
        """The function for a model with this schedule kind; a ConfigError on a mismatch."""
        if self.schedule_kind == "any":
            return ODE_KERNELS[schedule_kind]
        if self.schedule_kind != schedule_kind:
            valid = sorted(k for k, spec in KERNELS.items() if spec.schedule_kind in (schedule_kind, "any"))
            raise ConfigError(f"rollout.kernel: step kernel {self.name!r} is for {self.schedule_kind} schedules; "
                              f"this model uses a {schedule_kind} schedule (use one of {valid})")
        return self.fn


#: every step kernel by name
KERNELS: dict[str, KernelSpec] = {spec.name: spec for spec in (
    KernelSpec("flow_grpo", flow_grpo_sde_step, "flow", "noise_level", {"noise_level": 0.7}),
    KernelSpec("dance_grpo", dance_grpo_sde_step, "flow", "eta", {"eta": 0.3}),
    KernelSpec("cps", cps_step, "flow", "noise_level", {"noise_level": 0.7}),
    KernelSpec("ddim", ddim_step, "ddpm", "eta", {"eta": 1.0}),
    KernelSpec("ode", None, "any", None),
    KernelSpec("dpm_solver", dpm_solver_2m_step, "flow", None, multistep=True),
)}

#: the deterministic kernel of each schedule kind
ODE_KERNELS: dict[str, Kernel] = {"flow": euler_step, "ddpm": ddim_ode_step}


def kernel_spec(name: str, field: str = "rollout.kernel") -> KernelSpec:
    """The registry entry ``name``; a one-line ConfigError naming ``field`` and the closest name."""
    if name not in KERNELS:
        raise unknown_name_error("step kernel", name, KERNELS, field=field)
    return KERNELS[name]


def get_kernel(name: str, schedule_kind: str) -> Kernel:
    """Kernel function by name for a schedule kind; "ode" resolves to that kind's deterministic kernel."""
    return kernel_spec(name).resolve(schedule_kind)
