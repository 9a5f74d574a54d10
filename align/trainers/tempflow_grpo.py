"""TempFlow-GRPO: credit for each step through branches of one ODE trajectory.

The main trajectory is deterministic (ODE). At each branch step t it spawns k stochastic (SDE)
children, each completed to a clean sample by ODE and scored; a child's advantage compares it with
its k - 1 siblings (same trajectory, same step), so the reward difference is caused by step t alone.
The loss of step t is weighted by its noise level (std_t / mean std), so high-noise steps, which
decide the layout, are not drowned by the many low-noise ones.

prompts -> ODE trajectory + k SDE children per branch step -> ODE completions -> reward ->
per-(step, sibling group) advantages -> noise-weighted PPO on the children's first step
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from align.advantages import group_advantages
from align.config import ConfigError, check_choice
from align.losses import CFG_GRADS, KL_FORMS
from align.runtime import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers.common import (TrainLog, TrainerConfig, check_common, end_iteration, finish_run,
                                   ppo_transition_loss, progress, require_stochastic_kernel, reward_metrics,
                                   sample_and_score, start_run, train_rows)


@dataclass
class TempFlowGRPOConfig(TrainerConfig):
    trainer: str = "tempflow_grpo"
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: stochastic children per branch step
    branches_per_step: int = 4
    #: steps that spawn children (null: all but the last)
    branch_steps: list[int] | None = None
    #: branch from a random subset of this many of those steps each iteration (null: all)
    steps_per_iteration: int | None = 3
    #: weight each step's loss by its noise level
    noise_weighting: bool = True
    #: main trajectories per prompt
    group_size: int = 1
    clip_range: float = 1e-4
    kl_beta: float = 0.0
    #: KL form: "flow_grpo" (the reference's: std_t without the step's sqrt(-dt), so published
    #: kl_beta values mean what they meant there) or "exact" (the step's Gaussian KL, flow_grpo / (-dt))
    kl_form: str = "flow_grpo"
    #: CFG gradient of a training re-score: "cond_only" (the Flow-GRPO reference detaches the
    #: unconditional branch: g dc) or "full" ((1 - g) du + g dc); the rollout is the same either way
    cfg_grad: str = "cond_only"
    adv_clip: float = 5.0


def check_config(config: TempFlowGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    check_choice("kl_form", config.kl_form, KL_FORMS)
    check_choice("cfg_grad", config.cfg_grad, CFG_GRADS)
    if config.branches_per_step < 2:
        raise ConfigError("branches_per_step must be >= 2: siblings are compared with each other")
    bad = [s for s in config.branch_steps or [] if not 0 <= s < config.rollout.num_steps]
    if bad:
        raise ConfigError(f"branch_steps has step {bad[0]} outside 0..{config.rollout.num_steps - 1}")


def branch_steps_for_iteration(config: TempFlowGRPOConfig, rng: random.Random) -> list[int]:
    steps = config.branch_steps if config.branch_steps is not None else list(range(config.rollout.num_steps - 1))
    if config.steps_per_iteration and config.steps_per_iteration < len(steps):
        steps = sorted(rng.sample(steps, config.steps_per_iteration))
    return steps


def train(config: TempFlowGRPOConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    bar = progress(run, config, "tempflow_grpo")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        steps = branch_steps_for_iteration(config, rng)
        rollout_config = replace(config.rollout, sde_steps=[], branch_steps=steps, branch_kernel="sde",
                                 branches_per_step=config.branches_per_step)

        # 1. one ODE trajectory per row; k SDE children at each branch step, completed by ODE
        cond, result, _, scores = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration,
                                                   score="branches")

        # 2. siblings = children of one main row at one step
        rows = len(result.branch_origin)
        main_rows = result.samples.shape[0]
        sibling_group = (result.branch_parent + accelerator.process_index * main_rows) * len(result.schedule) \
            + result.branch_origin
        valid = run.gather(scores.valid_mask())  # an unscored child is dropped from its siblings
        advantages, keep = group_advantages(run.gather(scores.total.float()), run.gather(sibling_group),
                                            clip=config.adv_clip, valid=valid)
        local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
        advantages, keep = advantages[local].to(accelerator.device), keep[local]

        # 3. PPO on each child's stochastic step, weighted by the step's noise level
        branch_transitions = [t for t in result.transitions if t.branch]
        stds = torch.stack([t.std.mean() for t in branch_transitions])
        weights = stds / stds.mean() if config.noise_weighting else torch.ones_like(stds)
        stats = TrainLog()
        with run.phase("training"):
            with run.accumulate():
                for transition, weight in zip(branch_transitions, weights):
                    index, row_weights = train_rows(run, keep[transition.rows])
                    if len(index) == 0:
                        continue
                    part = transition.subset(index)
                    loss, ppo = ppo_transition_loss(run, part, cond, result.schedule, rollout_config,
                                                    advantages[part.rows], clip_range=config.clip_range,
                                                    kl_beta=config.kl_beta, kl_form=config.kl_form,
                                                    cfg_grad=config.cfg_grad,
                                                    weights=None if row_weights is None else row_weights[index])
                    accelerator.backward(loss * weight / len(branch_transitions))
                    stats.add(loss, **ppo)
                stats.step(run)

        metrics = reward_metrics({k: run.gather(v) for k, v in scores.scores.items()}, valid)
        metrics.update({"advantage/kept_fraction": float(keep.float().mean())})
        metrics.update(stats.metrics())
        bar.set_postfix(reward=f"{scores.mean():.3f}")
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = TempFlowGRPOConfig
