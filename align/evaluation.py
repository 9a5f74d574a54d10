"""Evaluation of a model on fixed prompts and seeds: the mean reward, held-out rewards and sample
diversity. Its own config (``eval:`` in every trainer config), apart from the training runtime, so
a run, the demo and sweeps evaluate alike."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from align.errors import ConfigError
from align.sampling.rollout import RolloutConfig, rollout


@dataclass
class EvalConfig:
    #: sampling steps (null: the training rollout's)
    num_steps: int | None = None
    #: step kernel of the evaluation samples (ode: deterministic, so evaluations are comparable)
    kernel: str = "ode"
    #: classifier-free guidance scale (null: the training rollout's)
    guidance_scale: float | None = None
    #: negative prompt of the CFG branch (null: the trainer's negative_prompt)
    negative_prompt: str | None = None
    #: seed of the evaluation's start noise (the same samples before and after training)
    seed: int = 12345
    #: samples per evaluation prompt
    per_prompt: int = 4

    def validate(self) -> None:
        RolloutConfig(num_steps=self.num_steps or 1, kernel=self.kernel).validate()
        if self.per_prompt < 1:
            raise ConfigError(f"eval.per_prompt must be >= 1, got {self.per_prompt}")
        if self.num_steps is not None and self.num_steps < 1:
            raise ConfigError(f"eval.num_steps must be >= 1, got {self.num_steps}")

    def rollout_config(self, training: RolloutConfig) -> RolloutConfig:
        """The evaluation's rollout: its own kernel, steps and guidance (the training rollout's where
        null), no topology."""
        guidance = training.guidance_scale if self.guidance_scale is None else self.guidance_scale
        return RolloutConfig(num_steps=self.num_steps or training.num_steps, kernel=self.kernel,
                             guidance_scale=guidance, max_batch=training.max_batch)


def evaluate(adapter, reward, prompts: Sequence[str], config: EvalConfig, training: RolloutConfig, *,
             negative_prompt: str = "", heldout: dict | None = None, latent_kwargs: dict | None = None):
    """Samples of every prompt (``config.per_prompt`` each, seed ``config.seed``) and their metrics:
    ``eval/reward`` (mean over scored samples), ``eval/reward/<dimension>`` (each dimension's mean, for a
    reward of several: ``motion.direction``, ``frame_digit``, ...), ``eval/heldout/<name>`` (and
    ``eval/heldout/<name>.<dimension>`` for a held-out reward of several), ``eval/diversity``.
    Returns (metrics, pixels, prompt of each sample). Runs without gradients; the caller sets
    autocast and the weights (EMA) to evaluate."""
    rollout_config = config.rollout_config(training)
    negative = negative_prompt if config.negative_prompt is None else config.negative_prompt
    with torch.no_grad():
        cond = adapter.encode(list(prompts), negative, rollout_config.guidance_scale)
        generator = torch.Generator().manual_seed(config.seed)
        result = rollout(adapter, cond, rollout_config, group_size=config.per_prompt, generator=generator,
                         **(latent_kwargs or {}))
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float()
    sample_prompts = [prompts[i] for i in result.prompt_index.tolist()]
    trained = scored_output(reward, pixels, sample_prompts, "the trained reward")
    metrics = {"eval/reward": trained.mean(),
               **{f"eval/reward/{name}": value for name, value in dimension_means(trained).items()}}
    for name, extra in (heldout or {}).items():
        out = scored_output(extra, pixels, sample_prompts, f"held-out reward {name!r}")
        metrics[f"eval/heldout/{name}"] = out.mean()
        metrics.update({f"eval/heldout/{name}.{dim}": value for dim, value in dimension_means(out).items()})
    metrics["eval/diversity"] = float(diversity(pixels, result.prompt_index))
    return metrics, pixels, sample_prompts


def scored_output(reward, pixels: Tensor, prompts: Sequence[str], what: str):
    """The reward's output; a one-line RewardError when it could score none of the samples (a run
    must not end ``reward before=nan``)."""
    from rewards.base import RewardError

    out = reward(pixels, prompts)
    if not bool(out.valid_mask().any()):
        raise RewardError(f"{what} ({getattr(reward, 'name', type(reward).__name__)}) could score none of the "
                          f"{len(prompts)} evaluation samples: check the reward (e.g. OCR needs quoted text in the "
                          f"eval_prompts) or its server")
    return out


def dimension_means(out) -> dict[str, float]:
    """Mean over the scored rows of every dimension of a reward output with more than one, by its
    name in the output (``motion.direction``, ``frame_digit``; a dimension's parent total, such as
    ``motion``, left out); {} for a reward of one dimension."""
    from rewards.base import leaf_dimensions

    leaves = leaf_dimensions(list(out.scores))
    if len(leaves) < 2:
        return {}
    ok = out.valid_mask()
    return {k: float(out.scores[k][ok.to(out.scores[k].device)].float().mean()) for k in leaves}


def diversity(pixels: Tensor, groups: Tensor) -> Tensor:
    """Mean over groups of the mean pairwise RMS distance between a group's samples."""
    values = []
    for g in torch.unique(groups):
        x = pixels[groups == g].flatten(1).float()
        if len(x) < 2:
            continue
        d = torch.cdist(x, x) / math.sqrt(x.shape[1])
        n = len(x)
        values.append(d.sum() / (n * (n - 1)))
    return torch.stack(values).mean() if values else torch.tensor(0.0)
