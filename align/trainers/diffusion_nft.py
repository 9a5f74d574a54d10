"""DiffusionNFT: online reinforcement on the forward process (likelihood-free, any solver).

One iteration reads top to bottom:
prompts -> clean samples x0 from the sampling policy (the "old" weights, an EMA of the trained
ones) with any solver (ODE by default; no log-probs) -> decode -> reward -> advantages A (reward
minus its prompt's mean, over a std) -> optimality r = clip(A / adv_clip, -1, 1) / 2 + 1/2 ->
re-noise every sample at ``t_per_sample`` levels t (by default, as the reference: the sampler's own
levels in a random order per sample, 9 of 10) with fresh noise: x_t = (1 - t) x0 + t eps, target
v = eps - x0 -> v_old(x_t, t) with the old weights, no gradient -> for each minibatch: v_theta(x_t, t)
and the implicit policies v+ = (1 - beta) v_old + beta v_theta, v- = (1 + beta) v_old - beta v_theta,
loss r ||v+ - v||^2 + (1 - r) ||v- - v||^2 (by default in the reference's adaptive x0-space form,
scaled by adv_clip / beta) + kl_beta ||v_theta - v_ref||^2 -> optimizer step -> the old weights
follow theta: old <- d old + (1 - d) theta, with d = min(policy_ema_decay, policy_ema_rate * updates).

High-reward samples (r > 1/2) pull v_theta towards their flow-matching target, low-reward ones push
it away, and r = 1/2 (also every sample of a prompt whose rewards are all equal) only ties v_theta to
v_old. Training predictions are conditional only (no CFG): the trained policy is CFG-free, as in the
paper. The sampler may still use CFG (``rollout.guidance_scale``) or an SDE kernel: the loss needs
clean samples only. Flow-matching models only (velocity prediction). The "old" policy is the EMA
copy of the trainable (LoRA) weights, not the LoRA-off model, which only serves the optional
``kl_beta`` term. NFE counts the sampling and the v_old evaluations. ``run.async_rollout`` samples
on Ray workers with the old policy of a version at most ``run.max_staleness`` behind (older data: the
loss needs no likelihood of the sampler, so there is no correction; align/training/async_rollout.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch import Tensor

from align.config import ConfigError
from align.losses import flow_matching_target, nft_loss, weighted_mean
from align.prompts import prompts_for_iteration
from align.sampling.kernels import reduce_elements
from align.sampling.rollout import RolloutConfig, predict_in_chunks
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import epoch_minibatches
from align.trainers.scoring import (MULTI_REWARD_MODES, conditional_training_cond, group_batch_advantages,
                                    sample_and_score)
from align.trainers.snapshot import SnapshotState, checkpointed_snapshot
from align.training.async_rollout import AsyncRollouts


@dataclass
class DiffusionNFTConfig(TrainerConfig):
    trainer: str = "diffusion_nft"
    #: any solver; the reference samples with DPM-Solver++ (2M), 10 steps, without CFG (guidance 1)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="dpm_solver",
                                                                         guidance_scale=1.0))
    #: strength of the implicit policies v+- = v_old +- beta (v_theta - v_old) (paper: 1, 0.1 for some rewards)
    beta: float = 1.0
    #: re-noising draws of t per sample, each with fresh noise and a separate model call, all in the
    #: same optimizer step (null: all the sampler's levels but one with "schedule_permutation", as
    #: the reference trains 9 of 10; 1 otherwise)
    t_per_sample: int | None = None
    #: "schedule_permutation" (the reference: each sample at the sampler's own levels, in a random
    #: order of its own, the first t_per_sample of them), "schedule" (a sampler level drawn at random
    #: with replacement), "uniform" on [t_min, t_max] or "logit_normal" (sigmoid of
    #: N(logit_mean, logit_std), clamped to [t_min, t_max])
    t_distribution: str = "schedule_permutation"
    #: the lowest re-noising level t (0: clean): uniform draws lie in [t_min, t_max], logit_normal ones are
    #: clamped to it, the schedule modes keep only the sampler levels in it
    t_min: float = 0.0
    #: the highest re-noising level t (1: pure noise), the upper end of that range
    t_max: float = 1.0
    #: logit_normal: the mean of the normal whose sigmoid is t (0: centred on t = 0.5)
    logit_mean: float = 0.0
    #: logit_normal: the std of that normal (1: SD3's logit-normal(0, 1) with logit_mean 0)
    logit_std: float = 1.0
    #: A = (reward - its prompt's mean) / std, with the std of the whole (gathered) batch ("global",
    #: the paper's Z) or of the prompt's group ("group"). With a saturating reward (most samples near
    #: the top) "group" blows tiny differences up to full-size advantages: on the toy digit reward it
    #: left the reward flat or lower in 10 iterations (3 seeds), "global" raised it in all 5
    adv_std: str = "global"
    #: advantages are clipped to +-adv_clip and mapped to r = clip(A / adv_clip, -1, 1) / 2 + 1/2
    adv_clip: float = 5.0
    #: several rewards: "sum_rewards" (weighted sum, then normalise), "sum_advantages" or "gdpo" (each
    #: reward normalised within its group, the weighted sum again over the batch)
    multi_reward: str = "sum_rewards"
    #: the sampling ("old") policy follows theta after each iteration, old <- d old + (1 - d) theta: the cap
    #: of the decay d (0.5: the reference's; with a null policy_ema_rate, d itself; 0: old = theta)
    policy_ema_decay: float = 0.5
    #: d's growth per optimizer update: d = min(policy_ema_decay, policy_ema_rate * u) after u updates (counted
    #: as the reference, this iteration's included; 0.001: the reference's); null: d = policy_ema_decay
    policy_ema_rate: float | None = 0.001
    #: "linear" (d as above from the first update) or "flat_warmup" (d = 0 for policy_ema_warmup updates, then
    #: min(decay, rate * (u - warmup)): the reference's OCR schedule, rate 0.0075, decay 0.999, warm-up 75)
    policy_ema_schedule: str = "linear"
    #: "flat_warmup": the optimizer updates during which d = 0 (old = theta) before d grows (the reference's OCR: 75)
    policy_ema_warmup: int = 75
    #: "adaptive" (the reference): each term in x0 space, t^2 ||v± - v||^2, divided by its own
    #: detached mean |t (v± - v)|, the sum scaled by adv_clip / beta; "velocity": the plain loss above
    loss_weighting: str = "adaptive"
    #: weight of ||v_theta - v_ref||^2 to the reference policy (LoRA disabled; the reference always
    #: adds 1e-4); 0 turns it off
    kl_beta: float = 1e-4
    #: passes over each batch of samples
    inner_epochs: int = 1
    #: samples per optimizer step (null: all samples of the iteration)
    train_batch_size: int | None = None


def check_config(config: DiffusionNFTConfig, adapter=None) -> None:
    check_common(config, adapter)
    choices = {"adv_std": ("group", "global"), "multi_reward": MULTI_REWARD_MODES,
               "t_distribution": ("uniform", "logit_normal", "schedule", "schedule_permutation"),
               "loss_weighting": ("velocity", "adaptive"), "policy_ema_schedule": ("linear", "flat_warmup")}
    for key, valid in choices.items():
        if getattr(config, key) not in valid:
            raise ConfigError(f"{key} must be one of {valid}, got {getattr(config, key)!r}")
    if config.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {config.beta}")
    if (config.t_per_sample is not None and config.t_per_sample < 1) or config.inner_epochs < 1:
        raise ConfigError("t_per_sample and inner_epochs must be >= 1")
    if config.t_distribution == "schedule_permutation" and (config.t_per_sample or 1) > config.rollout.num_steps:
        raise ConfigError(f"t_per_sample {config.t_per_sample} is more than the sampler's {config.rollout.num_steps} "
                          f"levels (t_distribution schedule_permutation draws each at most once)")
    if not 0 <= config.t_min < config.t_max <= 1:
        raise ConfigError(f"need 0 <= t_min < t_max <= 1, got t_min={config.t_min}, t_max={config.t_max}")
    if config.adv_clip <= 0:
        raise ConfigError(f"adv_clip must be > 0, got {config.adv_clip}")
    if not 0 <= config.policy_ema_decay < 1:
        raise ConfigError(f"policy_ema_decay must be in [0, 1), got {config.policy_ema_decay}")
    if config.policy_ema_rate is not None and config.policy_ema_rate < 0:
        raise ConfigError(f"policy_ema_rate must be >= 0, got {config.policy_ema_rate}")
    if config.train_batch_size is not None and config.train_batch_size < 1:
        raise ConfigError(f"train_batch_size must be >= 1, got {config.train_batch_size}")
    if config.group_size < 2 and config.adv_std == "group":
        raise ConfigError("group_size must be >= 2 with adv_std 'group': advantages compare samples of one prompt")


# --- the pieces, as small functions ----------------------------------------------------------------


def optimality(advantages: Tensor, adv_clip: float) -> Tensor:
    """r = clip(A / adv_clip, -1, 1) / 2 + 1/2: 0 for the worst, 1/2 for average, 1 for the best."""
    return (advantages / adv_clip).clamp(-1, 1) / 2 + 0.5


def policy_decay(config: DiffusionNFTConfig, updates: int) -> float:
    """EMA decay of the sampling policy after ``updates`` optimizer updates."""
    if config.policy_ema_rate is None:
        return config.policy_ema_decay
    if config.policy_ema_schedule == "flat_warmup":
        updates = updates - config.policy_ema_warmup
        if updates <= 0:
            return 0.0
    return min(config.policy_ema_decay, config.policy_ema_rate * updates)


def draws_per_sample(config: DiffusionNFTConfig) -> int:
    """t_per_sample, or its default: all the sampler's levels but one (schedule_permutation), else 1."""
    if config.t_per_sample is not None:
        return config.t_per_sample
    return max(1, config.rollout.num_steps - 1) if config.t_distribution == "schedule_permutation" else 1


def sampler_levels(config: DiffusionNFTConfig, levels: Tensor) -> Tensor:
    """The sampler's noise levels within [t_min, t_max] (the final clean level is not a step)."""
    levels = levels[:-1].float().cpu()
    levels = levels[(levels >= config.t_min) & (levels <= config.t_max)]
    if len(levels) == 0:
        raise ConfigError(f"t_distribution {config.t_distribution!r}: no sampler noise level lies in [t_min, t_max]")
    return levels


def draw_t(config: DiffusionNFTConfig, count: int, generator: torch.Generator, levels: Tensor,
           per_sample: int = 1) -> Tensor:
    """``count`` noise levels t (float32, on the CPU) from the configured distribution;
    "schedule_permutation" gives ``count / per_sample`` samples ``per_sample`` distinct levels each,
    from a random permutation of their own (sample-major order)."""
    if config.t_distribution == "schedule_permutation":
        levels = sampler_levels(config, levels)
        if per_sample > len(levels):
            raise ConfigError(f"t_per_sample {per_sample} is more than the {len(levels)} sampler levels in "
                              "[t_min, t_max]")
        orders = [torch.randperm(len(levels), generator=generator)[:per_sample] for _ in range(count // per_sample)]
        return levels[torch.cat(orders)].float()
    if config.t_distribution == "uniform":
        t = config.t_min + (config.t_max - config.t_min) * torch.rand(count, generator=generator)
    elif config.t_distribution == "logit_normal":
        z = config.logit_mean + config.logit_std * torch.randn(count, generator=generator)
        t = torch.sigmoid(z).clamp(config.t_min, config.t_max)
    else:
        levels = sampler_levels(config, levels)
        t = levels[torch.randint(len(levels), (count,), generator=generator)]
    return t.float()


def flow_timestep_scale(adapter, num_steps: int, size: dict) -> float:
    """The factor from sigma to the model's timestep units (``timesteps = scale * sigma``; 1000 for
    every flow adapter here), read off the adapter's schedule; a ConfigError for DDPM-family models."""
    schedule = adapter.schedule(num_steps, latent_shape=adapter.latent_shape(**size))
    if schedule.kind != "flow":
        raise ConfigError(f"DiffusionNFT trains flow-matching (velocity) models; {adapter.name!r} has a "
                          f"{schedule.kind} schedule (use ddpo for UNet models)")
    levels, timesteps = schedule.levels[:-1].float().cpu(), schedule.timesteps.float().cpu()
    ratios = timesteps[levels > 0] / levels[levels > 0]
    if len(ratios) == 0 or not torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-3):
        raise ConfigError("DiffusionNFT needs a flow model whose timesteps are a fixed multiple of sigma")
    return float(ratios[0])


def adaptive_nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, optimality: Tensor, beta: float,
                      t: Tensor, weights: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """The NFT loss with each term measured in x0 space (x0_hat - x0 = -t (v± - v)) and divided by
    its own detached mean absolute error: scale (r e+^2 / sg(|e+|) + (1 - r) e-^2 / sg(|e-|)); the
    reference's scale is adv_clip / beta."""
    t = t.reshape(-1, *([1] * (v_theta.ndim - 1))).float()
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta

    def term(v_implicit):
        err = t * (v_implicit.float() - target.float())
        scale = reduce_elements(err.detach().abs()).clamp_min(1e-5)
        return reduce_elements(err**2) / scale

    return scale * weighted_mean(optimality * term(v_pos) + (1 - optimality) * term(v_neg), weights)


# --- the loop --------------------------------------------------------------------------------------


def draw_loss(run, config: DiffusionNFTConfig, items, x_t, t, scale: float, item_cond, target, v_old,
              optimality_items, weights, log):
    """The NFT loss of one re-noised draw of a minibatch's samples (``items``): v_theta against the
    old policy's v_old and the flow-matching target, weighted by each sample's optimality, plus
    ``kl_beta`` times the velocity KL to the reference (LoRA off); its terms go to ``log``."""
    adapter, accelerator = run.adapter, run.accelerator
    cond = item_cond.select(items)
    with accelerator.autocast():
        v_theta = adapter.predict(x_t[items], t[items] * scale, cond).float()
    if config.loss_weighting == "adaptive":
        loss = adaptive_nft_loss(v_theta, v_old[items], target[items], optimality_items, config.beta, t[items],
                                 weights=weights, scale=config.adv_clip / config.beta)
    else:
        loss = nft_loss(v_theta, v_old[items], target[items], optimality_items, config.beta, weights=weights)
    if config.kl_beta > 0:
        with torch.no_grad(), adapter.disable_adapter(), accelerator.autocast():
            v_ref = adapter.predict(x_t[items], t[items] * scale, cond).float()
        kl = reduce_elements((v_theta - v_ref) ** 2).mean()
        loss = loss + config.kl_beta * kl
        log.add(kl=kl.detach())
    log.add(loss, policy_gap=reduce_elements((v_theta.detach() - v_old[items]) ** 2).mean())
    return loss


def train(config: DiffusionNFTConfig, adapter=None) -> dict[str, float]:
    check_config(config, adapter)
    size = {"height": config.model.height, "width": config.model.width, "num_frames": config.model.num_frames}
    if adapter is not None:  # fail before the run opens when the model is at hand
        flow_timestep_scale(adapter, config.rollout.num_steps, size)
    run, reward, heldout, prompts = start_run(config, adapter, SnapshotState())
    adapter, accelerator = run.adapter, run.accelerator
    device = accelerator.device
    scale = flow_timestep_scale(adapter, config.rollout.num_steps, size)
    old = checkpointed_snapshot(run)  # the sampling (old) policy, an EMA of theta
    K = draws_per_sample(config)

    def batch_prompts_of(iteration: int) -> list:
        return prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                     accelerator.process_index, accelerator.num_processes)

    # run.async_rollout: the workers sample with the old policy's weights (older data: no correction)
    rollouts = (AsyncRollouts(run, config, lambda it: (batch_prompts_of(it), config.rollout),
                              run.state.trainer.rollout_weights, policy=old.swapped) if config.run.async_rollout else None)
    bar = progress(run, config, "diffusion_nft")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}-nft")
        noise_gen = torch.Generator().manual_seed(rng.randrange(2**62) + accelerator.process_index)
        batch_prompts = batch_prompts_of(iteration)

        # 1. clean samples from the sampling (old) policy, decode, score (asynchronous: a worker's batch,
        # sampled at most run.max_staleness versions ago)
        if rollouts is not None:
            cond, result, scores, staleness = rollouts.take_scored(iteration, batch_prompts, config.rollout)
        else:
            with old.swapped():
                cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout,
                                                           iteration)

        # 2. advantages over the gathered batch -> optimality r in [0, 1]
        groups = result.prompt_index + accelerator.process_index * config.prompts_per_iteration
        advantages, _, named, valid = group_batch_advantages(run, reward, scores, groups, std=config.adv_std,
                                                             clip=config.adv_clip, multi_reward=config.multi_reward)
        rows = len(advantages)
        r = optimality(advantages, config.adv_clip).to(device)
        # unscored samples carry no signal: weight 0 in the loss (every process still runs every call)
        scored = scores.valid_mask()
        sample_weights = None if bool(scored.all()) else scored.float().to(device)

        # 3. re-noise: item j = sample j // K at its (j % K)-th t; v_old with the old weights
        with run.phase("renoise"), torch.no_grad():
            train_cond = conditional_training_cond(adapter, cond, batch_prompts, config.negative_prompt)
            item_sample = torch.arange(rows).repeat_interleave(K)
            item_cond = train_cond.select(result.prompt_index[item_sample])
            t = draw_t(config, rows * K, noise_gen, result.schedule.levels, per_sample=K).to(device)
            x0 = result.samples.float()[item_sample.to(result.samples.device)].to(device)
            eps = torch.randn(x0.shape, generator=noise_gen).to(device)
            x_t, target = flow_matching_target(x0, eps, t)
            with old.swapped(), accelerator.autocast():
                v_old = predict_in_chunks(adapter, x_t, t * scale, item_cond, config.rollout.max_batch).float()

        # 4. NFT loss over minibatches of samples (all K draws of a sample in one optimizer step)
        log = TrainLog("kl", "policy_gap")
        with run.phase("training"):
            batch = config.train_batch_size or rows
            for samples in epoch_minibatches(config.inner_epochs, rows, batch, rng):
                with run.accumulate():
                    for k in range(K):
                        items = samples * K + k
                        weights = None if sample_weights is None else sample_weights[samples]
                        loss = draw_loss(run, config, items, x_t, t, scale, item_cond, target, v_old, r[samples],
                                         weights, log)
                        accelerator.backward(loss / K)
                    log.record_update(run.optimizer_step())

        # 5. the sampling policy follows theta
        decay = policy_decay(config, run.state.updates)
        old.update(decay)

        # 6. bookkeeping (NFE: sampling plus the v_old evaluations)
        metrics = reward_metrics(named, valid)
        metrics.update({"optimality/mean": float(r.mean()), "optimality/abs_dev": float((r - 0.5).abs().mean()),
                        "policy/ema_decay": decay, "policy/weight_distance": old.distance()})
        metrics.update(log.metrics())
        if rollouts is not None:
            metrics["train/staleness"] = float(staleness)
        end_iteration(run, config, reward, heldout, metrics, result.nfe + rows * K)
    if rollouts is not None:
        rollouts.close()
    return finish_run(config, run, reward, heldout)


CONFIG = DiffusionNFTConfig
