"""Flow-GRPO and its options: Fast / Mix SDE windows, DanceGRPO-style step subsets and shared group
noise, CPS or DanceGRPO kernels, multi-reward mixing, and GRPO-Guard.

One iteration reads top to bottom:
prompts -> rollout (SDE, log-probs recorded) -> decode -> reward -> group advantages ->
for each minibatch, for each trained step: re-score the stored transition with the current weights,
PPO-clip loss + beta * KL to the reference (LoRA off) -> optimizer step.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import torch

from align.config import ConfigError, check_choice
from align.losses import CFG_GRADS, KL_FORMS
from align.runtime import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers.common import (TrainLog, TrainerConfig, check_common, end_iteration, finish_run,
                                   group_batch_advantages, ppo_transition_loss, progress, require_stochastic_kernel,
                                   reward_metrics, sample_and_score, start_run, train_rows)


@dataclass
class FlowGRPOConfig(TrainerConfig):
    trainer: str = "flow_grpo"
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: PPO clip range on the per-step ratio (log-probs are element means, so it is tiny)
    clip_range: float = 1e-4
    #: weight of the KL to the reference policy (LoRA disabled); 0 turns it off
    kl_beta: float = 0.04
    #: KL form: "flow_grpo" (the reference's: std_t without the step's sqrt(-dt), so published
    #: kl_beta values mean what they meant there) or "exact" (the step's Gaussian KL, flow_grpo / (-dt))
    kl_form: str = "flow_grpo"
    #: CFG gradient of a training re-score: "cond_only" (the Flow-GRPO reference detaches the
    #: unconditional branch: g dc) or "full" ((1 - g) du + g dc); the rollout is the same either way
    cfg_grad: str = "cond_only"
    #: advantages (r - prompt mean) / std with the std of the whole gathered batch ("global", as every
    #: paper config of the reference) or of the prompt's group ("group")
    adv_std: str = "global"
    adv_clip: float = 5.0
    #: several rewards: "sum_rewards" (weighted sum, then normalise) or "sum_advantages" (MixGRPO)
    multi_reward: str = "sum_rewards"
    #: the last step's std is tiny (~2e-3): it is not trained unless asked
    train_last_step: bool = False
    #: train a fraction of the trained steps each iteration (DanceGRPO: 0.6)
    timestep_fraction: float = 1.0
    #: which steps timestep_fraction keeps: "shared" (one random subset of round(fraction * T) for
    #: every row, the default: every minibatch trains the same steps), "per_sample" (DanceGRPO's
    #: reference: each row its own random permutation, first int(fraction * T)) or "prefix" (the
    #: first int(fraction * T) steps in order, as the Flow-GRPO reference trains steps 0..8 of 10)
    timestep_selection: str = "shared"
    #: Fast / Mix: an SDE window of this many steps inside an ODE run (null: SDE everywhere)
    window_size: int | None = None
    #: "random" start every iteration (Fast), or "sliding" by one step every window_slide_every (Mix)
    window_mode: str = "random"
    window_slide_every: int = 10
    #: passes over each batch of rollouts
    inner_epochs: int = 1
    #: rollout rows per optimizer step (null: all rows of the iteration, or updates_per_epoch)
    train_batch_size: int | None = None
    #: optimizer updates per pass over the rollouts (the reference makes 2; its SD3.5 recipes here
    #: set it); null: one (train_batch_size rows at a time), which keeps every ratio of the single
    #: pass at exactly 1 so the clip only acts across inner epochs
    updates_per_epoch: int | None = None
    #: GRPO-Guard: per-step log-ratio normalisation and step reweighting
    guard: bool = False


def check_config(config: FlowGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    check_choice("kl_form", config.kl_form, KL_FORMS)
    check_choice("cfg_grad", config.cfg_grad, CFG_GRADS)
    choices = {"adv_std": ("group", "global"), "multi_reward": ("sum_rewards", "sum_advantages"),
               "window_mode": ("random", "sliding"), "timestep_selection": ("shared", "per_sample", "prefix")}
    for key, valid in choices.items():
        if getattr(config, key) not in valid:
            raise ConfigError(f"{key} must be one of {valid}, got {getattr(config, key)!r}")
    if not 0 < config.timestep_fraction <= 1:
        raise ConfigError(f"timestep_fraction must be in (0, 1], got {config.timestep_fraction}")
    if config.window_size is not None and not 1 <= config.window_size < config.rollout.num_steps:
        raise ConfigError(f"window_size must be in 1..{config.rollout.num_steps - 1}, got {config.window_size}")
    if config.updates_per_epoch is not None and config.updates_per_epoch < 1:
        raise ConfigError(f"updates_per_epoch must be >= 1, got {config.updates_per_epoch}")
    if config.updates_per_epoch is not None and config.train_batch_size is not None:
        raise ConfigError("set one of train_batch_size and updates_per_epoch, not both")
    if config.group_size < 2:
        raise ConfigError("group_size must be >= 2: advantages compare samples of one prompt")


def rollout_for_iteration(config: FlowGRPOConfig, iteration: int, rng: random.Random) -> RolloutConfig:
    """The SDE window of this iteration (Fast: random start; Mix: sliding), never on the last step."""
    if config.window_size is None:
        return config.rollout
    starts = config.rollout.num_steps - config.window_size  # windows end before the last step
    if config.window_mode == "random":
        start = rng.randrange(starts)
    else:
        start = (iteration // config.window_slide_every) % starts
    return replace(config.rollout, sde_steps=list(range(start, start + config.window_size)))


def trained_steps(config: FlowGRPOConfig, recorded: list[int], rng: random.Random) -> list[int]:
    """The steps trained this iteration ("shared" and "prefix"; "per_sample": every candidate step,
    each row keeping its own subset, see :func:`per_sample_steps`)."""
    steps = [s for s in recorded if config.train_last_step or s != config.rollout.num_steps - 1]
    if config.timestep_fraction < 1 and steps:
        if config.timestep_selection == "shared":
            steps = sorted(rng.sample(steps, max(1, round(config.timestep_fraction * len(steps)))))
        elif config.timestep_selection == "prefix":
            steps = steps[:max(1, int(config.timestep_fraction * len(steps)))]
    return steps


def per_sample_steps(rows: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """DanceGRPO's selection: (rows, num_steps) bool, row r keeping the first int(fraction * T)
    entries of its own random permutation of the T steps."""
    keep = max(1, int(fraction * num_steps))
    order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(rows)])
    return torch.zeros(rows, num_steps, dtype=torch.bool).scatter_(1, order[:, :keep], True)


def train(config: FlowGRPOConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    bar = progress(run, config, "flow_grpo")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        rollout_config = rollout_for_iteration(config, iteration, rng)

        # 1. sample, decode, score
        cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration)

        # 2. advantages from the global batch (groups = prompts, made unique across processes)
        groups = result.prompt_index + accelerator.process_index * config.prompts_per_iteration
        advantages, keep, named, valid = group_batch_advantages(run, reward, scores, groups, std=config.adv_std,
                                                                clip=config.adv_clip, multi_reward=config.multi_reward)
        advantages = advantages.to(accelerator.device)

        # 3. PPO over the trained steps of the kept rows
        steps = trained_steps(config, [t.step for t in result.main_transitions()], rng)
        transitions = {t.step: t for t in result.main_transitions(steps)}
        stds = torch.stack([transitions[s].std.mean() for s in steps]) if steps else torch.ones(1)
        step_weights = stds**2 / (stds**2).mean() if config.guard else torch.ones_like(stds)
        rows, row_weights = train_rows(run, keep)
        per_sample = config.timestep_selection == "per_sample" and config.timestep_fraction < 1 and steps
        if per_sample:
            step_mask = per_sample_steps(len(keep), len(steps), config.timestep_fraction,
                                         torch.Generator().manual_seed(rng.randrange(2**31)))
            steps_per_row = int(step_mask[0].sum())
        stats = TrainLog()
        with run.phase("training"):
            batch = config.train_batch_size or max(1, len(rows))
            if config.updates_per_epoch:
                batch = max(1, math.ceil(len(rows) / config.updates_per_epoch))
            for _ in range(config.inner_epochs):
                order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(rng.randrange(2**31)))]
                for start in range(0, len(order), batch):
                    with run.accumulate():
                        index = order[start:start + batch]
                        for j, step in enumerate(steps):
                            chosen, scale = index, None
                            if per_sample and row_weights is None:  # each row's own steps, averaged per row
                                chosen, chosen_weights = index[step_mask[index, j]], None
                                if len(chosen) == 0:
                                    continue
                                scale = len(chosen) / (len(index) * steps_per_row)
                            elif per_sample:  # DDP: every process runs every call, unpicked rows weigh 0
                                mask = step_mask[index, j].float().to(row_weights.device)
                                chosen, chosen_weights = index, row_weights[index] * mask
                                rows_in_batch = float(row_weights[index].sum())
                                scale = float(chosen_weights.sum()) / max(rows_in_batch * steps_per_row, 1e-12)
                            else:
                                chosen_weights = None if row_weights is None else row_weights[index]
                            part = transitions[step].subset(chosen)
                            loss, ppo = ppo_transition_loss(run, part, cond, result.schedule, rollout_config,
                                                            advantages[chosen], clip_range=config.clip_range,
                                                            kl_beta=config.kl_beta, kl_form=config.kl_form,
                                                            cfg_grad=config.cfg_grad, guard=config.guard,
                                                            guard_std=run.state.extra.get("guard_std"),
                                                            weights=chosen_weights)
                            if scale is None:
                                accelerator.backward(loss * step_weights[j] / len(steps))
                            else:
                                accelerator.backward(loss * step_weights[j] * scale)
                            stats.add(loss, **ppo)
                        stats.step(run)
        if config.guard and stats.get("log_ratio_std"):
            run.state.extra["guard_std"] = sum(stats["log_ratio_std"]) / len(stats["log_ratio_std"])

        # 4. bookkeeping
        metrics = reward_metrics(named, valid)
        metrics.update({"advantage/mean": float(advantages.mean()),
                        "advantage/abs_mean": float(advantages.abs().mean()),
                        "advantage/kept_fraction": float(keep.float().mean())})
        metrics.update(stats.metrics())
        bar.set_postfix(reward=f"{scores.mean():.3f}")
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = FlowGRPOConfig
