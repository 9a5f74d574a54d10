"""The PPO update of the six PPO-family trainers (flow_grpo, branch_grpo, dense_grpo, tempflow_grpo,
ddpo, b2_diffurl): their shared ``ppo`` config block, the steps they train, and the loss of one
minibatch of stored transitions.

A trainer supplies only what is its own: which rows and steps form each optimizer update, each
term's advantages, loss share and row weights (tree edges, TempFlow's noise weights, per-sample
step masks, the rows kept under DDP), and extra re-scoring options (GRPO-Guard, shared tree
parents). Its recipe then reads::

    for terms in updates:                              # inner_epochs x minibatches
        with run.accumulate():
            ppo_backward(run, terms, batch, config.ppo, log)  # re-score, clip + KL, backward
            log.record_update(run.optimizer_step())
"""

from __future__ import annotations

import dataclasses

import random
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from align.errors import ConfigError, check_choice
from align.losses import CFG_GRADS, KL_FORMS
from align.trainers.common import shuffled_minibatches

TIMESTEP_SELECTIONS = ("shared", "per_sample", "prefix")
#: kernels whose step std is std_t sqrt(-dt) (Flow-GRPO's, DanceGRPO's): the reference KL form applies;
#: for the others (CPS, DDIM) kl_form "flow_grpo" is the exact KL, as their references use
KL_DT_KERNELS = ("flow_grpo", "dance_grpo")


@dataclass
class PPOConfig:
    #: PPO clip range on the per-step ratio exp(logp - logp_old) (log-probs are element means, so it
    #: is tiny: 1e-4 in the Flow-GRPO reference)
    clip_range: float = 1e-4
    #: weight of the KL to the reference policy (the model with its LoRA disabled, or a frozen copy);
    #: 0 turns it off
    kl_beta: float = 0.0
    #: KL form: "flow_grpo" (the reference's: std_t without the step's sqrt(-dt), so published
    #: kl_beta values mean what they meant there) or "exact" (the step's Gaussian KL, flow_grpo / (-dt))
    kl_form: str = "flow_grpo"
    #: CFG gradient of a training re-score: "cond_only" (the Flow-GRPO reference detaches the
    #: unconditional branch: g dc) or "full" ((1 - g) du + g dc); the rollout is the same either way
    cfg_grad: str = "cond_only"
    #: advantages are clipped to [-adv_clip, adv_clip]
    adv_clip: float = 5.0
    #: passes over each iteration's rollouts
    inner_epochs: int = 1
    #: train the last sampling step (its flow std is tiny, ~2e-3, so flow trainers leave it out)
    train_last_step: bool = False
    #: train a fraction of the trained steps each iteration (DanceGRPO: 0.6)
    timestep_fraction: float = 1.0
    #: which steps timestep_fraction keeps: "shared" (one random subset of round(fraction * T) for
    #: every row: every minibatch trains the same steps), "per_sample" (DanceGRPO's reference: each
    #: row its own random permutation, first int(fraction * T); flow_grpo only) or "prefix" (the
    #: first int(fraction * T) steps in order, as the Flow-GRPO reference trains steps 0..8 of 10)
    timestep_selection: str = "shared"

    def validate(self, trainer: str = "") -> None:
        """Choices and ranges of the block (positive / non-negative numbers are checked by name in
        align.config.check_ranges); ``trainer`` names the trainer in the messages."""
        check_choice("ppo.kl_form", self.kl_form, KL_FORMS)
        check_choice("ppo.cfg_grad", self.cfg_grad, CFG_GRADS)
        check_choice("ppo.timestep_selection", self.timestep_selection, TIMESTEP_SELECTIONS)
        if not 0 < self.timestep_fraction <= 1:
            raise ConfigError(f"ppo.timestep_fraction must be in (0, 1], got {self.timestep_fraction}")
        if self.timestep_selection == "per_sample" and trainer and trainer != "flow_grpo":
            raise ConfigError(f"ppo.timestep_selection: 'per_sample' is flow_grpo's (DanceGRPO); {trainer} takes "
                              f"'shared' or 'prefix'")


def trained_steps(recorded: Sequence[int], num_steps: int, rng: random.Random, *, train_last_step: bool,
                  fraction: float = 1.0, selection: str = "shared") -> list[int]:
    """The recorded steps to train this iteration: the last one only with ``train_last_step``, then
    ``fraction`` of them by ``selection`` ("shared": a random subset of round(fraction * n) drawn
    from ``rng``; "prefix": the first int(fraction * n); "per_sample": all of them, each row keeping
    its own subset, see :func:`per_sample_steps`)."""
    steps = sorted(s for s in recorded if train_last_step or s != num_steps - 1)
    if fraction < 1 and steps:
        if selection == "shared":
            steps = sorted(rng.sample(steps, max(1, round(fraction * len(steps)))))
        elif selection == "prefix":
            steps = steps[:max(1, int(fraction * len(steps)))]
    return steps


def ppo_steps(ppo: PPOConfig, transitions: Sequence, num_steps: int, rng: random.Random) -> list[int]:
    """:func:`trained_steps` of a rollout's transitions by the ``ppo`` block, those with a zero std
    left out (a deterministic step has no log-prob)."""
    recorded = [t.step for t in transitions if bool((t.std > 0).all())]
    return trained_steps(recorded, num_steps, rng, train_last_step=ppo.train_last_step,
                         fraction=ppo.timestep_fraction, selection=ppo.timestep_selection)


def per_sample_steps(rows: int, num_steps: int, fraction: float, generator: torch.Generator) -> Tensor:
    """DanceGRPO's selection: (rows, num_steps) bool, row r keeping the first int(fraction * T)
    entries of its own random permutation of the T steps."""
    keep = max(1, int(fraction * num_steps))
    order = torch.stack([torch.randperm(num_steps, generator=generator) for _ in range(rows)])
    return torch.zeros(rows, num_steps, dtype=torch.bool).scatter_(1, order[:, :keep], True)


def epoch_minibatches(epochs: int, rows, batch: int, rng):
    """``epochs`` passes over ``rows``, each in its own shuffled minibatches of ``batch``
    (:func:`shuffled_minibatches`, seeded from ``rng`` as each pass starts)."""
    for _ in range(epochs):
        yield from shuffled_minibatches(rows, batch, rng.randrange(2**31))


def train_rows(run, keep: Tensor) -> tuple[Tensor, Tensor | None]:
    """(rows to train, per-row loss weights or None). One process: the rows whose group carries
    signal (``keep``), no weights. Several processes: DDP all-reduces in each backward, so every
    process must run the same forward / backward calls however many of its groups were dropped;
    each trains all its rows, weighted by ``keep`` (none at all when no process kept a row)."""
    if run.accelerator.num_processes == 1:
        return keep.nonzero().flatten(), None
    if not bool(run.gather(keep.float()).any()):
        return torch.zeros(0, dtype=torch.long), None
    return torch.arange(len(keep)), keep.float().to(run.accelerator.device)


class RolloutBatch(NamedTuple):
    """What re-scoring a stored transition needs from its rollout."""

    cond: Any
    schedule: Any
    config: Any


class PPOTerm(NamedTuple):
    """One re-scored batch of transition rows in an update: its loss, times ``scale``, is
    backpropagated (the term's share of the update's loss)."""

    transition: Any
    advantages: Tensor
    scale: float | Tensor = 1.0
    #: per-row loss weights (rows kept under DDP, per-sample step masks); None: a plain mean
    weights: Tensor | None = None


def ppo_backward(run, terms: Sequence[PPOTerm], batch: RolloutBatch, ppo: PPOConfig, log, **rescoring) -> None:
    """Forward and backward of one minibatch: each term re-scored with the current weights, its
    PPO-clip + KL loss (:func:`ppo_transition_loss`) times its ``scale`` backpropagated, and its
    statistics added to ``log``. ``rescoring``: the trainer's extra options of
    :func:`ppo_transition_loss` (guard, guard_std, share_parents, reuse_uncond)."""
    for term in terms:
        loss, stats = ppo_transition_loss(run, term.transition, batch, term.advantages, ppo, weights=term.weights,
                                          **rescoring)
        run.accelerator.backward(loss * term.scale)
        log.add(loss, **stats)


def ppo_transition_loss(run, part, batch: RolloutBatch, advantages: Tensor, ppo: PPOConfig, *, weights=None,
                        guard: bool = False, guard_std: float | None = None, share_parents: bool = False,
                        reuse_uncond: bool = False, importance_cap: float | None = None):
    """The policy loss of one batch of stored transitions: re-score with the current weights,
    PPO-clip against the recorded log-probs, plus kl_beta * KL(mean, mean_ref) with the reference
    (LoRA disabled), in ``kl_form`` "exact" (:func:`align.losses.mean_kl`) or "flow_grpo" (the
    reference's, :func:`align.losses.flow_grpo_kl`). ``guard`` turns on GRPO-Guard's per-step
    log-ratio normalisation, rescaled to ``guard_std`` (null: the step's own spread, i.e. centring
    only). ``share_parents``: siblings of a tree share one model evaluation, as in the rollout.
    ``reuse_uncond``: no update since the rollout, so the policy's re-score takes the unconditional
    prediction the rollout kept (:func:`align.sampling.rescore.rescore`). ``importance_cap``: the
    transitions were sampled by older weights and this is the iteration's only update: the re-score is
    the current policy, so each row is weighted by its truncated importance weight
    min(pi_now / pi_sampled, cap) and the ratio starts from pi_now (no extra forward; several updates
    per iteration re-score the current policy first, ``flow_grpo.stale_importance``). Returns (loss,
    stats)."""
    from align.losses import flow_grpo_kl, mean_kl, normalize_log_ratio, ppo_clip_loss, weighted_mean
    from align.sampling.rescore import rescore

    adapter, accelerator = run.adapter, run.accelerator
    cond, schedule, rollout_config = batch
    with accelerator.autocast():
        new = rescore(adapter, part, cond, schedule, rollout_config, share_parents=share_parents,
                      cfg_grad=ppo.cfg_grad, reuse_uncond=reuse_uncond)
    log_prob = new.log_prob
    stale = {}
    if importance_cap is not None:
        from align.losses import truncated_importance

        w, cut = truncated_importance(log_prob.detach(), part.log_prob.to(log_prob.device), importance_cap)
        stale = {"importance_weight": w.mean(), "clipped_fraction": cut.float().mean()}
        weights = w if weights is None else weights * w
        part = dataclasses.replace(part, log_prob=log_prob.detach())
    log_ratio = (log_prob - part.log_prob).detach()
    if guard:
        target = guard_std if guard_std is not None else log_ratio.std(unbiased=False)
        log_prob = part.log_prob + normalize_log_ratio(log_prob - part.log_prob, target)
    loss, stats = ppo_clip_loss(log_prob, part.log_prob, advantages.to(log_prob.device), ppo.clip_range, weights)
    stats["log_ratio_std"] = log_ratio.std(unbiased=False)
    if ppo.kl_beta > 0:
        with torch.no_grad(), adapter.disable_adapter(), accelerator.autocast():
            ref = rescore(adapter, part, cond, schedule, rollout_config, share_parents=share_parents)
        if ppo.kl_form == "flow_grpo" and part.kernel in KL_DT_KERNELS:
            dt = schedule.levels[part.step + 1] - schedule.levels[part.step]
            kl = weighted_mean(flow_grpo_kl(new.mean, ref.mean, new.std, dt), weights)
        else:
            kl = weighted_mean(mean_kl(new.mean, ref.mean, new.std), weights)
        loss = loss + ppo.kl_beta * kl
        stats["kl"] = kl.detach()
    return loss, {**stats, **stale}
