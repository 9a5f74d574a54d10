"""DGPO (Direct Group Preference Optimization): a group-level DPO on deterministic rollouts, with no
policy gradient and no SDE.

One iteration reads top to bottom:
prompts -> clean samples x0 of the current policy with a deterministic solver (ODE by default) ->
decode -> reward -> advantages A (reward minus its prompt's mean, over a std, clipped: their sum over
a group is about 0, so a group splits into a positive and a negative half) -> steps_per_iteration
distinct step indices of the sampler among 0 .. trunc_steps (the high-noise levels; the same for the
whole iteration) -> for each step and each minibatch of whole groups: one noise per group,
x_sigma = (1 - sigma) x0 + sigma eps, target v = eps - x0 -> d = the mean of (v(x_sigma) - v)^2
for theta and for the reference (the base with its LoRA off, or ``reference: ema``, an EMA of theta)
-> the group logit S_g = (beta / G) sum_g A_i (d_theta,i - d_ref,i) and the loss -log sigmoid(-S_g)
(``loss_form``; the reference code's surrogate has the same gradient over beta) + kl_beta
||v_theta - v_ref||^2 -> one optimizer step for all steps and minibatches -> ``reference: ema``: the
reference follows theta, ema <- d ema + (1 - d) theta, d = min(ema_decay_cap, ema_decay_rate * updates).
With ``clip_range`` (the reference's PPO-style clip) a row whose ratio exp(d_ema - d_theta) has moved
past 1 +- c the way its advantage asks stops training; ``ema_rollouts_after`` samples with the EMA
after that many updates (the reference's switch_ema_ref).

Lowering d on a group's good samples and raising it on its bad ones raises the likelihood of the
positive half over the negative half relative to the reference; each group is gated by
sigmoid(S_g), which goes to 0 once the group is ranked right. Training predictions are conditional
only (no CFG), while the rollouts may guide (the reference's mode 1). Flow-matching models only.
NFE counts the sampling, the reference and the old-policy evaluations. ``run.async_rollout`` samples
on Ray workers with the rollout policy of a version at most ``run.max_staleness`` behind (older data:
the loss compares theta with its reference at the samples, not with the sampler; no correction).
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from align.config import ConfigError
from align.errors import check_choice
from align.losses import dgpo_clipped, dgpo_group_logits, dgpo_loss, flow_matching_target
from align.prompts import prompts_for_iteration
from align.sampling.kernels import reduce_elements
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.scoring import (MULTI_REWARD_MODES, conditional_training_cond, group_batch_advantages,
                                    sample_and_score)
from align.trainers.snapshot import SnapshotState, checkpointed_snapshot, growing_decay
from align.training.async_rollout import AsyncRollouts


@dataclass
class DGPOConfig(TrainerConfig):
    trainer: str = "dgpo"
    #: a deterministic solver (the reference: DPM-Solver++ 10 steps, CFG 4.5 on SD3.5-M)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="ode"))
    #: the preference strength beta_dpo on the mean flow-matching error (the reference: 100 GenEval /
    #: OCR, 10 PickScore; calibrated for an error averaged over the latent's elements)
    beta: float = 100.0
    #: "surrogate" (the reference code's: mean_i sg(sigmoid(S_g)) A_i d_theta,i) or "literal" (the mean
    #: over groups of -log sigmoid(-S_g); the same gradient times beta, which changes its balance against kl_beta)
    loss_form: str = "surrogate"
    #: weight of ||v_theta - v_ref||^2 at the same noisy inputs (the reference: 0.02 GenEval / OCR, 0.001 PickScore)
    kl_beta: float = 0.02
    #: distinct sampler steps trained each iteration, the same for every minibatch (the reference: 4)
    steps_per_iteration: int = 4
    #: the trained steps are drawn from 0 .. trunc_steps: the high-noise levels only (the reference: 6 of 10
    #: steps for OCR / PickScore, 4 for GenEval)
    trunc_steps: int = 6
    #: "base" (the frozen model, LoRA off: the reference's default) or "ema" (an EMA of theta, its
    #: use_ema_ref mode, with beta 2000-5000)
    reference: str = "base"
    #: reference: ema: the EMA's decay d = min(ema_decay_cap, ema_decay_rate * updates) (the reference: 0.3, 0.001)
    ema_decay_cap: float = 0.3
    #: d's growth per optimizer update
    ema_decay_rate: float = 0.001
    #: one noise per group and step, shared by its samples (the reference's use_shared_noise)
    shared_noise: bool = True
    #: A = (reward - its prompt's mean) / std, with the std of the whole (gathered) batch ("global": the
    #: reference's OCR / PickScore) or of the prompt's group ("group": its GenEval)
    adv_std: str = "global"
    #: advantages are clipped to +-adv_clip (the reference: 5)
    adv_clip: float = 5.0
    #: several rewards: "sum_rewards" (weighted sum, then normalise), "sum_advantages" or "gdpo"
    multi_reward: str = "sum_rewards"
    #: prompts (whole groups) per minibatch (null: all the iteration's); gradients accumulate into one step
    groups_per_minibatch: int | None = None
    #: the PPO-style clip c against the old policy, a fast EMA of theta (its decay as above): a row whose
    #: likelihood ratio exp(d_old - d_theta) has passed 1 + c (A > 0) or 1 - c (A <= 0) stops training
    #: (the reference's clip_dsm; one more model evaluation per row and step; null: off)
    clip_range: float | None = None
    #: sample the rollouts with that EMA after this many optimizer updates (the reference's switch_ema_ref:
    #: 200 OCR / PickScore, 500 GenEval; null: always theta)
    ema_rollouts_after: int | None = None


def check_config(config: DGPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    check_choice("loss_form", config.loss_form, ("surrogate", "literal"))
    check_choice("reference", config.reference, ("base", "ema"))
    check_choice("adv_std", config.adv_std, ("group", "global"))
    check_choice("multi_reward", config.multi_reward, MULTI_REWARD_MODES)
    if config.beta <= 0 or config.adv_clip <= 0 or config.kl_beta < 0:
        raise ConfigError("beta and adv_clip must be > 0, kl_beta >= 0")
    if config.group_size < 2:
        raise ConfigError("group_size must be >= 2: DGPO compares the samples of a prompt's group")
    if not 0 <= config.trunc_steps < config.rollout.num_steps:
        raise ConfigError(f"trunc_steps must be in 0..{config.rollout.num_steps - 1} (the sampler's steps), "
                          f"got {config.trunc_steps}")
    if not 1 <= config.steps_per_iteration <= config.trunc_steps + 1:
        raise ConfigError(f"steps_per_iteration must be in 1..{config.trunc_steps + 1} (distinct steps of "
                          f"0..trunc_steps), got {config.steps_per_iteration}")
    if not 0 <= config.ema_decay_cap < 1 or config.ema_decay_rate < 0:
        raise ConfigError("ema_decay_cap must be in [0, 1) and ema_decay_rate >= 0")
    if config.groups_per_minibatch is not None and config.groups_per_minibatch < 1:
        raise ConfigError(f"groups_per_minibatch must be >= 1, got {config.groups_per_minibatch}")
    if config.clip_range is not None and config.clip_range <= 0:
        raise ConfigError(f"clip_range must be > 0 (or null: no clip), got {config.clip_range}")
    if config.ema_rollouts_after is not None and config.ema_rollouts_after < 0:
        raise ConfigError(f"ema_rollouts_after must be >= 0 (or null), got {config.ema_rollouts_after}")


def uses_ema(config: DGPOConfig) -> bool:
    """Whether the run keeps the fast EMA of theta: the DPO reference, the clip's old policy or the rollouts'."""
    return config.reference == "ema" or config.clip_range is not None or config.ema_rollouts_after is not None


def step_loss(run, config: DGPOConfig, rows, groups, x0, advantages, cond, sigma: float, timestep: float,
              noise_gen: torch.Generator, reference, old_policy, log):
    """DGPO's loss of the whole groups ``rows`` at one noise level, and the reference (and, with the
    clip, old-policy) evaluations made."""
    adapter, accelerator = run.adapter, run.accelerator
    device = accelerator.device
    batch_groups = groups[rows]
    if config.shared_noise:  # one noise per group, shared by its samples
        ids, inverse = torch.unique(batch_groups, return_inverse=True)
        eps = torch.randn((len(ids), *x0.shape[1:]), generator=noise_gen)[inverse.cpu()].to(device)
    else:
        eps = torch.randn((len(rows), *x0.shape[1:]), generator=noise_gen).to(device)
    s = torch.full((len(rows),), sigma, device=device)
    t = torch.full((len(rows),), timestep, device=device)
    x_sigma, target = flow_matching_target(x0[rows], eps, s)
    row_cond = cond.select(rows)
    with torch.no_grad(), accelerator.autocast(), reference():  # before theta's graph (the EMA swaps weights in)
        v_ref = adapter.predict(x_sigma, t, row_cond).float()
    with accelerator.autocast():
        v_theta = adapter.predict(x_sigma, t, row_cond).float()
    d_theta = reduce_elements((v_theta - target.float()) ** 2)
    d_ref = reduce_elements((v_ref - target.float()) ** 2)
    calls = len(rows)
    if config.clip_range is not None:
        if config.reference == "ema":  # the reference is the old policy itself
            d_old = d_ref
        else:
            with torch.no_grad(), accelerator.autocast(), old_policy():
                d_old = reduce_elements((adapter.predict(x_sigma, t, row_cond).float() - target.float()) ** 2)
            calls += len(rows)
        clipped = dgpo_clipped(d_old, d_theta, advantages[rows], config.clip_range)
        d_theta = torch.where(clipped, d_theta.detach(), d_theta)
        log.add(clipped_fraction=clipped.float().mean())
    loss = dgpo_loss(d_theta, d_ref, advantages[rows], batch_groups, config.beta, config.group_size, config.loss_form)
    if config.kl_beta > 0:
        kl = reduce_elements((v_theta - v_ref) ** 2).mean()
        loss = loss + config.kl_beta * kl
        log.add(kl=kl.detach())
    gate = torch.sigmoid(dgpo_group_logits(d_theta.detach(), d_ref, advantages[rows], batch_groups, config.beta,
                                           config.group_size))
    log.add(loss, gate=gate.mean(), error_gap=(d_theta.detach() - d_ref).mean())
    return loss, calls


def train(config: DGPOConfig, adapter=None) -> dict[str, float]:
    check_config(config, adapter)
    run, reward, heldout, prompts = start_run(config, adapter, SnapshotState())
    adapter, accelerator = run.adapter, run.accelerator
    device = accelerator.device
    ema = checkpointed_snapshot(run)  # the fast EMA of theta: reference: ema, the clip's old policy, EMA rollouts
    reference = ema.swapped if config.reference == "ema" else adapter.disable_adapter

    def batch_prompts_of(iteration: int) -> list:
        return prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                     accelerator.process_index, accelerator.num_processes)

    def rollout_policy():
        """The weights the rollouts sample with: theta, or its EMA after ema_rollouts_after updates."""
        ema_rollouts = config.ema_rollouts_after is not None and run.state.updates >= config.ema_rollouts_after
        return ema.swapped() if ema_rollouts else nullcontext()

    # run.async_rollout: the workers sample with a version's rollout policy (older data: no correction)
    rollouts = (AsyncRollouts(run, config, lambda it: (batch_prompts_of(it), config.rollout),
                              run.state.trainer.rollout_weights, policy=rollout_policy)
                if config.run.async_rollout else None)
    bar = progress(run, config, "dgpo")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}-dgpo")
        noise_gen = torch.Generator().manual_seed(rng.randrange(2**62) + accelerator.process_index)
        batch_prompts = batch_prompts_of(iteration)

        # 1. clean samples of the current policy (or, after ema_rollouts_after updates, of its EMA), decode,
        # score (asynchronous: a worker's batch, sampled at most run.max_staleness versions ago)
        ema_rollouts = config.ema_rollouts_after is not None and run.state.updates >= config.ema_rollouts_after
        if rollouts is not None:
            cond, result, scores, staleness = rollouts.take_scored(iteration, batch_prompts, config.rollout)
        else:
            with rollout_policy():
                cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout,
                                                           iteration)
        if result.schedule.kind != "flow":
            raise ConfigError(f"DGPO trains flow-matching (velocity) models; {adapter.name!r} has a "
                              f"{result.schedule.kind} schedule")

        # 2. advantages over the gathered batch (groups = prompts, unique across processes)
        groups = (result.prompt_index + accelerator.process_index * config.prompts_per_iteration).to(device)
        advantages, _, named, valid = group_batch_advantages(run, reward, scores, groups.cpu(), std=config.adv_std,
                                                             clip=config.adv_clip, multi_reward=config.multi_reward)
        advantages = advantages.to(device)

        # 3. the iteration's trained steps: distinct high-noise steps of the sampler
        steps = rng.sample(range(config.trunc_steps + 1), config.steps_per_iteration)
        levels, timesteps = result.schedule.levels.cpu(), result.schedule.timesteps.cpu()

        # 4. the group preference loss at each step, minibatches of whole groups, one optimizer step
        train_cond = conditional_training_cond(adapter, cond, batch_prompts, config.negative_prompt)
        train_cond = train_cond.select(result.prompt_index)
        x0 = result.samples.float().to(device)
        prompt_ids = list(range(len(batch_prompts)))
        per_minibatch = config.groups_per_minibatch or len(prompt_ids)
        chunks = [prompt_ids[i:i + per_minibatch] for i in range(0, len(prompt_ids), per_minibatch)]
        log = TrainLog("kl", "gate", "error_gap", "clipped_fraction")
        calls = 0
        with run.phase("training"), run.accumulate():
            for step in steps:
                for chunk in chunks:
                    rows = torch.nonzero(torch.isin(result.prompt_index, torch.tensor(chunk))).flatten().to(device)
                    loss, made = step_loss(run, config, rows, groups, x0, advantages, train_cond,
                                           float(levels[step]), float(timesteps[step]), noise_gen, reference,
                                           ema.swapped, log)
                    accelerator.backward(loss / (len(steps) * len(chunks)))
                    calls += made
            log.record_update(run.optimizer_step())

        # 5. the EMA follows theta
        decay = growing_decay(config.ema_decay_cap, config.ema_decay_rate, run.state.updates)
        if uses_ema(config):
            ema.update(decay)

        # 6. bookkeeping (NFE: sampling plus the reference evaluations)
        metrics = reward_metrics(named, valid)
        metrics.update({"advantage/abs_mean": float(advantages.abs().mean()),
                        "dgpo/steps": float(sum(steps) / len(steps))})
        if uses_ema(config):
            metrics.update({"policy/ema_decay": decay, "policy/ema_distance": ema.distance(),
                            "policy/ema_rollouts": float(ema_rollouts)})
        metrics.update(log.metrics())
        if rollouts is not None:
            metrics["train/staleness"] = float(staleness)
        end_iteration(run, config, reward, heldout, metrics, result.nfe + calls)
    if rollouts is not None:
        rollouts.close()
    return finish_run(config, run, reward, heldout)


CONFIG = DGPOConfig
