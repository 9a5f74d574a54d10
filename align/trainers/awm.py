"""Advantage Weighted Matching (AWM): the pretraining flow-matching loss on the policy's own final
samples, weighted by their advantages (likelihood-free, any solver).

One iteration reads top to bottom:
prompts -> clean samples x0 of the current policy with any solver (ODE by default; no log-probs) ->
decode -> reward -> advantages A (reward minus its prompt's mean, over the batch std, clipped to
+-adv_clip and divided by it: A in [-1, 1]) -> for each minibatch: t_per_sample of the sampler's
noise levels, one from each stratum of its steps 1 .. 0.9 T (the reference's "discrete_wo_init"),
the same for the minibatch's samples, each (sample, level) with fresh noise:
x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 -> per item m = the mean of
(v_theta(x_sigma) - v)^2 -> loss mean A w(sigma) phi(m) (``weighting``; ghuber: sigma m^(1/4) / (1/4))
+ kl_beta ||v_theta - v_ref||^2 (the base: LoRA off) + ema_kl_beta ||v_theta - v_ema||^2 (an EMA of
the weights) -> optimizer step -> the EMA follows theta: ema <- d ema + (1 - d) theta,
d = min(ema_decay_cap, ema_decay_rate * updates).

A > 0 lowers the flow-matching error of a good sample (raises its likelihood), A < 0 raises a bad
one's; A = 0 trains nothing and a uniform A is the plain pretraining loss scaled. Training predictions
are conditional only (no CFG): the trained policy is CFG-free, as the reference's; the sampler may still
guide. Flow-matching models only. NFE counts the sampling and the reference / EMA evaluations.
``run.async_rollout`` samples on Ray workers with weights at most ``run.max_staleness`` versions old
(older data: the loss weighs no sampler likelihood, so there is no correction).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from align.config import ConfigError
from align.errors import check_choice
from align.losses import AWM_WEIGHTINGS, awm_loss, flow_matching_target
from align.prompts import prompts_for_iteration
from align.sampling.kernels import reduce_elements
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import epoch_minibatches
from align.trainers.scoring import (MULTI_REWARD_MODES, conditional_training_cond, group_batch_advantages,
                                    sample_and_score)
from align.trainers.snapshot import SnapshotState, checkpointed_snapshot, growing_decay
from align.training.async_rollout import AsyncRollouts

#: how the re-noising levels are drawn: stratified over the sampler's steps 1 .. t_fraction T
#: ("discrete_wo_init": the reference's GenEval / OCR) or 0 .. t_fraction T ("discrete": its PickScore)
T_DISTRIBUTIONS = ("discrete_wo_init", "discrete")


@dataclass
class AWMConfig(TrainerConfig):
    trainer: str = "awm"
    #: any solver; the reference samples without CFG (guidance 1), an SDE-flavoured SA-Solver for
    #: GenEval / OCR and a pure ODE for PickScore
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="ode",
                                                                         guidance_scale=1.0))
    #: re-noising levels per sample, each a separate model call in the same optimizer step (the reference: 6)
    t_per_sample: int = 6
    #: "discrete_wo_init" (one level from each of t_per_sample strata of the sampler's steps 1 .. t_fraction T,
    #: the reference's GenEval / OCR) or "discrete" (steps 0 .. t_fraction T, its PickScore)
    t_distribution: str = "discrete_wo_init"
    #: the strata end before step int(t_fraction T): the low-noise tail is never trained (the reference: 0.9)
    t_fraction: float = 0.9
    #: w(sigma) phi(m) of a sample's error m: "ghuber" (sigma ((m + 1e-10)^p - 1e-10^p) / p, the
    #: reference's), "uniform" (m), "t" (sigma m), "t2" (sigma^2 m), "huber" (sigma sqrt(m))
    weighting: str = "ghuber"
    #: ghuber's power p (the reference: 0.25)
    ghuber_power: float = 0.25
    #: A = (reward - its prompt's mean) / std, with the std of the whole (gathered) batch ("global", the
    #: reference's) or of the prompt's group ("group")
    adv_std: str = "global"
    #: advantages are clipped to +-adv_clip, then divided by it (A in [-1, 1], the scale the KL betas assume)
    adv_clip: float = 5.0
    #: several rewards: "sum_rewards" (weighted sum, then normalise), "sum_advantages" or "gdpo"
    multi_reward: str = "sum_rewards"
    #: weight of ||v_theta - v_ref||^2 to the base model (LoRA off; the reference: 1e-3 GenEval, 3e-3 OCR,
    #: 1e-4 PickScore); 0 turns it off
    kl_beta: float = 0.001
    #: weight of ||v_theta - v_ema||^2 to an EMA of the trained weights (the reference's TRPO-like 1); 0 turns it off
    ema_kl_beta: float = 1.0
    #: the EMA's decay d = min(ema_decay_cap, ema_decay_rate * updates) (the reference: 0.3 and 0.001)
    ema_decay_cap: float = 0.3
    #: d's growth per optimizer update
    ema_decay_rate: float = 0.001
    #: samples per optimizer step (null: all samples of the iteration, one step: the reference's)
    train_batch_size: int | None = None


def check_config(config: AWMConfig, adapter=None) -> None:
    check_common(config, adapter)
    check_choice("t_distribution", config.t_distribution, T_DISTRIBUTIONS)
    check_choice("weighting", config.weighting, AWM_WEIGHTINGS)
    check_choice("adv_std", config.adv_std, ("group", "global"))
    check_choice("multi_reward", config.multi_reward, MULTI_REWARD_MODES)
    if config.t_per_sample < 1:
        raise ConfigError(f"t_per_sample must be >= 1, got {config.t_per_sample}")
    level_steps(config)  # enough sampler steps for the strata
    if config.ghuber_power <= 0 or config.adv_clip <= 0:
        raise ConfigError("ghuber_power and adv_clip must be > 0")
    if config.kl_beta < 0 or config.ema_kl_beta < 0:
        raise ConfigError("kl_beta and ema_kl_beta must be >= 0")
    if not 0 <= config.ema_decay_cap < 1 or config.ema_decay_rate < 0:
        raise ConfigError("ema_decay_cap must be in [0, 1) and ema_decay_rate >= 0")
    if config.train_batch_size is not None and config.train_batch_size < 1:
        raise ConfigError(f"train_batch_size must be >= 1, got {config.train_batch_size}")
    if config.group_size < 2 and config.adv_std == "group":
        raise ConfigError("group_size must be >= 2 with adv_std 'group': advantages compare samples of one prompt")


# --- the pieces, as small functions ----------------------------------------------------------------


def level_steps(config: AWMConfig) -> range:
    """The sampler steps the strata cover: 1 (or 0) .. int(t_fraction * num_steps), the end excluded."""
    start = 1 if config.t_distribution == "discrete_wo_init" else 0
    steps = range(start, int(config.t_fraction * config.rollout.num_steps))
    if len(steps) < config.t_per_sample:
        raise ConfigError(f"t_per_sample {config.t_per_sample} is more than the {len(steps)} sampler steps "
                          f"{start}..{steps.stop - 1} of t_distribution {config.t_distribution!r} "
                          f"(t_fraction {config.t_fraction} of {config.rollout.num_steps} steps)")
    return steps


def stratified_steps(steps: range, count: int, generator: torch.Generator) -> Tensor:
    """One step drawn uniformly from each of ``count`` contiguous strata of ``steps``, the smaller
    strata first (11 steps in 6 strata: {1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}, {10, 11})."""
    base, extra = divmod(len(steps), count)
    sizes = [base + (1 if i >= count - extra else 0) for i in range(count)]
    starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
    offsets = (torch.rand(count, generator=generator) * torch.tensor(sizes)).long()
    return torch.tensor([steps[int(s + o)] for s, o in zip(starts, offsets)])


# --- the loop --------------------------------------------------------------------------------------


def minibatch_loss(run, config: AWMConfig, samples: Tensor, x0: Tensor, advantages: Tensor, cond, schedule,
                   steps: Tensor, noise_gen: torch.Generator, ema, log) -> tuple[Tensor, int]:
    """The AWM loss of a minibatch of samples, each re-noised at every level of ``steps``; returns it
    and the model evaluations made without gradients (reference, EMA)."""
    adapter, accelerator = run.adapter, run.accelerator
    device = accelerator.device
    count = len(steps)
    items = samples.repeat_interleave(count)
    sigma = schedule.levels.cpu()[steps].float().repeat(len(samples)).to(device)
    timesteps = schedule.timesteps.cpu()[steps].float().repeat(len(samples)).to(device)
    eps = torch.randn((len(items), *x0.shape[1:]), generator=noise_gen).to(device)
    x_sigma, target = flow_matching_target(x0[items], eps, sigma)
    item_cond = cond.select(items)
    # the reference and EMA predictions first: swapping the EMA's weights in must not touch a graph
    v_ref = v_ema = None
    with torch.no_grad(), accelerator.autocast():
        if config.kl_beta > 0:
            with adapter.disable_adapter():
                v_ref = adapter.predict(x_sigma, timesteps, item_cond).float()
        if config.ema_kl_beta > 0:
            with ema.swapped():
                v_ema = adapter.predict(x_sigma, timesteps, item_cond).float()
    with accelerator.autocast():
        v_theta = adapter.predict(x_sigma, timesteps, item_cond).float()
    mse = reduce_elements((v_theta - target.float()) ** 2)
    loss = awm_loss(mse, sigma, advantages[items], config.weighting, config.ghuber_power)
    extra_calls = 0
    if v_ref is not None:
        kl = reduce_elements((v_theta - v_ref) ** 2).mean()
        loss, extra_calls = loss + config.kl_beta * kl, extra_calls + len(items)
        log.add(kl=kl.detach())
    if v_ema is not None:
        ema_kl = reduce_elements((v_theta - v_ema) ** 2).mean()
        loss, extra_calls = loss + config.ema_kl_beta * ema_kl, extra_calls + len(items)
        log.add(ema_kl=ema_kl.detach())
    log.add(loss, fm_error=mse.detach().mean(), sigma=sigma.mean())
    return loss, extra_calls


def train(config: AWMConfig, adapter=None) -> dict[str, float]:
    check_config(config, adapter)
    run, reward, heldout, prompts = start_run(config, adapter, SnapshotState())
    adapter, accelerator = run.adapter, run.accelerator
    device = accelerator.device
    ema = checkpointed_snapshot(run)  # the EMA of the trained weights (ema_kl_beta's policy)
    steps_range = level_steps(config)

    def batch_prompts_of(iteration: int) -> list:
        return prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                     accelerator.process_index, accelerator.num_processes)

    # run.async_rollout: the workers sample with the trained weights of a version (older data: no correction)
    rollouts = (AsyncRollouts(run, config, lambda it: (batch_prompts_of(it), config.rollout),
                              run.state.trainer.rollout_weights) if config.run.async_rollout else None)
    bar = progress(run, config, "awm")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}-awm")
        noise_gen = torch.Generator().manual_seed(rng.randrange(2**62) + accelerator.process_index)
        batch_prompts = batch_prompts_of(iteration)

        # 1. clean samples of the current policy, decode, score (asynchronous: a worker's batch, sampled at
        # most run.max_staleness versions ago)
        if rollouts is not None:
            cond, result, scores, staleness = rollouts.take_scored(iteration, batch_prompts, config.rollout)
        else:
            cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout, iteration)
        if result.schedule.kind != "flow":
            raise ConfigError(f"AWM trains flow-matching (velocity) models; {adapter.name!r} has a "
                              f"{result.schedule.kind} schedule (use ddpo for UNet models)")

        # 2. advantages over the gathered batch, clipped and scaled into [-1, 1]
        groups = result.prompt_index + accelerator.process_index * config.prompts_per_iteration
        advantages, _, named, valid = group_batch_advantages(run, reward, scores, groups, std=config.adv_std,
                                                             clip=config.adv_clip, multi_reward=config.multi_reward)
        advantages = (advantages / config.adv_clip).to(device)
        rows = len(advantages)

        # 3. the weighted flow-matching loss on the re-noised final samples (conditional predictions)
        train_cond = conditional_training_cond(adapter, cond, batch_prompts, config.negative_prompt)
        train_cond = train_cond.select(result.prompt_index)
        x0 = result.samples.float().to(device)
        log = TrainLog("kl", "ema_kl", "fm_error", "sigma")
        extra_nfe = 0
        with run.phase("training"):
            for samples in epoch_minibatches(1, rows, config.train_batch_size or rows, rng):
                steps = stratified_steps(steps_range, config.t_per_sample, noise_gen)
                with run.accumulate():
                    loss, calls = minibatch_loss(run, config, samples, x0, advantages, train_cond, result.schedule,
                                                 steps, noise_gen, ema, log)
                    accelerator.backward(loss)
                    log.record_update(run.optimizer_step())
                extra_nfe += calls

        # 4. the EMA follows theta
        decay = growing_decay(config.ema_decay_cap, config.ema_decay_rate, run.state.updates)
        ema.update(decay)

        # 5. bookkeeping (NFE: sampling plus the reference and EMA evaluations)
        metrics = reward_metrics(named, valid)
        metrics.update({"advantage/abs_mean": float(advantages.abs().mean()), "policy/ema_decay": decay,
                        "policy/ema_distance": ema.distance()})
        metrics.update(log.metrics())
        if rollouts is not None:
            metrics["train/staleness"] = float(staleness)
        end_iteration(run, config, reward, heldout, metrics, result.nfe + extra_nfe)
    if rollouts is not None:
        rollouts.close()
    return finish_run(config, run, reward, heldout)


CONFIG = AWMConfig
