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
from align.config import ConfigError
from align.prompts import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers import ppo
from align.trainers.checks import check_common, require_stochastic_kernel
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import PPOConfig, PPOTerm, RolloutBatch
from align.trainers.scoring import sample_and_score


@dataclass
class TempFlowGRPOConfig(TrainerConfig):
    trainer: str = "tempflow_grpo"
    #: 10 steps; the main trajectories run by ODE, the kernel (flow_grpo: any stochastic one) draws the
    #: children at the branch steps
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
    #: the PPO update (each child's one stochastic step is trained; the ppo block's step selection
    #: does not apply: steps_per_iteration draws the branch steps)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def check_config(config: TempFlowGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    if config.ppo.timestep_fraction < 1 or config.ppo.train_last_step:
        raise ConfigError("ppo.timestep_fraction / ppo.train_last_step: tempflow_grpo trains the branch steps it "
                          "draws (branch_steps, steps_per_iteration); leave them at 1 / false")
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
                                            clip=config.ppo.adv_clip, valid=valid)
        local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
        advantages, keep = advantages[local].to(accelerator.device), keep[local]

        # 3. PPO on each child's stochastic step, weighted by the step's noise level: one update per pass
        branch_transitions = [t for t in result.transitions if t.branch]
        stds = torch.stack([t.std.mean() for t in branch_transitions])
        weights = stds / stds.mean() if config.noise_weighting else torch.ones_like(stds)
        terms = []
        for transition, weight in zip(branch_transitions, weights):
            index, row_weights = ppo.train_rows(run, keep[transition.rows])
            if len(index):
                part = transition.subset(index)
                terms.append(PPOTerm(part, advantages[part.rows], weight / len(branch_transitions),
                                     None if row_weights is None else row_weights[index]))
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        with run.phase("training"):
            for _ in range(config.ppo.inner_epochs):
                with run.accumulate():
                    ppo.ppo_backward(run, terms, batch, config.ppo, log)
                    log.record_update(run.optimizer_step())

        metrics = reward_metrics({k: run.gather(v) for k, v in scores.scores.items()}, valid)
        metrics.update({"advantage/kept_fraction": float(keep.float().mean())})
        metrics.update(log.metrics())
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = TempFlowGRPOConfig
