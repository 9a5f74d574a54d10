"""Flow-GRPO and its options: Fast / Mix SDE windows, DanceGRPO-style step subsets and shared group
noise, CPS or DanceGRPO kernels, multi-reward mixing, GRPO-Guard, guided sampling distilled into the
model (Euphonium), and adversarial reward co-training (Adv-GRPO).

One iteration reads top to bottom:
prompts -> rollout (SDE, log-probs recorded; ``guidance``: steered by a reward-gradient drift) ->
decode -> reward -> group advantages (``process_weight``: plus per-step process advantages) ->
for each minibatch, for each trained step: re-score the stored transition with the current weights,
PPO-clip loss + beta * KL to the reference (LoRA off) -> optimizer step (then the rewards that learn
alongside update: an adv_dino head against its references) -> the latent PRM fits the rollouts.

Features and the fields that turn them on:

- Fast / Mix SDE windows: ``window_size``, ``window_mode``; DanceGRPO step subsets:
  ``ppo.timestep_fraction``, ``ppo.timestep_selection``; GRPO-Guard: ``guard``.
- Speed: ``rollout.cfg_split`` (on) re-scores the conditional CFG rows only and reuses the rollout's
  unconditional prediction before the first update; ``reuse_rollout_graph`` (off) keeps the rollout's
  graphs so that pass runs no policy forward at all (memory: every stochastic step's activations).
- Euphonium: ``guidance.rewards`` (a pixel reward through x0_hat, or ``{name: latent_prm,
  in_channels: C}`` with ``guidance.on: latents``, which then trains alongside on every iteration's
  rollouts); the rollout follows ``eta^2 / (2 beta) g / ||g||`` while log-probs use the unguided mean,
  so the model learns the guidance. Dual advantages: ``outcome_weight`` and ``process_weight`` (the
  guiding reward per step, normalised per group).
- Adv-GRPO: an ``adv_dino`` reward in ``rewards`` with ``reference_dir``; ``reward_updates`` (on)
  updates its head after every generator update (``updates_per_step`` / ``update_every`` of the
  reward), and the head's weights and optimiser state are checkpointed and resumed.
- Asynchronous rollouts: ``run.async_rollout`` with ``run.rollout_workers`` and ``run.max_staleness``
  (Ray actors sample while the trainer trains; a stale batch's rows are weighted by truncated importance
  weights, ``run.max_importance_weight``, against the current policy's log-probs: the single update's own
  forward, or with several updates a re-score once per step first; align/training/async_rollout.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field, replace

import torch

from align.advantages import dual_advantages
from align.losses import guard_step_weights, truncated_importance
from align.training.async_rollout import AsyncRollouts
from align.config import ConfigError, check_choice
from align.guidance import GuidanceConfig, build_guidance
from align.prompts import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers import ppo
from align.trainers.checks import check_common, require_stochastic_kernel, steps_of_trained_networks
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import PPOConfig, PPOTerm, RolloutBatch
from align.trainers.scoring import (MULTI_REWARD_MODES, group_batch_advantages, learning_rewards,
                                    restore_reward_states, sample_and_score, store_reward_states)
from rewards.dense import prm_rows_from_rollout


@dataclass
class FlowGRPOConfig(TrainerConfig):
    trainer: str = "flow_grpo"
    #: cfg_split: the re-score backpropagates through the conditional rows only and, before the
    #: iteration's first update, reuses the rollout's unconditional prediction (needs ppo.cfg_grad
    #: cond_only)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo",
                                                                         cfg_split=True))
    #: the PPO update: Flow-GRPO's clip range 1e-4, KL weight 0.04 in the reference's form, the
    #: conditional CFG branch's gradient only; the last step is not trained
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(kl_beta=0.04))
    #: advantages (r - prompt mean) / std with the std of the whole gathered batch ("global", as every
    #: paper config of the reference) or of the prompt's group ("group")
    adv_std: str = "global"
    #: several rewards: "sum_rewards" (weighted sum, then normalise), "sum_advantages" (MixGRPO) or
    #: "gdpo" (each reward normalised within its group, the weighted sum again over the batch)
    multi_reward: str = "sum_rewards"
    #: Fast / Mix: an SDE window of this many steps inside an ODE run (null: SDE everywhere)
    window_size: int | None = None
    #: "random" start every iteration (Fast), or "sliding" by one step every window_slide_every (Mix)
    window_mode: str = "random"
    #: "sliding": iterations between moves of the window's start by one step (it wraps round to the first start)
    window_slide_every: int = 10
    #: rollout rows per optimizer step (null: all rows of the iteration, or updates_per_epoch)
    train_batch_size: int | None = None
    #: optimizer updates per pass over the rollouts (the reference makes 2; its SD3.5 recipes here
    #: set it); null: one (train_batch_size rows at a time), which keeps every ratio of the single
    #: pass at exactly 1 so the clip only acts across inner epochs
    updates_per_epoch: int | None = None
    #: the rollout's model calls keep their graphs, and the PPO pass before the first update
    #: backpropagates them instead of re-running the policy (one model forward less per trained step;
    #: the ratios are the rollout's own values, exactly 1). It holds the activations of every
    #: stochastic step until the training pass, so it suits models and batches whose activations fit
    #: several times over; one process, one minibatch per update
    reuse_rollout_graph: bool = False
    #: GRPO-Guard: per-step log-ratio normalisation and step reweighting
    guard: bool = False
    #: Euphonium: guided rollouts (empty guidance.rewards: none); log-probs stay the unguided step's
    guidance: GuidanceConfig = field(default_factory=lambda: GuidanceConfig(form="normalized"))
    #: dual advantages of guided rollouts: the weight of the outcome advantage at every trained step (used
    #: only with a process_weight; without one the outcome advantage trains unweighted)
    outcome_weight: float = 1.0
    #: dual advantages: the weight of the process advantage (the guiding reward at each guided step,
    #: normalised per group; 0: outcome only); needs guidance.rewards
    process_weight: float = 0.0
    #: rewards that learn during the run update as it trains: an adv_dino head after every generator
    #: update (its updates_per_step / update_every), a latent_prm guidance reward on every rollout
    reward_updates: bool = True


@dataclass
class FlowGRPOState:
    """What a Flow-GRPO run carries from iteration to iteration (saved with each checkpoint)."""

    #: GRPO-Guard: the mean log-ratio spread of the last iteration, the scale the next one normalises to
    guard_std: float | None = None
    #: the learning rewards' weights and optimiser states (adv_dino's head, a latent PRM), by key
    reward_states: dict = field(default_factory=dict)
    #: run.async_rollout: the weights of the versions that batches in flight were asked with ({version: weights}),
    #: so a resumed run asks for them again with the same weights
    rollout_weights: dict = field(default_factory=dict)


def check_config(config: FlowGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    if config.rollout.cfg_split and config.ppo.cfg_grad != "cond_only":
        raise ConfigError("rollout.cfg_split needs ppo.cfg_grad: cond_only (a 'full' gradient differentiates the "
                          "unconditional branch: set rollout.cfg_split: false)")
    check_choice("adv_std", config.adv_std, ("group", "global"))
    check_choice("multi_reward", config.multi_reward, MULTI_REWARD_MODES)
    check_choice("window_mode", config.window_mode, ("random", "sliding"))
    if config.window_size is not None and not 1 <= config.window_size < config.rollout.num_steps:
        raise ConfigError(f"window_size must be in 1..{config.rollout.num_steps - 1}, got {config.window_size}")
    if config.updates_per_epoch is not None and config.updates_per_epoch < 1:
        raise ConfigError(f"updates_per_epoch must be >= 1, got {config.updates_per_epoch}")
    if config.updates_per_epoch is not None and config.train_batch_size is not None:
        raise ConfigError("set one of train_batch_size and updates_per_epoch, not both")
    if config.group_size < 2:
        raise ConfigError("group_size must be >= 2: advantages compare samples of one prompt")
    if config.reuse_rollout_graph:
        import os

        problem = ("it needs one process" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
                   "guided rollouts keep no graph" if config.guidance.enabled else
                   "it needs one minibatch per update (train_batch_size and updates_per_epoch null, "
                   "run.gradient_accumulation_steps 1)"
                   if config.train_batch_size or (config.updates_per_epoch or 1) > 1
                   or config.run.gradient_accumulation_steps > 1 else None)
        if problem:
            raise ConfigError(f"reuse_rollout_graph: {problem}")
    if config.run.async_rollout and (config.guidance.enabled or config.reuse_rollout_graph):
        raise ConfigError("run.async_rollout: " + ("guided rollouts are not sampled by the workers yet"
                                                   if config.guidance.enabled else
                                                   "reuse_rollout_graph keeps the rollout's graphs in the sampling process"))
    config.guidance.validate(config.rollout.num_steps)
    if config.process_weight and not config.guidance.enabled:
        raise ConfigError("process_weight needs guidance.rewards: the process reward is the guiding reward per step")
    if config.guidance.enabled and (config.rollout.split_steps or config.rollout.branch_steps):
        raise ConfigError("guidance steers independent trajectories: drop rollout.split_steps / branch_steps")


def rollout_for_iteration(config: FlowGRPOConfig, iteration: int, rng: random.Random,
                          trained: set[int] | None = None) -> RolloutConfig:
    """The SDE window of this iteration (Fast: random start; Mix: sliding), never on the last step.
    ``trained``: the steps whose network trains (an expert of Wan 2.2 A14B; None: every step): a
    window starts only where it reaches one of them."""
    if config.window_size is None:
        return config.rollout
    starts = [s for s in range(config.rollout.num_steps - config.window_size)  # windows end before the last step
              if trained is None or trained & set(range(s, s + config.window_size))]
    if not starts:
        raise ConfigError(f"window_size={config.window_size}: no SDE window of the {config.rollout.num_steps} steps "
                          f"reaches a step of the trained expert (model.train_experts)")
    if config.window_mode == "random":
        start = starts[rng.randrange(len(starts))]
    else:
        start = starts[(iteration // config.window_slide_every) % len(starts)]
    return replace(config.rollout, sde_steps=list(range(start, start + config.window_size)))


def minibatch_size(config: FlowGRPOConfig, rows: int) -> int:
    """Rows per optimizer update: ``train_batch_size``, or the rows split into ``updates_per_epoch``
    updates, or all of them (one update)."""
    if config.updates_per_epoch:
        return max(1, math.ceil(rows / config.updates_per_epoch))
    return config.train_batch_size or max(1, rows)


def ppo_terms(transitions: dict, steps: list[int], index: torch.Tensor, advantages: torch.Tensor,
              step_advantages: dict, step_weights: torch.Tensor, row_weights, step_mask,
              outcome_weight: float, importance: dict | None = None) -> list[PPOTerm]:
    """A minibatch's terms, one per trained step: the step's rows of ``index``, their advantages
    (guided rollouts: outcome + process advantage of the step), and the term's share of the loss
    (GRPO-Guard's step weight over the step count). With per-sample steps (``step_mask``) each row
    trains its own steps, averaged per row; under DDP (``row_weights``) every process keeps every
    row, the unpicked ones weighing 0. ``importance``: a stale batch's truncated importance weight of
    each row, per step (:func:`stale_importance`), multiplied into the rows' weights."""
    terms = []
    steps_per_row = int(step_mask[0].sum()) if step_mask is not None else 0
    for j, step in enumerate(steps):
        chosen, weights = index, None if row_weights is None else row_weights[index]
        scale = step_weights[j] / len(steps)
        if step_mask is not None and row_weights is None:
            chosen = index[step_mask[index, j]]
            if len(chosen) == 0:
                continue
            scale = step_weights[j] * (len(chosen) / (len(index) * steps_per_row))
        elif step_mask is not None:
            weights = row_weights[index] * step_mask[index, j].float().to(row_weights.device)
            rows_in_batch = float(row_weights[index].sum())
            scale = step_weights[j] * (float(weights.sum()) / max(rows_in_batch * steps_per_row, 1e-12))
        step_adv = step_advantages.get(step, outcome_weight * advantages if step_advantages else advantages)
        if importance:
            w = importance[step][chosen]
            weights = w if weights is None else weights * w.to(weights.device)
        terms.append(PPOTerm(transitions[step].subset(chosen), step_adv[chosen], scale, weights))
    return terms


def stale_importance(run, transitions: dict, batch: RolloutBatch, max_weight: float) -> tuple[dict, dict]:
    """A batch sampled with older weights (run.async_rollout): each trained step is re-scored without
    gradients by the current policy; its truncated importance weight corrects for the sampling policy
    (the loss's self-normalised weighted mean), and the PPO ratio then starts from the current policy
    (the recorded log-prob becomes the current one, so the clip bounds the update from here).
    Returns (weights per step, stats)."""
    from align.sampling.rescore import rescore

    cond, schedule, rollout_config = batch
    weights, truncated, values = {}, [], []
    with torch.no_grad(), run.accelerator.autocast():
        for step, t in transitions.items():
            now = rescore(run.adapter, t, cond, schedule, rollout_config).log_prob
            weights[step], cut = truncated_importance(now, t.log_prob.to(now.device), max_weight)
            t.log_prob = now
            truncated.append(cut.float())
            values.append(weights[step])
    stats = {"train/importance_weight": float(torch.cat(values).mean()) if values else 1.0,
             "train/clipped_fraction": float(torch.cat(truncated).mean()) if truncated else 0.0}
    return weights, stats


def train(config: FlowGRPOConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter, FlowGRPOState())  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    guide = build_guidance_reward(config, run)
    learning = learning_rewards(rewards=reward, guidance=guide) if config.reward_updates else {}
    restore_reward_states(run, learning)
    bar = progress(run, config, "flow_grpo")
    trained = steps_of_trained_networks(adapter, config.rollout.num_steps, run.latent_kwargs)

    def iteration_inputs(iteration: int):
        """The iteration's prompts and rollout settings (its window): the seed and the iteration decide them."""
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        return batch_prompts, rollout_for_iteration(config, iteration, rng, trained), rng

    rollouts = (AsyncRollouts(run, config, lambda it: iteration_inputs(it)[:2], run.state.trainer.rollout_weights)
                if config.run.async_rollout else None)
    for iteration in bar:
        batch_prompts, rollout_config, rng = iteration_inputs(iteration)

        # 1. sample (guided: the drift hook steers the rows), decode, score; asynchronous: a rollout
        # worker's batch, sampled at most run.max_staleness weight versions ago
        drift, staleness = None, 0
        if guide is not None:
            drift = build_guidance(config.guidance, adapter, batch_prompts, rollout_config, reward=guide)
        if rollouts is not None:
            cond, result, scores, staleness = rollouts.take_scored(iteration, batch_prompts, rollout_config)
        else:
            cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration,
                                                       drift=drift, keep_policy_graph=config.ppo.cfg_grad
                                                       if config.reuse_rollout_graph else None)

        # 2. advantages from the global batch (groups = prompts, made unique across processes)
        groups = result.prompt_index + accelerator.process_index * config.prompts_per_iteration
        advantages, keep, named, valid = group_batch_advantages(run, reward, scores, groups, std=config.adv_std,
                                                                clip=config.ppo.adv_clip,
                                                                multi_reward=config.multi_reward)
        advantages = advantages.to(accelerator.device)
        step_advantages = {}  # guided: outcome + process advantage per step
        if drift is not None and config.process_weight:
            step_advantages = dual_advantages(advantages, drift.values, result.prompt_index,
                                              outcome_weight=config.outcome_weight,
                                              process_weight=config.process_weight, clip=config.ppo.adv_clip)

        # 3. PPO over the trained steps of the kept rows: ppo.inner_epochs x minibatches, one optimizer
        # step each (then the adversarial heads follow the generator)
        steps = ppo.ppo_steps(config.ppo, result.main_transitions(), rollout_config.num_steps, rng)
        transitions = {t.step: t for t in result.main_transitions(steps)}
        for t in result.transitions:  # reuse_rollout_graph: the untrained steps' graphs go now
            if t.step not in transitions:
                t.policy_out = None
        stds = torch.stack([transitions[s].std.mean() for s in steps]) if steps else torch.ones(1)
        step_weights = guard_step_weights(stds) if config.guard else torch.ones_like(stds)
        rows, row_weights = ppo.train_rows(run, keep)
        step_mask = None
        if config.ppo.timestep_selection == "per_sample" and config.ppo.timestep_fraction < 1 and steps:
            step_mask = ppo.per_sample_steps(len(keep), len(steps), config.ppo.timestep_fraction,
                                             torch.Generator().manual_seed(rng.randrange(2**31)))
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        importance, stale, cap = None, {}, None
        with run.phase("training"):
            batch_size = minibatch_size(config, len(rows))
            if staleness > 0:  # sampled by older weights: truncated importance weights, ratios from now
                if config.ppo.inner_epochs == 1 and batch_size >= len(rows):  # one update: its own re-score
                    cap = config.run.max_importance_weight
                else:  # several updates: the current policy's log-probs first, one forward per step
                    importance, stale = stale_importance(run, transitions, batch, config.run.max_importance_weight)
            for index in ppo.epoch_minibatches(config.ppo.inner_epochs, rows, batch_size, rng):
                terms = ppo_terms(transitions, steps, index, advantages, step_advantages, step_weights,
                                  row_weights, step_mask, config.outcome_weight, importance)
                with run.accumulate():
                    ppo.ppo_backward(run, terms, batch, config.ppo, log, guard=config.guard,
                                     guard_std=run.state.trainer.guard_std,
                                     reuse_uncond=log.updates == 0 and staleness == 0, importance_cap=cap)
                    if log.record_update(run.optimizer_step()):
                        log.add(**update_heads(run, learning, result.pixels))  # Adv-GRPO: heads follow
        if config.guard and log.get("log_ratio_std"):
            run.state.trainer.guard_std = sum(log["log_ratio_std"]) / len(log["log_ratio_std"])

        # 4. a latent PRM guiding the rollouts fits them (x_t, sigma_t -> the final reward)
        metrics = reward_metrics(named, valid)
        if drift is not None:
            metrics["guidance/reward_calls"] = float(drift.cost["reward_calls"])
        for key, prm in learning.items():
            if hasattr(prm, "fit_step"):
                rows = prm_rows_from_rollout(result, scores.total.detach(), batch_prompts)
                metrics[f"{key}/loss"] = prm.fit_step(rows["latents"], rows["sigmas"], rows["prompts"], rows["targets"])
        store_reward_states(run, learning)

        # 5. bookkeeping
        metrics.update({"advantage/mean": float(advantages.mean()),
                        "advantage/abs_mean": float(advantages.abs().mean()),
                        "advantage/kept_fraction": float(keep.float().mean())})
        metrics.update(log.metrics())
        if rollouts is not None:
            metrics.update({"train/staleness": float(staleness), **stale})
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    if rollouts is not None:
        rollouts.close()
    return finish_run(config, run, reward, heldout)


def build_guidance_reward(config: FlowGRPOConfig, run):
    """The guiding reward, built once for the run (a latent PRM keeps learning across iterations)."""
    if not config.guidance.enabled:
        return None
    from rewards import build_rewards

    return build_rewards(list(config.guidance.rewards)).to(run.accelerator.device)


def update_heads(run, learning: dict, pixels) -> dict[str, float]:
    """After a generator update: each learning reward with a discriminator head (adv_dino) runs its
    head updates on the iteration's samples of every process (so every process's head is the same)."""
    if pixels is None:
        return {}
    stats = {}
    everything = None
    for reward in learning.values():
        if hasattr(reward, "after_generator_step"):
            everything = run.gather(pixels.contiguous()) if everything is None else everything
            stats.update(reward.after_generator_step(everything))
    return stats


CONFIG = FlowGRPOConfig
