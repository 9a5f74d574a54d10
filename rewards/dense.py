"""Dense (step-level) rewards: scores for intermediate denoising steps.

Three ways to score a noisy state x_t of a trajectory (flow notation: x_sigma = (1 - sigma) x0 + sigma eps):

* ODE completion (DenseGRPO): complete x_t to a clean sample with the deterministic sampler of the
  model, decode, score with any clean reward. ``dense_step_rewards`` turns the values of consecutive
  states into per-step rewards ``R(ode(x_{t+1})) - R(ode(x_t))`` (the reward a step adds), normalised
  per step across the batch. The rollout engine draws these completions in one batched run
  (``RolloutConfig.branch_steps``); :func:`ode_complete` does it for any x_t, and the reward
  ``ode_completion`` wraps it.
* Noise-aware reward (TTSnap): score the one-step prediction x0_hat = x_t - sigma v decoded to pixels,
  with a copy of a clean reward fine-tuned by self-distillation to predict the clean reward of the
  final sample from x0_hat at noise level sigma (a curriculum moves from clean to noisy inputs), plus
  a sigma-dependent affine calibration that starts at the identity. Reward ``noise_aware``.
* Latent process reward model: a small network over the noisy latent, sigma and the prompt
  (hashed words), trained by regression or Bradley-Terry on (x_t, final reward) pairs of rollouts;
  differentiable in the latent, so guided kernels can follow its gradient. Reward ``latent_prm``.
"""

from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward
from rewards.registry import build_reward
from rewards.loading import load_into


# --- ODE completion -------------------------------------------------------------------------------
def predict_x0(x: Tensor, model_out: Tensor, level: Tensor | float, kind: str = "flow",
               prediction_type: str = "flow") -> Tensor:
    """One-step clean prediction: flow ``x - sigma v``; DDPM-family (``level`` = alpha_bar) the DDIM x0."""
    from align.sampling.kernels import ddim_x0_eps, per_sample

    if kind == "flow":
        return x.float() - per_sample(level, x) * model_out.float()
    return ddim_x0_eps(x.float(), model_out.float(), per_sample(level, x), prediction_type)[0]


@torch.no_grad()
def ode_complete(adapter, latents: Tensor, step: int, cond, schedule=None, num_steps: int | None = None,
                 max_batch: int | None = None) -> Tensor:
    """Complete the states ``latents`` (before step ``step`` of ``schedule``) to clean latents with the
    model's deterministic sampler (Euler for flow models, DDIM eta = 0 otherwise)."""
    from align.sampling.kernels import get_kernel

    schedule = schedule or adapter.schedule(num_steps or adapter.default_steps, latent_shape=tuple(latents.shape[1:]))
    if not 0 <= step <= len(schedule):
        raise RewardError(f"ode_complete: step {step} outside 0..{len(schedule)}")
    ode = get_kernel("ode", schedule.kind)
    params = {"prediction_type": adapter.prediction_type} if schedule.kind == "ddpm" else {}
    x = latents.float()
    for i in range(step, len(schedule)):
        outs = []
        for start in range(0, x.shape[0], max_batch or x.shape[0]):
            rows = torch.arange(start, min(start + (max_batch or x.shape[0]), x.shape[0]))
            outs.append(adapter.predict(x[rows], schedule.timesteps[i], cond.select(rows)))
        x = ode(x, torch.cat(outs), schedule.levels[i], schedule.levels[i + 1], **params).prev_sample
    return x


def dense_step_rewards(values: Tensor, normalize: bool = True, eps: float = 1e-4) -> Tensor:
    """Per-step rewards from the values of consecutive states.

    ``values`` (B, S + 1): ``values[:, t]`` = R(ode(x_t)), the clean reward reached from the state
    before step t (``values[:, S]`` is the final sample's reward). Returns (B, S) with
    ``r_t = values[:, t + 1] - values[:, t]``; with ``normalize`` each step (column) is centred and
    scaled over the batch: (r - mean) / (std + eps)."""
    if values.ndim != 2 or values.shape[1] < 2:
        raise ValueError(f"values must be (B, S + 1) with S >= 1, got {tuple(values.shape)}")
    deltas = values[:, 1:] - values[:, :-1]
    if not normalize:
        return deltas
    return (deltas - deltas.mean(0, keepdim=True)) / (deltas.std(0, unbiased=False, keepdim=True) + eps)


@register_reward("ode_completion")
class OdeCompletionReward(Reward):
    """A clean reward of the ODE completion of a noisy state.

    Call it as ``reward(pixels, prompts, latents=x_t, step=i, adapter=..., cond=..., schedule=...)``:
    the latents are completed from step ``i`` and decoded, and the inner reward scores the result (the
    ``pixels`` argument is then not used). Without ``latents`` it scores ``pixels`` as they are. Options:
    ``reward`` (the inner reward spec, a name or {name, ...}), ``max_batch``."""

    dimensions = ("score",)
    handles_video = True

    def __init__(self, reward: str | dict = "digit", max_batch: int | None = None, inner: Reward | None = None,
                 weights=None) -> None:
        super().__init__(weights)
        self.inner = inner or build_reward(reward)
        self.max_batch = max_batch
        self.differentiable = False  # completion runs without gradients

    def to(self, device) -> "OdeCompletionReward":
        self.inner.to(device)
        self.device = torch.device(device)
        return self

    def score(self, samples, prompts, latents=None, step=None, adapter=None, cond=None, schedule=None, **context):
        if latents is not None:
            if adapter is None or cond is None or step is None:
                raise RewardError("reward 'ode_completion' needs adapter, cond and step with latents")
            clean = ode_complete(adapter, latents, int(step), cond, schedule, max_batch=self.max_batch)
            samples = adapter.decode(adapter.apply_condition(clean, cond))  # image-to-video: its given frame
        return {"score": self.inner(samples, prompts, **context).total}


# --- noise-aware reward (self-distilled) ----------------------------------------------------------
class SigmaCalibration(nn.Module):
    """score -> score * (1 + a(sigma)) + b(sigma); a and b start at 0 (the identity)."""

    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, hidden), nn.SiLU(), nn.Linear(hidden, 2))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, score: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.float().reshape(-1, 1)
        a, b = self.net(torch.cat([s, s * s, torch.sin(math.pi * s)], dim=-1)).unbind(-1)
        return score * (1 + a) + b


def _modules(reward: Reward) -> list[nn.Module]:
    return [v for v in vars(reward).values() if isinstance(v, nn.Module)]


@register_reward("noise_aware")
class NoiseAwareReward(Reward):
    """Noise-aware reward: a student copy of a clean ``teacher`` reward that scores x0_hat at noise level
    ``sigma`` (context; 0 = clean), trained by :meth:`distill_step` / :meth:`distill` to predict the
    teacher's score of the final clean sample.

    Options: ``teacher`` (clean reward spec; its torch modules are copied and made trainable), ``lr``,
    ``curriculum_start`` (largest sigma trained at the start, 0.2), ``curriculum_steps`` (updates
    until every sigma up to 1 is trained, 200), ``checkpoint`` (a saved student), ``device``."""

    dimensions = ("score",)
    handles_video = True
    differentiable = True  # as the teacher: set per instance
    takes_sigma = True  # scores x0_hat at a noise level (test-time search passes the step's sigma)

    def __init__(self, teacher: str | dict = "digit", lr: float = 1e-4, curriculum_start: float = 0.2,
                 curriculum_steps: int = 200, checkpoint: str | Path | None = None, device: str = "cpu",
                 teacher_reward: Reward | None = None, weights=None) -> None:
        super().__init__(weights)
        if not 0 < curriculum_start <= 1 or curriculum_steps < 0:
            raise ConfigError("noise_aware: curriculum_start must be in (0, 1] and curriculum_steps >= 0")
        self.teacher = teacher_reward or build_reward(teacher)
        self.student = copy.deepcopy(self.teacher)
        self.calibration = SigmaCalibration()
        self.student_modules = nn.ModuleList(_modules(self.student) + [self.calibration])
        if not _modules(self.student):
            raise ConfigError(f"noise_aware: teacher {self.teacher.name!r} has no torch modules to fine-tune")
        self.student_modules.requires_grad_(False)
        if checkpoint is not None:
            load_into(self.student_modules, checkpoint, f"noise_aware student of {self.teacher.name!r}")
        self.differentiable = self.teacher.differentiable
        self.lr = float(lr)
        self.curriculum_start, self.curriculum_steps = float(curriculum_start), int(curriculum_steps)
        self.optimizer: torch.optim.Optimizer | None = None
        self.updates = 0
        self.to(device)

    def to(self, device) -> "NoiseAwareReward":
        self.teacher.to(device)
        # move the student's own copies; its Reward.to could swap in shared (cached) modules
        self.student_modules.to(device)
        self.student.device = torch.device(device)
        self.device = torch.device(device)
        return self

    def max_sigma(self, update: int | None = None) -> float:
        """The curriculum: the largest noise level trained at update ``update`` (clean to noisy, linear)."""
        u = self.updates if update is None else update
        if self.curriculum_steps == 0:
            return 1.0
        return min(1.0, self.curriculum_start + (1.0 - self.curriculum_start) * u / self.curriculum_steps)

    def _student_score(self, samples: Tensor, prompts: Sequence[str], sigma, **context) -> Tensor:
        sigma = torch.as_tensor(0.0 if sigma is None else sigma, dtype=torch.float32, device=samples.device)
        sigma = sigma.expand(samples.shape[0]) if sigma.ndim == 0 else sigma.reshape(-1)
        raw = self.student(samples, prompts, **context).total
        return self.calibration(raw, sigma.to(raw.device))

    def score(self, samples, prompts, sigma=None, **context):
        return {"score": self._student_score(samples, prompts, sigma, **context)}

    def distill_step(self, x0_hat: Tensor, sigmas: Tensor, prompts: Sequence[str], targets: Tensor) -> dict:
        """One update: MSE between the student's score of ``x0_hat`` at ``sigmas`` and ``targets`` (the
        teacher's score of the clean samples), on the rows the curriculum admits (sigma <= max_sigma)."""
        limit = self.max_sigma()
        keep = (sigmas <= limit + 1e-6).nonzero().flatten()
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam([p for m in self.student_modules for p in m.parameters()], lr=self.lr)
        if len(keep) == 0:
            self.updates += 1
            return {"loss": float("nan"), "max_sigma": limit, "rows": 0}
        self.student_modules.requires_grad_(True)
        self.student_modules.train()
        try:
            pred = self._student_score(x0_hat[keep], [prompts[int(i)] for i in keep], sigmas[keep])
            loss = F.mse_loss(pred, targets[keep].to(pred.device).float())
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            self.student_modules.requires_grad_(False)
            self.student_modules.eval()
        self.updates += 1
        return {"loss": float(loss.detach()), "max_sigma": limit, "rows": int(len(keep))}

    @torch.no_grad()
    def collect(self, adapter, prompts: Sequence[str], num_steps: int = 10, generator: torch.Generator | None = None,
                guidance_scale: float | None = None) -> dict:
        """Distillation data from ODE trajectories of ``adapter``: for every step, the decoded x0_hat and
        its sigma, with the teacher's score of the final clean sample as target. Returns flat tensors
        ``x0_hat`` (S B, ...), ``sigmas``, ``prompts`` and ``targets``, and ``clean`` (B, ...)."""
        from align.sampling.kernels import get_kernel

        prompts = list(prompts)
        cond = adapter.encode(prompts, guidance_scale=guidance_scale)
        shape = adapter.latent_shape()
        schedule = adapter.schedule(num_steps, latent_shape=shape)
        ode = get_kernel("ode", schedule.kind)
        params = {"prediction_type": adapter.prediction_type} if schedule.kind == "ddpm" else {}
        x = adapter.initial_noise(len(prompts), generator).float().to(adapter.device)
        x = adapter.apply_condition(x, cond)  # image-to-video: the given frame stays in place
        x0s, sigmas = [], []
        for i in range(len(schedule)):
            out = adapter.predict(x, schedule.timesteps[i], cond)
            level = schedule.levels[i]
            estimate = predict_x0(x, out, level, schedule.kind, adapter.prediction_type)
            x0s.append(adapter.decode(adapter.apply_condition(estimate, cond)))
            sigma = level if schedule.kind == "flow" else torch.sqrt(1 - level)  # DDPM: noise std
            sigmas.append(torch.full((len(prompts),), float(sigma)))
            x = ode(x, out, level, schedule.levels[i + 1], **params).prev_sample
        clean = adapter.decode(adapter.apply_condition(x, cond))
        targets = self.teacher(clean, prompts).total.float()
        return {"x0_hat": torch.cat(x0s), "sigmas": torch.cat(sigmas), "prompts": prompts * len(schedule),
                "targets": targets.repeat(len(schedule)), "clean": clean}

    def distill(self, adapter, prompts: Sequence[str], updates: int = 100, batch_size: int = 32,
                num_steps: int = 10, refresh_every: int = 10, generator: torch.Generator | None = None) -> list[dict]:
        """Self-distillation loop: every ``refresh_every`` updates collect fresh trajectories for the
        prompts, then train on random batches of their (x0_hat, sigma, target) rows under the curriculum."""
        generator = generator or torch.Generator().manual_seed(0)
        history, data = [], None
        for u in range(updates):
            if data is None or u % refresh_every == 0:
                data = self.collect(adapter, prompts, num_steps=num_steps, generator=generator)
            admitted = (data["sigmas"] <= self.max_sigma() + 1e-6).nonzero().flatten()
            pool = admitted if len(admitted) else torch.arange(len(data["sigmas"]))
            idx = pool[torch.randint(0, len(pool), (min(batch_size, len(pool)),), generator=generator)]
            history.append(self.distill_step(data["x0_hat"][idx], data["sigmas"][idx],
                                             [data["prompts"][int(i)] for i in idx], data["targets"][idx]))
        return history

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.student_modules.state_dict().items()}
        save_file(state, str(path))
        return path


# --- latent process reward model ------------------------------------------------------------------
def hash_words(prompts: Sequence[str], buckets: int) -> tuple[Tensor, Tensor]:
    """(ids, offsets) for ``nn.EmbeddingBag``: each lower-cased word hashed (crc32) into ``buckets``."""
    ids, offsets = [], []
    for prompt in prompts:
        offsets.append(len(ids))
        words = prompt.lower().split() or [""]
        ids += [zlib.crc32(w.encode("utf-8")) % buckets for w in words]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


class LatentPRM(nn.Module):
    """Small conv net: (latents (B, C, H, W) or video latents (B, C, F, H, W), sigma (B,), prompts) -> (B,).
    FiLM conditioning on a sigma embedding plus a hashed bag-of-words prompt embedding."""

    def __init__(self, in_channels: int, width: int = 32, text_buckets: int = 4096, text_dim: int = 32) -> None:
        super().__init__()
        self.in_channels, self.width, self.text_buckets = in_channels, width, text_buckets
        self.text = nn.EmbeddingBag(text_buckets, text_dim, mode="mean")
        self.cond = nn.Sequential(nn.Linear(text_dim + 8, 2 * width), nn.SiLU(), nn.Linear(2 * width, 4 * width))
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv_mid = nn.Conv2d(width, width, 3, stride=2, padding=1)
        self.conv_out = nn.Conv2d(width, width, 3, padding=1)
        self.head = nn.Linear(width, 1)

    @staticmethod
    def sigma_features(sigma: Tensor) -> Tensor:
        freqs = torch.arange(1, 5, device=sigma.device, dtype=torch.float32) * math.pi
        s = sigma.float()[:, None]
        return torch.cat([torch.sin(freqs * s), torch.cos(freqs * s)], dim=-1)

    def forward(self, latents: Tensor, sigma: Tensor, prompts: Sequence[str]) -> Tensor:
        b = latents.shape[0]
        frames = 1
        x = latents.float()
        if x.ndim == 5:  # (B, C, F, H, W): frames share the conditioning, scores are averaged
            frames = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).flatten(0, 1)
        if x.shape[1] != self.in_channels:
            raise RewardError(f"latent PRM expects {self.in_channels} latent channels, got {tuple(latents.shape)}")
        ids, offsets = hash_words(prompts, self.text_buckets)
        text = self.text(ids.to(x.device), offsets.to(x.device))
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        sigma = sigma.expand(b) if sigma.ndim == 0 else sigma.reshape(b)
        scale1, shift1, scale2, shift2 = self.cond(torch.cat([text, self.sigma_features(sigma)], -1)).chunk(4, -1)
        if frames > 1:
            scale1, shift1, scale2, shift2 = (t.repeat_interleave(frames, 0) for t in (scale1, shift1, scale2, shift2))
        h = F.silu(self.conv_in(x))
        h = h * (1 + scale1[..., None, None]) + shift1[..., None, None]
        h = F.silu(self.conv_mid(h))
        h = h * (1 + scale2[..., None, None]) + shift2[..., None, None]
        h = F.silu(self.conv_out(h)).mean(dim=(-2, -1))
        return self.head(h).squeeze(-1).reshape(b, frames).mean(1)


def pairwise_bt_loss(scores: Tensor, targets: Tensor, groups: Sequence | None = None) -> Tensor:
    """Bradley-Terry loss over every pair (i, j) of the same group with targets[i] > targets[j]:
    mean of -log sigmoid(s_i - s_j)."""
    n = scores.shape[0]
    same = torch.ones(n, n, dtype=torch.bool, device=scores.device)
    if groups is not None:
        keys = {g: k for k, g in enumerate(dict.fromkeys(groups))}
        g = torch.tensor([keys[x] for x in groups], device=scores.device)
        same = g[:, None] == g[None, :]
    better = (targets[:, None] > targets[None, :]) & same
    if not better.any():
        return scores.sum() * 0.0
    diff = scores[:, None] - scores[None, :]
    return F.softplus(-diff[better]).mean()


@register_reward("latent_prm")
class LatentProcessReward(Reward):
    """A latent process reward model: scores noisy latents (context ``latents`` and ``sigma``).

    Call as ``reward(pixels, prompts, latents=x_t, sigma=sigma_t)`` (``pixels`` is not used), or use
    ``reward.model(latents, sigma, prompts)`` directly for gradients with respect to the latents.
    Options: ``in_channels`` (latent channels), ``width``, ``checkpoint`` (a saved model), ``lr``,
    ``loss`` ("mse" regression on the final reward, or "bt": Bradley-Terry on pairs of one prompt)."""

    dimensions = ("score",)
    handles_video = True
    differentiable = False  # differentiable in the latents (reward.model), not in the pixels

    def __init__(self, in_channels: int = 16, width: int = 32, checkpoint: str | Path | None = None, lr: float = 1e-3,
                 loss: str = "mse", device: str = "cpu", weights=None) -> None:
        super().__init__(weights)
        if loss not in ("mse", "bt"):
            raise ConfigError(f"latent_prm loss must be 'mse' or 'bt', got {loss!r}")
        self.model = LatentPRM(in_channels, width)
        if checkpoint is not None:
            load_into(self.model, checkpoint, f"latent PRM ({in_channels} channels, width {width})")
        self.model.requires_grad_(False).eval()
        self.lr, self.loss = float(lr), loss
        self.optimizer: torch.optim.Optimizer | None = None
        self.to(device)

    def score(self, samples, prompts, latents=None, sigma=None, **context):
        if latents is None or sigma is None:
            raise RewardError("reward 'latent_prm' scores noisy latents: pass latents=... and sigma=...")
        return {"score": self.model(latents.to(self.device), sigma, list(prompts))}

    def fit_step(self, latents: Tensor, sigmas: Tensor, prompts: Sequence[str], targets: Tensor) -> float:
        """One update on (noisy latent, sigma, prompt, final reward) rows."""
        if self.optimizer is None:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
        self.model.requires_grad_(True).train()
        try:
            pred = self.model(latents.to(self.device), sigmas.to(self.device), list(prompts))
            t = targets.to(pred.device).float()
            loss = F.mse_loss(pred, t) if self.loss == "mse" else pairwise_bt_loss(pred, t, list(prompts))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        finally:
            self.model.requires_grad_(False).eval()
        return float(loss.detach())

    def trainable_state(self) -> dict:
        """What a run checkpoints of the model trained alongside: weights and optimiser state."""
        state = {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()}}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_trainable_state(self, state: dict) -> None:
        """The inverse of :meth:`trainable_state`."""
        self.model.load_state_dict(state["model"])
        if "optimizer" in state:
            self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr)
            self.optimizer.load_state_dict(state["optimizer"])

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}, str(path))
        return path


def prm_rows_from_rollout(rollout, rewards: Tensor, prompts: Sequence[str]) -> dict:
    """Training rows for :class:`LatentProcessReward` from a rollout without splits: every recorded
    main transition's input latent with its sigma, prompt and the final reward of its row."""
    rows = rollout.stacked()
    latents, steps = rows["latents"], rows["steps"]  # (M, K, ...), (K,)
    m, k = latents.shape[:2]
    levels = rollout.schedule.levels[steps].float()
    sigma = levels if rollout.schedule.kind == "flow" else torch.sqrt(1 - levels)
    prompt_rows = [prompts[int(i)] for i in rollout.prompt_index]
    return {"latents": latents.flatten(0, 1), "sigmas": sigma[None].expand(m, k).reshape(-1).cpu(),
            "prompts": [p for p in prompt_rows for _ in range(k)],
            "targets": rewards.float().cpu().repeat_interleave(k)}
