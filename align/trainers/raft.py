"""RAFT (reward-ranked fine-tuning) and reward-weighted flow matching (Flow-RWR): rounds of
sample, score, and fine-tune on the model's own samples with the ordinary denoising loss.

One iteration (a round) reads top to bottom:
prompts -> ``group_size`` samples per prompt (any kernel) -> decode -> reward r -> ``weighting``:
"top" keeps the best ``keep_per_prompt`` of each prompt, then the best ``keep_fraction`` of those
over the batch (RAFT), each with weight 1; "rwr" keeps every scored sample with weight
exp(r / temperature), normalised to mean 1 over the batch (Flow-RWR) -> ``updates_per_iteration``
optimizer steps of the weighted denoising / flow-matching loss on the kept clean latents, each with
fresh t and noise (``denoising``: the t distribution).

Works on flow models (velocity target) and DDPM-family models (epsilon / v target), images and
videos; the reward needs no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.config import ConfigError, check_choice
from align.losses import rwr_weights, weighted_mean
from align.prompts import iteration_generator, prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.denoising import DenoisingConfig, denoising_errors, draw_levels, training_schedule
from align.trainers.scoring import sample_and_score

WEIGHTINGS = ("top", "rwr")


@dataclass
class RAFTConfig(TrainerConfig):
    trainer: str = "raft"
    #: the deterministic ODE, 10 steps: the samples need no log-probs (any kernel works)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="ode"))
    #: top: samples kept per prompt (its best)
    keep_per_prompt: int = 1
    #: "top" (RAFT: the best samples, weight 1) or "rwr" (Flow-RWR: exp(r / temperature) weights)
    weighting: str = "top"
    #: top: then this fraction of the kept samples over the whole batch (the best)
    keep_fraction: float = 1.0
    #: rwr: the temperature T of exp(r / T)
    temperature: float = 0.05
    #: fine-tuning steps on each round's kept samples
    updates_per_iteration: int = 2
    #: the training levels t of the denoising loss, fresh each update: uniform, or logit_normal
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)


def check_config(config: RAFTConfig, adapter=None) -> None:
    check_common(config, adapter)
    check_choice("weighting", config.weighting, WEIGHTINGS)
    config.denoising.validate()
    if not 1 <= config.keep_per_prompt <= config.group_size:
        raise ConfigError(f"keep_per_prompt must be in 1..group_size ({config.group_size}), got {config.keep_per_prompt}")
    if not 0 < config.keep_fraction <= 1:
        raise ConfigError(f"keep_fraction must be in (0, 1], got {config.keep_fraction}")
    if config.temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {config.temperature}")
    if config.updates_per_iteration < 1:
        raise ConfigError(f"updates_per_iteration must be >= 1, got {config.updates_per_iteration}")


def ranked_keep(rewards: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor, per_group: int,
                fraction: float) -> torch.Tensor:
    """RAFT's selection: the ``per_group`` best scored rows of each group, then the best
    ceil(fraction x kept) of those over the batch. Returns the kept row indices."""
    kept = []
    for g in groups.unique().tolist():
        rows = ((groups == g) & valid.bool()).nonzero().flatten()
        if len(rows):
            kept.append(rows[rewards[rows].argsort(descending=True)[:per_group]])
    if not kept:
        return torch.zeros(0, dtype=torch.long)
    kept = torch.cat(kept)
    count = max(1, -(-int(round(fraction * len(kept) * 1e6)) // 1000000))
    return kept[rewards[kept].argsort(descending=True)[:count]]


def train(config: RAFTConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    schedule = training_schedule(adapter, config.denoising, run.latent_kwargs)
    bar = progress(run, config, f"raft[{config.weighting}]")
    for iteration in bar:
        # training draws (t, noise): independent of the rollout's stream
        generator = iteration_generator(config.run.seed, iteration, accelerator.process_index, "train")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        nfe_start = adapter.nfe
        # 1. sample and score a round
        _, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout, iteration)
        r, valid = scores.total.float().cpu(), scores.valid_mask().cpu()

        # 2. which samples to fit, and how much
        if config.weighting == "top":
            rows = ranked_keep(r, valid, result.prompt_index.cpu(), config.keep_per_prompt, config.keep_fraction)
            weights = torch.ones(len(rows))
        else:
            rows = valid.nonzero().flatten()
            weights = rwr_weights(r[rows], config.temperature)
        latents = result.samples[rows].float()
        row_prompts = [batch_prompts[int(result.prompt_index[i])] for i in rows]

        # 3. the ordinary denoising loss on them, fresh t and noise each update
        stats = TrainLog()
        with run.phase("training"):
            for _ in range(config.updates_per_iteration if len(rows) else 0):
                with run.accumulate():
                    with accelerator.autocast():
                        cond = adapter.encode(row_prompts, guidance_scale=1.0)
                        errors = denoising_errors(adapter, latents, cond, schedule,
                                                  draw_levels(schedule, len(rows), config.denoising, generator),
                                                  torch.randn(latents.shape, generator=generator))
                    loss = weighted_mean(errors, weights.to(errors.device))
                    accelerator.backward(loss)
                    stats.add(loss)
                    stats.record_update(run.optimizer_step())

        # 4. bookkeeping
        metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                 run.gather(scores.valid_mask()))
        metrics.update(stats.metrics())
        metrics.update({"train/kept": float(len(rows)), "train/kept_reward": float(r[rows].mean()) if len(rows) else 0.0})
        end_iteration(run, config, reward, heldout, metrics, adapter.nfe - nfe_start)
    return finish_run(config, run, reward, heldout)


CONFIG = RAFTConfig
