"""Reward guidance of sampling through the rollout's drift hook.

One hook serves two methods:

* Flow-NRG (inference-time reward guidance, ``form: velocity``): the weighted reward gradient is
  added to the velocity, v' = v - g_w with g_w = -sum_k w_k grad R_k, so a step x' = x + v' dt moves
  the sample by ``shift = (-dt) * grad(sum_k w_k R_k)`` (dt = sigma' - sigma < 0). Weights per reward
  and per dimension come from the reward specs (``weight``, ``weights: {dimension: w}``); all weights 0
  is unguided sampling, bit for bit.
* Euphonium (guided SDE, ``form: normalized``): ``shift = eta^2 / (2 beta) * g / ||g||`` per sample,
  with eta the step's noise std (or a fixed ``eta``); a GRPO trainer then scores log-probs with the
  unguided mean (the rollout records it), so training distils the guidance into the model.

The gradient g is taken where the reward looks:

* ``on: x0_hat`` -- a pixel reward of the decoded one-step prediction x0_hat = x - sigma v, with the
  step's model output held fixed (d x0_hat / d x = I): no extra model evaluation;
* ``on: latents`` -- a reward of the noisy latent and its sigma (``latent_prm``), called with
  ``latents=`` and ``sigma=``.

by autograd when every guiding reward is differentiable, otherwise by SPSA (:func:`spsa_gradient`:
2 x ``spsa_probes`` reward calls). The hook counts its reward calls (``cost``) and keeps each guided
step's reward value per row (``values``: the process reward of dual advantages).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from align.errors import ConfigError

FORMS = ("velocity", "normalized")
SOURCES = ("x0_hat", "latents")
GRADIENTS = ("auto", "autograd", "spsa")


@dataclass
class GuidanceConfig:
    #: rewards whose gradient steers sampling: names or {name, weight, weights: {dimension: w}, ...}
    #: (empty: no guidance)
    rewards: list[Any] = field(default_factory=list)
    #: where the reward looks: "x0_hat" (a pixel reward of the decoded one-step prediction) or
    #: "latents" (a reward of the noisy latent and sigma, e.g. latent_prm)
    on: str = "x0_hat"
    #: "auto" (autograd when every guiding reward is differentiable, else SPSA), "autograd" or "spsa"
    gradient: str = "auto"
    #: SPSA: random +-1 directions per gradient estimate (each costs two reward calls per row)
    spsa_probes: int = 4
    #: SPSA: the probe size c, the step along each direction (latent units; 0.01: about 1e-2 of the data scale)
    spsa_scale: float = 0.01
    #: guided steps (null: every step but the last, whose x0_hat is the sample itself)
    steps: list[int] | None = None
    #: "velocity" (Flow-NRG: shift = -dt * grad) or "normalized" (Euphonium: eta^2 / (2 beta) g / ||g||)
    form: str = "velocity"
    #: Euphonium (form normalized): the KL temperature beta of the shift eta^2 / (2 beta) g / ||g|| (larger:
    #: weaker guidance)
    beta: float = 1.0
    #: Euphonium: the eta of that shift (null: each step's noise std under rollout.kernel)
    eta: float | None = None
    #: seed of the SPSA directions
    seed: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.rewards)

    def validate(self, num_steps: int | None = None, field_name: str = "guidance") -> None:
        for key, valid in (("on", SOURCES), ("form", FORMS), ("gradient", GRADIENTS)):
            if getattr(self, key) not in valid:
                raise ConfigError(f"{field_name}.{key} must be one of {valid}, got {getattr(self, key)!r}")
        if self.spsa_probes < 1 or self.spsa_scale <= 0:
            raise ConfigError(f"{field_name}: spsa_probes must be >= 1 and spsa_scale > 0")
        if self.beta <= 0 or (self.eta is not None and self.eta < 0):
            raise ConfigError(f"{field_name}: beta must be > 0 and eta >= 0 (or null)")
        if num_steps is not None:
            bad = [s for s in (self.steps or []) if not 0 <= s < num_steps]
            if bad:
                raise ConfigError(f"{field_name}.steps has step {bad[0]} outside 0..{num_steps - 1}")
        from rewards.registry import check_reward_specs

        check_reward_specs(self.rewards, f"{field_name}.rewards")
        if self.on == "latents" and len(self.rewards) > 1:
            raise ConfigError(f"{field_name}.on=latents takes one latent reward (e.g. latent_prm), got {len(self.rewards)}")

    def guided_steps(self, num_steps: int) -> set[int]:
        return set(range(num_steps - 1)) if self.steps is None else set(self.steps)


# --- the math ------------------------------------------------------------------------------------
def spsa_gradient(fn: Callable[[Tensor], Tensor], y: Tensor, probes: int, scale: float,
                  generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """SPSA estimate of the gradient of a per-sample black-box ``fn`` (B, ...) -> (B,) at ``y``:
    g = (1 / n) sum_k [fn(y + c d_k) - fn(y - c d_k)] / (2c) d_k, with d_k random +-1 directions
    (Rademacher) and c = ``scale``. Returns (g, value), value = the mean of fn(y + c d_k) and
    fn(y - c d_k) over k (fn(y) up to O(c^2)). Costs 2 n calls of fn."""
    grad = torch.zeros_like(y, dtype=torch.float32)
    value = torch.zeros(y.shape[0], dtype=torch.float32, device=y.device)
    for _ in range(probes):
        d = (torch.randint(0, 2, y.shape, generator=generator, device="cpu") * 2 - 1).to(y.device, torch.float32)
        up, down = fn(y + scale * d).float(), fn(y - scale * d).float()
        grad += ((up - down) / (2 * scale)).reshape(-1, *([1] * (y.ndim - 1))) * d
        value += (up + down) / 2
    return grad / probes, value / probes


def guidance_shift(grad: Tensor, form: str, *, dt: Tensor | float | None = None, eta: Tensor | float | None = None,
                   beta: float = 1.0, eps: float = 1e-12) -> Tensor:
    """The mean shift of a guided step from the reward gradient ``grad`` (B, ...):

    * ``velocity`` (Flow-NRG): ``-dt * grad`` -- the gradient added to the velocity of an Euler step;
    * ``normalized`` (Euphonium): ``eta^2 / (2 beta) * grad / ||grad||`` with the norm per sample
      (eta a float or (B,)); a zero gradient gives a zero shift."""
    from align.sampling.kernels import per_sample

    grad = grad.float()
    if form == "velocity":
        return -per_sample(dt, grad) * grad
    if form == "normalized":
        norm = grad.flatten(1).norm(dim=1).reshape(-1, *([1] * (grad.ndim - 1)))
        return per_sample(eta, grad) ** 2 / (2 * beta) * grad / norm.clamp_min(eps)
    raise ValueError(f"form must be one of {FORMS}, got {form!r}")


# --- the hook ------------------------------------------------------------------------------------
class RewardGuidance:
    """A ``drift`` hook for :func:`align.sampling.rollout.rollout`.

    ``reward``: the built guiding reward (weights included); ``prompts``: the prompt batch the
    rollout's ``prompt_index`` refers to; ``step_std``: view -> (B,) noise std of the step (the
    normalized form with eta null). After a rollout, ``values[step]`` holds the guiding reward of
    each main row at that step and ``cost`` counts reward calls (rows; SPSA: 2 x probes per row),
    reward backward passes (rows) and extra model evaluations (none: the step's own output is used)."""

    def __init__(self, config: GuidanceConfig, reward, adapter, prompts: Sequence[str], num_steps: int,
                 step_std: Callable | None = None, generator: torch.Generator | None = None) -> None:
        self.config, self.reward, self.adapter, self.prompts = config, reward, adapter, list(prompts)
        self.steps = config.guided_steps(num_steps)
        self.step_std = step_std
        self.generator = generator or torch.Generator().manual_seed(config.seed)
        use = config.gradient
        if use == "auto":
            use = "autograd" if getattr(reward, "differentiable", False) else "spsa"
        self.gradient = use
        self.values: dict[int, Tensor] = {}
        self.cost = {"reward_calls": 0, "reward_backward": 0, "model_calls": 0}
        self.zero = self._all_weights_zero(reward)

    @staticmethod
    def _all_weights_zero(reward) -> bool:
        return all(w == 0 for w in reward.weights.values())

    def objective(self, y: Tensor, view) -> Tensor:
        """The guiding reward's total (B,) at ``y`` (x0_hat latents, or noisy latents at view's sigma)."""
        prompts = [self.prompts[i] for i in view.prompt_index.tolist()]
        if self.config.on == "latents":  # latents have the model's channels: no pixel checks
            sigma = torch.as_tensor(view.level, dtype=torch.float32).expand(y.shape[0])
            scores = self.reward.score(y, prompts, latents=y, sigma=sigma)
            return sum(self.reward.weights[d] * scores[d].float() for d in self.reward.dimensions)
        return self.reward(self.adapter.decode(y), prompts).total

    def gradient_at(self, y: Tensor, view) -> tuple[Tensor, Tensor]:
        rows = y.shape[0]
        if self.gradient == "spsa":
            self.cost["reward_calls"] += 2 * self.config.spsa_probes * rows
            with torch.no_grad():
                return spsa_gradient(lambda z: self.objective(z, view), y.detach().float(), self.config.spsa_probes,
                                     self.config.spsa_scale, self.generator)
        self.cost["reward_calls"] += rows
        self.cost["reward_backward"] += rows
        with torch.enable_grad():
            z = y.detach().float().requires_grad_(True)
            value = self.objective(z, view)
            (grad,) = torch.autograd.grad(value.sum(), z, allow_unused=True)
        return (torch.zeros_like(z) if grad is None else grad.detach()), value.detach().float()

    def __call__(self, view) -> Tensor | None:
        if view.step not in self.steps or self.zero:
            return None
        y = view.x0_hat if self.config.on == "x0_hat" else view.x
        grad, value = self.gradient_at(y, view)
        self.values[view.step] = value.cpu()
        if self.config.form == "velocity":
            return guidance_shift(grad, "velocity", dt=view.level_next - view.level).to(view.x.dtype)
        eta = self.config.eta
        if eta is None:
            eta = self.step_std(view) if self.step_std is not None else 0.0
        return guidance_shift(grad, "normalized", eta=eta, beta=self.config.beta).to(view.x.dtype)


def kernel_step_std(rollout_config, adapter) -> Callable:
    """view -> (B,) noise std of the view's step under ``rollout_config.kernel`` (0 for the ODE)."""
    from align.sampling.kernels import kernel_spec
    from align.sampling.rollout import kernel_params

    spec = kernel_spec(rollout_config.kernel)
    if not spec.stochastic:
        return lambda view: torch.zeros(view.x.shape[0])
    params = kernel_params(rollout_config, adapter)
    scales = rollout_config.step_noise_scales
    kernel = spec.resolve(adapter.schedule(1, latent_shape=adapter.latent_shape()).kind)

    def std(view) -> Tensor:
        step_params = spec.scaled(params, scales[view.step]) if scales else params
        out = kernel(view.x, view.model_out, view.level, view.level_next,
                                          noise=torch.zeros_like(view.x), **step_params)
        return out.std

    return std


def build_guidance(config: GuidanceConfig, adapter, prompts: Sequence[str], rollout_config,
                   reward=None, num_steps: int | None = None) -> RewardGuidance | None:
    """The drift hook for one rollout of ``prompts`` (None when guidance is off). ``reward``: an
    already built guiding reward (a trainer's latent PRM); by default built from ``config.rewards``."""
    if not config.enabled and reward is None:
        return None
    if reward is None:
        from rewards import build_rewards

        reward = build_rewards(list(config.rewards)).to(adapter.device)
    steps = num_steps or rollout_config.num_steps or adapter.default_steps
    return RewardGuidance(config, reward, adapter, prompts, steps, step_std=kernel_step_std(rollout_config, adapter))
