"""B²-DiffuRL: branch each trajectory into copies at a split step that moves backward over training,
keep the copies well above or below their trajectory's mean, and train PPO only on the steps after
the split.

One iteration reads top to bottom:
prompts -> ``group_size`` trajectories per prompt, deterministic (ODE) up to this iteration's split
step s, where each splits into ``branch_factor`` stochastic copies that run to the end (log-probs
recorded from s on) -> decode -> reward -> advantages within each trajectory's copies -> keep the
copies with |A| > ``keep_threshold`` (well above / below the mean) -> PPO-clip (+ KL) on steps
s .. T - 1 of the kept copies -> optimizer step.

The split step moves from ``split_start`` (a step index; null: T - 2, so only the last steps train
at first) to ``split_end`` (default 0: finally every step) linearly over ``split_span`` iterations
(null: the run's ``iterations``). Works with any stochastic kernel (flow or DDIM), images and videos.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

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
class B2DiffuRLConfig(TrainerConfig):
    trainer: str = "b2_diffurl"
    #: 10 steps, by ODE up to the iteration's split step and by the flow_grpo SDE kernel from it on (any
    #: stochastic kernel: ddim on UNet models)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: stochastic copies of each trajectory at the split step
    branch_factor: int = 4
    #: the first split step (null: T - 2, the last steps train first); it moves back linearly over split_span
    split_start: int | None = None
    #: the last split step, reached after split_span iterations (0: finally every step trains)
    split_end: int = 0
    #: iterations over which the split moves (null: iterations)
    split_span: int | None = None
    #: copies with |advantage| (in their trajectory's std) at most this are dropped
    keep_threshold: float = 0.5
    #: the PPO update: the PPO paper's clip range 0.2, the exact KL form when ppo.kl_beta is set
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(clip_range=0.2, kl_form="exact"))
    #: trajectories per prompt (each branches into branch_factor copies)
    group_size: int = 2


def check_config(config: B2DiffuRLConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    if config.ppo.timestep_fraction < 1:
        raise ConfigError("ppo.timestep_fraction: b2_diffurl trains every step after its split step; leave it 1")
    steps = config.rollout.num_steps
    if config.branch_factor < 2:
        raise ConfigError(f"branch_factor must be >= 2 (copies compare with each other), got {config.branch_factor}")
    start = steps - 2 if config.split_start is None else config.split_start
    if not 0 <= config.split_end <= start < steps:
        raise ConfigError(f"need 0 <= split_end <= split_start < rollout.num_steps, got split_end={config.split_end}, "
                          f"split_start={start}")
    if start == steps - 1 and not config.ppo.train_last_step:
        raise ConfigError(f"split_start={start} is the last step, which is not trained (ppo.train_last_step=false): "
                          f"nothing would train; use at most {steps - 2}")
    if config.keep_threshold < 0:
        raise ConfigError(f"keep_threshold must be >= 0, got {config.keep_threshold}")


def split_step(config: B2DiffuRLConfig, iteration: int) -> int:
    """This iteration's split step: split_start moving linearly back to split_end over split_span."""
    start = config.rollout.num_steps - 2 if config.split_start is None else config.split_start
    span = config.split_span or config.iterations
    progress_ = min(1.0, iteration / max(1, span - 1))
    return round(start - (start - config.split_end) * progress_)


def train(config: B2DiffuRLConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    bar = progress(run, config, "b2_diffurl")
    for iteration in bar:
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        s = split_step(config, iteration)
        num_steps = config.rollout.num_steps
        rollout_config = replace(config.rollout, split_steps=[s], branch_factor=config.branch_factor,
                                 sde_steps=list(range(s, num_steps)))
        # 1. a deterministic prefix, copies from step s, decode, score
        cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration)
        trajectory = result.ancestor(s)  # each copy's trajectory (a row before the split)
        valid = scores.valid_mask().cpu()

        # 2. advantages among a trajectory's copies; keep the ones well above / below its mean
        advantages, kept = group_advantages(scores.total.float().cpu(), trajectory.cpu(), std="group",
                                            clip=config.ppo.adv_clip, valid=valid)
        keep = kept & (advantages.abs() > config.keep_threshold)
        rows = keep.nonzero().flatten()
        advantages = advantages.to(accelerator.device)

        # 3. PPO on the steps after the split, on the kept copies: one update per pass
        # (every step from s on: ppo.timestep_fraction is 1, so the rng draws nothing)
        steps = ppo.ppo_steps(config.ppo, result.main_transitions(), num_steps, random.Random(iteration))
        terms = [PPOTerm(t.subset(rows.to(t.rows.device)), advantages[rows], 1 / len(steps))
                 for t in result.main_transitions(steps)]
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        with run.phase("training"):
            for _ in range(config.ppo.inner_epochs if len(rows) and terms else 0):
                with run.accumulate():
                    ppo.ppo_backward(run, terms, batch, config.ppo, log)
                    log.record_update(run.optimizer_step())

        # 4. bookkeeping
        metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                 run.gather(scores.valid_mask()))
        metrics.update(log.metrics())
        metrics.update({"train/split_step": float(s), "advantage/kept_fraction": float(keep.float().mean())})
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = B2DiffuRLConfig
