"""One small reward interface, a registry by name, and a weighted combination.

A reward maps a batch of images (B, C, H, W) or videos (B, F, C, H, W), float in [0, 1], plus the
prompts (and optional context such as reference images, step index, noisy latents) to named scores
per sample and a weighted total. Preprocessing is done in torch so gradients flow where the model
allows; ``differentiable`` says whether they do.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from align.errors import ConfigError, unknown_name_error


class RewardError(RuntimeError):
    """A reward could not score a batch (NaN output, failing server, bad input); one line."""


@dataclass
class RewardOutput:
    #: named dimensions, each (B,)
    scores: dict[str, Tensor]
    #: weighted total (B,)
    total: Tensor
    #: False where a sample could not be scored (and was skipped by policy)
    valid: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.total.shape[0]

    def valid_mask(self) -> Tensor:
        """(B,) bool: the scored rows (all rows when the reward flags none), finite totals only."""
        ok = torch.isfinite(self.total)
        return ok if self.valid is None else ok & self.valid.to(ok.device).bool()

    def mean(self) -> float:
        """Mean total over the scored rows (NaN only when no row was scored)."""
        ok = self.valid_mask()
        return float(self.total[ok].float().mean()) if bool(ok.any()) else float("nan")


def leaf_dimensions(names: Sequence[str]) -> list[str]:
    """The names among ``names`` that no other one extends as ``<name>.<dimension>``: a combined
    reward's dimensions (``motion.direction``) and its one-dimension rewards (``frame_digit``), not the
    parent totals (``motion``)."""
    return [k for k in names if not any(other.startswith(k + ".") for other in names)]


def check_samples(samples: Tensor, prompts: Sequence[str], who: str) -> None:
    """Shape, finiteness and prompt count, checked before any model runs."""
    if not isinstance(samples, Tensor) or samples.ndim not in (4, 5):
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise RewardError(f"{who}: expected images (B, C, H, W) or videos (B, F, C, H, W), got {shape}")
    channels = samples.shape[-3]
    if channels not in (1, 3):
        raise RewardError(f"{who}: expected 1 or 3 colour channels at dim -3, got shape {tuple(samples.shape)}")
    if len(prompts) != samples.shape[0]:
        raise RewardError(f"{who}: {samples.shape[0]} samples but {len(prompts)} prompts")
    if not torch.isfinite(samples).all():
        raise RewardError(f"{who}: samples contain NaN or inf")


class Reward(abc.ABC):
    """Base class. Subclasses implement :meth:`score` returning a dict of (B,) tensors, one per
    name in ``dimensions``; ``weights`` (default 1 each; the key ``"*"`` sets every dimension not
    named, e.g. ``{"*": 0, "motion_smoothness": 1}`` for one dimension only) make the total."""

    name: str = "reward"
    differentiable: bool = False
    dimensions: tuple[str, ...] = ("score",)
    #: accepts videos natively; otherwise videos are scored frame by frame and averaged
    handles_video: bool = False

    def __init__(self, weights: dict[str, float] | None = None) -> None:
        weights = dict(weights or {})
        rest = float(weights.pop("*", 1.0))  # "*": the weight of every dimension not named
        self.weights = {d: rest for d in self.dimensions}
        for key, value in weights.items():
            if key not in self.weights:
                raise unknown_name_error(f"dimension of reward {self.name!r}", key, self.dimensions)
            self.weights[key] = float(value)
        self.device = torch.device("cpu")

    @classmethod
    def spec_differentiable(cls, spec: dict) -> bool:
        """Whether the reward built from ``spec`` (its config options) is differentiable, known before
        it is built: the class's ``differentiable`` unless the options decide it."""
        return cls.differentiable

    @abc.abstractmethod
    def score(self, samples: Tensor, prompts: Sequence[str], **context) -> dict[str, Tensor]:
        """Named (B,) scores of images in [0, 1] (videos when ``handles_video``)."""

    def to(self, device) -> "Reward":
        self.device = torch.device(device)
        for value in vars(self).values():
            if isinstance(value, torch.nn.Module):
                value.to(self.device)
        return self

    def __call__(self, samples: Tensor, prompts: Sequence[str], **context) -> RewardOutput:
        check_samples(samples, prompts, f"reward {self.name!r}")
        if samples.ndim == 5 and not self.handles_video:
            b, f = samples.shape[:2]
            frame_prompts = [p for p in prompts for _ in range(f)]
            per_frame = self.score(samples.flatten(0, 1), frame_prompts, **context)
            scores = {k: v.reshape(b, f).mean(1) for k, v in per_frame.items()}
        else:
            scores = self.score(samples, prompts, **context)
        missing = [d for d in self.dimensions if d not in scores]
        if missing:
            raise RewardError(f"reward {self.name!r} returned no {missing[0]!r} dimension")
        valid = scores.pop("_valid", None)
        for key, value in scores.items():
            bad = ~torch.isfinite(value) if valid is None else ~torch.isfinite(value) & valid
            if bad.any():
                first = int(bad.nonzero()[0])
                raise RewardError(f"reward {self.name!r} returned NaN/inf in {key!r} for sample {first}")
        total = sum(self.weights[d] * scores[d].float() for d in self.dimensions)
        return RewardOutput(scores, total, valid)


# --- registry (filled by register_reward; lookups by name are in rewards.registry) ---------------------

REWARDS: dict[str, Callable[..., Reward] | str] = {}


def register_reward(name: str):
    """Class decorator: ``@register_reward("jpeg_compressibility")``."""

    def wrap(cls):
        REWARDS[name] = cls
        cls.name = name
        return cls

    return wrap


class CombinedReward(Reward):
    """Weighted sum of several rewards: total = sum_k w_k * norm_k(total_k), with per-reward
    normalisation "none" or "batch" ((r - mean) / (std + 1e-6) over the batch's scored rows). Every reward's
    total is also reported as a dimension named after it."""

    name = "combined"

    def __init__(self, rewards: dict[str, Reward], weights: dict[str, float] | None = None,
                 normalize: dict[str, str] | str = "none") -> None:
        self.rewards = dict(rewards)
        self.dimensions = tuple(self.rewards)
        super().__init__(weights)
        if isinstance(normalize, str):
            normalize = {k: normalize for k in self.rewards}
        for key, mode in normalize.items():
            if mode not in ("none", "batch"):
                raise ConfigError(f"normalize for reward {key!r} must be 'none' or 'batch', got {mode!r}")
        self.normalize = {k: normalize.get(k, "none") for k in self.rewards}
        self.differentiable = all(r.differentiable for r in self.rewards.values())
        self.handles_video = True

    def to(self, device) -> "CombinedReward":
        for reward in self.rewards.values():
            reward.to(device)
        self.device = torch.device(device)
        return self

    def score(self, samples, prompts, **context):
        return {key: reward(samples, prompts, **context).total for key, reward in self.rewards.items()}

    def __call__(self, samples, prompts, **context) -> RewardOutput:
        check_samples(samples, prompts, "combined reward")
        outputs = {key: reward(samples, prompts, **context) for key, reward in self.rewards.items()}
        scores, total, valid = {}, 0.0, None
        for key, out in outputs.items():
            scores[key] = out.total
            for dim, value in out.scores.items():
                if len(out.scores) > 1:
                    scores[f"{key}.{dim}"] = value
            value = out.total
            if self.normalize[key] == "batch":  # statistics of the scored rows only
                ok = torch.isfinite(value) if out.valid is None else out.valid & torch.isfinite(value)
                mean, std = value[ok].mean(), value[ok].std(unbiased=False)
                value = (value - mean) / (std + 1e-6)
            total = total + self.weights[key] * value
            if out.valid is not None:
                valid = out.valid if valid is None else valid & out.valid
        return RewardOutput(scores, total, valid)
