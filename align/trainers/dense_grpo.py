"""DenseGRPO: a reward for every denoising step.

From each x_t of an SDE trajectory the rollout completes a clean sample by ODE (the branch shares
the step's model evaluation). With c_t = R(ode(x_t)) (c_T = R(final sample)), step t earns the
gain c_{t+1} - c_t; gains are normalised per step (within each prompt's group) and each step's
PPO term uses its own advantage. Optionally each step's noise level is calibrated so the spread of
its gains approaches a common target.

prompts -> rollout (SDE + ODE completions) -> decode all -> reward -> per-step gains ->
per-step advantages -> PPO per step -> (noise calibration)
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from align.advantages import dense_step_gains, per_step_advantages
from align.config import ConfigError, check_choice
from align.prompts import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers import ppo
from align.trainers.checks import check_common, require_stochastic_kernel
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import PPOConfig, PPOTerm, RolloutBatch
from align.trainers.scoring import sample_and_score


@dataclass
class DenseGRPOConfig(TrainerConfig):
    trainer: str = "dense_grpo"
    #: 10 steps of the flow_grpo SDE kernel (any stochastic kernel); the trainer adds an ODE completion
    #: from every step
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: the PPO update (step t's term takes step t's advantage)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    #: normalise each step's gains within the prompt's group ("group") or over the batch ("batch")
    adv_scope: str = "group"
    #: reward-aware calibration of each step's noise level
    calibrate_noise: bool = False
    #: target spread (std) of every step's gains (null: the mean spread over steps)
    calibration_target: float | None = None
    #: exponent of the multiplicative update scale_t *= (target / spread_t) ** rate
    calibration_rate: float = 0.5
    #: [low, high]: each step's calibrated noise multiplier is clamped to this range
    calibration_bounds: list[float] = field(default_factory=lambda: [0.25, 4.0])
    #: rollout rows per optimizer step, each process (null: all rows of the iteration, one update per
    #: ppo.inner_epochs pass)
    train_batch_size: int | None = None


@dataclass
class DenseGRPOState:
    """What a DenseGRPO run carries from iteration to iteration (saved with each checkpoint)."""

    #: each step's noise-level multiplier, calibrated over the run (calibrate_noise); null: not set yet
    noise_scales: list[float] | None = None


def check_config(config: DenseGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    check_choice("adv_scope", config.adv_scope, ("group", "batch"))
    if config.rollout.split_steps or config.rollout.branch_steps:
        raise ConfigError("dense_grpo builds its own ODE branches: leave rollout.split_steps / branch_steps empty")
    if config.group_size < 2 and config.adv_scope == "group":
        raise ConfigError("group_size must be >= 2 with adv_scope=group")


def completion_rewards(result, final: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
    """(B, T + 1) matrix c[b, t] = R(ode(x_t)) of main row b; column T is the final sample."""
    steps = len(result.schedule)
    table = torch.empty(final.shape[0], steps + 1)
    table[:, steps] = final
    table[result.branch_parent, result.branch_origin] = branch
    return table


def gain_spread(gains: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """(T,) population std of each step's gains over its scored entries."""
    valid = torch.ones_like(gains, dtype=torch.bool) if valid is None else valid.bool()
    weight = valid.float()
    count = weight.sum(0).clamp_min(1)
    mean = (gains * weight).sum(0) / count
    return torch.sqrt((weight * (gains - mean) ** 2).sum(0) / count)


def calibrate(scales: list[float], gains: torch.Tensor, config: DenseGRPOConfig,
              valid: torch.Tensor | None = None) -> list[float]:
    """scale_t <- clip(scale_t * (target / spread_t) ** rate): steps whose gains barely differ get
    more noise, steps that dominate get less (spreads over the scored gains)."""
    spread = gain_spread(gains, valid).clamp_min(1e-8)
    target = config.calibration_target if config.calibration_target is not None else float(spread.mean())
    low, high = config.calibration_bounds
    updated = torch.tensor(scales) * (target / spread) ** config.calibration_rate
    return updated.clamp(low, high).tolist()


def train(config: DenseGRPOConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter, DenseGRPOState())  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    num_steps = config.rollout.num_steps
    state = run.state.trainer
    if state.noise_scales is None:  # a fresh run (a resumed one has its calibrated levels)
        state.noise_scales = list(config.rollout.step_noise_scales or [1.0] * num_steps)
    bar = progress(run, config, "dense_grpo")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        rollout_config = replace(config.rollout, branch_steps=list(range(num_steps)), branch_kernel="ode",
                                 step_noise_scales=list(state.noise_scales))

        # 1. SDE trajectories with an ODE completion from every step; score every clean sample
        cond, result, scores, branch_scores = sample_and_score(run, config, reward, batch_prompts, rollout_config,
                                                               iteration, score="both")
        with torch.no_grad():
            table = completion_rewards(result, scores.total.float().cpu(), branch_scores.total.float().cpu())
            scored = completion_rewards(result, scores.valid_mask().float().cpu(),
                                        branch_scores.valid_mask().float().cpu()) > 0

        # 2. per-step gains -> per-step advantages (statistics over the global batch); a gain needs
        # both its completions scored, an unscored one is dropped from its step's group
        gain_valid = run.gather(scored[:, 1:] & scored[:, :-1])
        gains = run.gather(dense_step_gains(table))
        gains = torch.where(gain_valid, gains, torch.zeros_like(gains))
        groups = run.gather(result.prompt_index + accelerator.process_index * config.prompts_per_iteration)
        advantages, _ = per_step_advantages(gains, groups if config.adv_scope == "group" else None,
                                            clip=config.ppo.adv_clip, valid=gain_valid)
        rows = table.shape[0]
        local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
        advantages = advantages[local].to(accelerator.device)

        # 3. PPO: step t's transition is trained with step t's advantage; one optimizer step per minibatch
        steps = ppo.ppo_steps(config.ppo, result.main_transitions(), num_steps, rng)
        transitions = {t.step: t for t in result.main_transitions(steps)}
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        with run.phase("training"):
            batch_size = config.train_batch_size or rows
            for index in ppo.epoch_minibatches(config.ppo.inner_epochs, rows, batch_size, rng):
                terms = [PPOTerm(transitions[s].subset(index), advantages[index, s], 1 / len(steps)) for s in steps]
                with run.accumulate():
                    ppo.ppo_backward(run, terms, batch, config.ppo, log)
                    log.record_update(run.optimizer_step())
        if config.calibrate_noise:
            scales = calibrate([state.noise_scales[s] for s in steps], gains[:, steps], config, gain_valid[:, steps])
            for step, scale in zip(steps, scales):
                state.noise_scales[step] = scale

        metrics = reward_metrics({k: run.gather(v) for k, v in scores.scores.items()},
                                 run.gather(scores.valid_mask()))
        metrics["dense/unscored_gains"] = float((~gain_valid).sum())
        spreads = gain_spread(gains, gain_valid)
        metrics.update({f"dense/gain_std/step{t}": float(spreads[t]) for t in range(num_steps)})
        metrics.update({f"dense/noise_scale/step{t}": s for t, s in enumerate(state.noise_scales)})
        metrics.update(log.metrics())
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = DenseGRPOConfig
