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

from dataclasses import dataclass, field, replace

from align.advantages import group_advantages
from align.config import ConfigError, check_choice
from align.losses import CFG_GRADS, KL_FORMS
from align.runtime import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers.common import (TrainLog, TrainerConfig, check_common, end_iteration, finish_run,
                                   ppo_transition_loss, progress, require_stochastic_kernel, reward_metrics,
                                   sample_and_score, start_run)


@dataclass
class B2DiffuRLConfig(TrainerConfig):
    trainer: str = "b2_diffurl"
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: stochastic copies of each trajectory at the split step
    branch_factor: int = 4
    #: the first split step (null: T - 2) and the last one; it moves back linearly over split_span
    split_start: int | None = None
    split_end: int = 0
    #: iterations over which the split moves (null: iterations)
    split_span: int | None = None
    #: copies with |advantage| (in their trajectory's std) at most this are dropped
    keep_threshold: float = 0.5
    clip_range: float = 0.2
    adv_clip: float = 5.0
    kl_beta: float = 0.0
    kl_form: str = "exact"
    cfg_grad: str = "cond_only"
    train_last_step: bool = False
    inner_epochs: int = 1
    #: trajectories per prompt (each branches into branch_factor copies)
    group_size: int = 2


def check_config(config: B2DiffuRLConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    check_choice("cfg_grad", config.cfg_grad, CFG_GRADS)
    check_choice("kl_form", config.kl_form, KL_FORMS)
    steps = config.rollout.num_steps
    if config.branch_factor < 2:
        raise ConfigError(f"branch_factor must be >= 2 (copies compare with each other), got {config.branch_factor}")
    start = steps - 2 if config.split_start is None else config.split_start
    if not 0 <= config.split_end <= start < steps:
        raise ConfigError(f"need 0 <= split_end <= split_start < rollout.num_steps, got split_end={config.split_end}, "
                          f"split_start={start}")
    if start == steps - 1 and not config.train_last_step:
        raise ConfigError(f"split_start={start} is the last step, which is not trained (train_last_step=false): "
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
        steps = config.rollout.num_steps
        rollout_config = replace(config.rollout, split_steps=[s], branch_factor=config.branch_factor,
                                 sde_steps=list(range(s, steps)))
        # 1. a deterministic prefix, copies from step s, decode, score
        cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration)
        trajectory = result.ancestor(s)  # each copy's trajectory (a row before the split)
        valid = scores.valid_mask().cpu()

        # 2. advantages among a trajectory's copies; keep the ones well above / below its mean
        advantages, kept = group_advantages(scores.total.float().cpu(), trajectory.cpu(), std="group",
                                            clip=config.adv_clip, valid=valid)
        keep = kept & (advantages.abs() > config.keep_threshold)
        rows = keep.nonzero().flatten()
        advantages = advantages.to(accelerator.device)

        # 3. PPO on the steps after the split, on the kept copies
        trained = [t for t in result.main_transitions() if config.train_last_step or t.step != steps - 1]
        stats = TrainLog()
        with run.phase("training"):
            for _ in range(config.inner_epochs if len(rows) and trained else 0):
                with run.accumulate():
                    for transition in trained:
                        part = transition.subset(rows.to(transition.rows.device))
                        loss, ppo = ppo_transition_loss(run, part, cond, result.schedule, rollout_config,
                                                        advantages[rows], clip_range=config.clip_range,
                                                        kl_beta=config.kl_beta, kl_form=config.kl_form,
                                                        cfg_grad=config.cfg_grad)
                        accelerator.backward(loss / len(trained))
                        stats.add(loss, **ppo)
                    stats.step(run)

        # 4. bookkeeping
        metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                 run.gather(scores.valid_mask()))
        metrics.update(stats.metrics())
        metrics.update({"train/split_step": float(s), "advantage/kept_fraction": float(keep.float().mean())})
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = B2DiffuRLConfig
