"""PRDP: proximal reward-difference prediction, a regression of reward differences on log-ratio
differences over pairs of trajectories of one prompt.

One iteration reads top to bottom:
prompts -> ``group_size`` stochastic rollouts per prompt from the sampling snapshot (log-probs
recorded) -> decode -> reward r -> pairs (rows 2k, 2k + 1 of each prompt) -> per trained step j:
l_j = log pi_theta - log pi_ref (pi_ref: the base model, LoRA off), with pi_theta's per-step
log-ratio to the sampling snapshot clipped to [-clip_range, clip_range] (the proximal update) ->
rhat = sum_j l_j -> loss = (rhat_a - rhat_b - (r_a - r_b) / beta)^2 -> optimizer step; the
snapshot catches up with the trained weights every ``snapshot_every`` updates.

The loss's gradient 2 (residual) d(rhat_a - rhat_b) is taken step by step: a first pass without
gradients gives each pair's residual, a second pass back-propagates residual x l_j one step at a
time, so memory stays that of one step; the reference log-probs are computed once per iteration. The optimum is the KL-regularised pi* ~ pi_ref exp(r / beta).

Features and their fields: the step kernel (``rollout.kernel``), ``beta``, ``clip_range``,
``snapshot_every``, ``train_last_step``, ``inner_epochs``. Images and videos.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from align.config import ConfigError, check_choice
from align.losses import CFG_GRADS, prdp_loss, proximal_log_ratio
from align.prompts import prompts_for_iteration
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common, require_trained_steps
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.scoring import sample_and_score
from align.trainers.snapshot import SnapshotState, checkpointed_snapshot


@dataclass
class PRDPConfig(TrainerConfig):
    trainer: str = "prdp"
    #: 10 steps of the flow_grpo SDE kernel, whose recorded log-probs the loss needs (any stochastic
    #: kernel: ddim on UNet models)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: CFG gradient of a training re-score: "cond_only" (the unconditional branch detached, as the Flow-GRPO
    #: reference) or "full"
    cfg_grad: str = "cond_only"
    #: the KL strength: reward differences are matched as (r_a - r_b) / beta
    beta: float = 1.0
    #: proximal clip of each step's log-ratio to the sampling snapshot
    clip_range: float = 0.01
    #: optimizer updates per iteration, each over all pairs (residuals recomputed before each)
    inner_epochs: int = 1
    #: train the last sampling step (its flow std is tiny, ~2e-3, so it is left out by default)
    train_last_step: bool = False
    #: trajectories per prompt (even: consecutive rows form pairs)
    group_size: int = 2
    #: optimizer updates between refreshes of the sampling snapshot
    snapshot_every: int = 1


def check_config(config: PRDPConfig, adapter=None) -> None:
    check_common(config, adapter)
    if config.group_size < 2 or config.group_size % 2:
        raise ConfigError(f"group_size must be even and >= 2 (pairs of one prompt), got {config.group_size}")
    check_choice("cfg_grad", config.cfg_grad, CFG_GRADS)
    require_trained_steps(config.rollout, config.train_last_step)


def reference_log_probs(run, part, cond, schedule, rollout_config):
    """log pi_ref of one step's rows (the base model, LoRA off): fixed for the whole iteration."""
    adapter = run.adapter
    with torch.no_grad(), adapter.disable_adapter(), run.accelerator.autocast():
        return rescore(adapter, part, cond, schedule, rollout_config).log_prob


def step_log_ratios(run, config, part, ref, cond, schedule, rollout_config, grad: bool):
    """l_j per row of one step: log pi_theta - log pi_ref (``ref``), pi_theta's log-ratio to the
    sampling snapshot (the recorded log-prob) clipped to +-clip_range."""
    with torch.set_grad_enabled(grad), run.accelerator.autocast():
        new = rescore(run.adapter, part, cond, schedule, rollout_config, cfg_grad=config.cfg_grad).log_prob
    return proximal_log_ratio(new, part.log_prob.to(new.device), ref.to(new.device), config.clip_range)


def train(config: PRDPConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter, SnapshotState())  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    snapshot = checkpointed_snapshot(run)  # the sampling policy, refreshed every snapshot_every updates
    bar = progress(run, config, "prdp")
    for iteration in bar:
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        # 1. trajectories from the sampling snapshot, scored; pairs of one prompt
        with snapshot.swapped():
            cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout, iteration)
        r, valid = scores.total.float().cpu(), scores.valid_mask().cpu()
        a, b = torch.arange(0, len(r), 2), torch.arange(1, len(r), 2)
        keep = valid[a] & valid[b]
        a, b = a[keep], b[keep]
        target = (r[a] - r[b]) / config.beta
        transitions = [t for t in result.main_transitions()
                       if config.train_last_step or t.step != config.rollout.num_steps - 1]

        # 2. residuals without gradients, then residual x l_j back-propagated step by step
        stats = TrainLog("residual_abs")
        rows = torch.cat([a, b])
        n = len(a)
        with run.phase("training"):
            parts = [t.subset(rows) for t in transitions]
            refs = [reference_log_probs(run, part, cond, result.schedule, config.rollout) for part in parts] if n else []
            for _ in range(config.inner_epochs if n else 0):
                with torch.no_grad():
                    rhat = sum(step_log_ratios(run, config, part, ref, cond, result.schedule, config.rollout,
                                               grad=False) for part, ref in zip(parts, refs)).cpu()
                residual = rhat[:n] - rhat[n:] - target
                loss = prdp_loss(rhat[:n], rhat[n:], r[a], r[b], config.beta).mean()
                with run.accumulate():
                    coefficient = (2 * residual / n).to(accelerator.device)
                    for part, ref in zip(parts, refs):
                        l_j = step_log_ratios(run, config, part, ref, cond, result.schedule, config.rollout, grad=True)
                        term = (coefficient * (l_j[:n] - l_j[n:])).sum()
                        if term.requires_grad:
                            accelerator.backward(term)
                    stats.add(loss, residual_abs=residual.abs().mean())
                    stats.record_update(run.optimizer_step())
                if stats.updates and run.state.updates % config.snapshot_every == 0:
                    snapshot.update(0.0)

        # 3. bookkeeping
        metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                 run.gather(scores.valid_mask()))
        metrics.update(stats.metrics())
        metrics["train/pairs"] = float(n)
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = PRDPConfig
