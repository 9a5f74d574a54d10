"""D3PO: direct preference optimisation on the denoising steps, without a reward model's gradient.

One iteration reads top to bottom:
prompts -> pairs: two stochastic rollouts per prompt from the SAME start noise (log-probs recorded)
-> decode -> the preference of each pair (the trained reward as the proxy: the higher total wins;
ties and unscored pairs are dropped) -> for each trained step j: re-score both transitions with the
current weights, log rho = log pi_theta - log pi_ref of the step (pi_ref: the policy that sampled,
as recorded), clamped to [log(1 - clip), log(1 + clip)], loss = -log sigmoid(beta [log rho_w -
log rho_l]) -> optimizer step (``inner_epochs`` passes).

Human preferences instead of the reward (``labels``): ``align label`` samples the pairs, a person
judges them (its index.html), and training reads the filled pairs.jsonl and the stored
trajectories (align/commands/label.py), ``labelled_pairs_per_iteration`` judged pairs per update; the ratios
are then against the model that sampled the pairs.

Features and their fields: the step kernel (``rollout.kernel``: flow_grpo / dance_grpo / cps on
flow models, ddim on UNet models), ``beta`` and ``clip`` (D3PO: 0.1 each), steps trained
(``train_last_step``, ``timestep_fraction``). Images and videos.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

import torch

from align.config import ConfigError, check_choice
from align.losses import CFG_GRADS, d3po_loss
from align.prompts import prompts_for_iteration
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common, require_trained_steps
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import trained_steps
from align.trainers.scoring import sample_and_score


@dataclass
class D3POConfig(TrainerConfig):
    trainer: str = "d3po"
    #: 10 steps of the flow_grpo SDE kernel, whose per-step log-probs the loss compares (any stochastic
    #: kernel: ddim on UNet models); a pair shares its start noise
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="flow_grpo"))
    #: the preference strength: loss = -log sigmoid(beta [log rho_w - log rho_l]) per step (D3PO: 0.1)
    beta: float = 0.1
    #: the per-step ratio is clamped to [1 - clip, 1 + clip]
    clip: float = 0.1
    #: optimizer updates per iteration, each over all pairs and trained steps
    inner_epochs: int = 1
    #: train the last sampling step (its flow std is tiny, ~2e-3, so it is left out by default)
    train_last_step: bool = False
    #: train a random fraction of the steps each iteration
    timestep_fraction: float = 1.0
    #: CFG gradient of a training re-score: "cond_only" (the unconditional branch detached, as the Flow-GRPO
    #: reference) or "full"
    cfg_grad: str = "cond_only"
    #: pairs whose rewards differ by less than this are dropped (a proxy reward's near-ties are noise)
    min_reward_gap: float = 0.0
    #: pairs: two samples per prompt (fixed)
    group_size: int = 2
    #: human labels: a pairs.jsonl written by ``align label`` and filled (null: the reward decides)
    labels: str | None = None
    #: human labels: judged pairs drawn at random each iteration (all of them when fewer), trained in each update
    labelled_pairs_per_iteration: int = 8


def check_config(config: D3POConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_trained_steps(config.rollout, config.train_last_step)
    check_choice("cfg_grad", config.cfg_grad, CFG_GRADS)
    if config.group_size != 2:
        raise ConfigError(f"group_size must be 2 for d3po (a pair per prompt), got {config.group_size}")
    if not 0 < config.clip < 1:
        raise ConfigError(f"clip must be in (0, 1), got {config.clip}")
    if not 0 < config.timestep_fraction <= 1:
        raise ConfigError(f"timestep_fraction must be in (0, 1], got {config.timestep_fraction}")
    if config.labels is not None:
        from align.labels import read_labels

        info = read_labels(config.labels).info
        for key, value in (("model.name", config.model.name), ("model.path", config.model.path),
                           ("rollout.num_steps", config.rollout.num_steps),
                           ("model.height", config.model.height), ("model.width", config.model.width),
                           ("model.num_frames", config.model.num_frames)):
            saved = info.get({"model.name": "model", "model.path": "model_path"}.get(key, key.split(".")[1]))
            if saved != value:
                raise ConfigError(f"labels: the pairs of {config.labels} were sampled with {key}={saved!r}, "
                                  f"this config has {value!r}")


def pair_preferences(scores: torch.Tensor, valid: torch.Tensor, min_gap: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows (2p, 2p + 1) are pair p: (winner rows, loser rows) of the pairs with two scored rewards
    that differ (by more than ``min_gap``)."""
    first, second = scores[0::2], scores[1::2]
    keep = valid[0::2].bool() & valid[1::2].bool() & ((first - second).abs() > min_gap) & (first != second)
    index = torch.arange(len(first)) * 2
    winner = torch.where(first >= second, index, index + 1)
    loser = torch.where(first >= second, index + 1, index)
    return winner[keep], loser[keep]


def preference_update(run, config: D3POConfig, transitions: dict, steps: list[int], winner, loser, cond, schedule,
                      rollout_config, stats: TrainLog) -> None:
    """``inner_epochs`` optimizer updates of the per-step D3PO loss of the pairs (winner, loser).
    Several processes: DDP all-reduces in every backward, so a process without pairs runs the same
    calls on a stand-in pair weighted 0 (none runs any when no process has a pair)."""
    accelerator, n, weight = run.accelerator, len(winner), 1.0
    if accelerator.num_processes > 1:
        counts = run.gather(torch.tensor([float(n)], device=accelerator.device))
        if n == 0 and float(counts.sum()) > 0:
            winner, loser, n, weight = torch.tensor([0]), torch.tensor([1]), 1, 0.0
    rows = torch.cat([winner, loser])
    for _ in range(config.inner_epochs if n else 0):
        with run.accumulate():
            for step in steps:
                part = transitions[step].subset(rows.to(transitions[step].rows.device))
                with accelerator.autocast():
                    new = rescore(run.adapter, part, cond, schedule, rollout_config, cfg_grad=config.cfg_grad)
                log_ratio = new.log_prob - part.log_prob.to(new.log_prob.device)
                loss = d3po_loss(log_ratio[:n], log_ratio[n:], config.beta, config.clip).mean()
                if not weight:  # a stand-in: no value may reach the all-reduce (0 x NaN is NaN)
                    loss = torch.nan_to_num(loss, nan=0.0, posinf=0.0, neginf=0.0) * weight
                accelerator.backward(loss / len(steps))
                if weight:  # a stand-in pair is not a measurement
                    stats.add(loss, preference_accuracy=(log_ratio[:n] > log_ratio[n:]).float().mean())
            stats.record_update(run.optimizer_step())


def train(config: D3POConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    rollout_config = replace(config.rollout, same_noise_per_group=True)  # a pair shares its start noise
    human = None
    if config.labels is not None:  # judged pairs and their stored trajectories
        from align.labels import labelled_transitions, read_labels

        human = read_labels(config.labels)
        stored = {t.step: t for t in labelled_transitions(human, accelerator.device)}
        with torch.no_grad():
            human_cond = adapter.encode(human.prompts, human.info["negative_prompt"], human.info["guidance_scale"])
        schedule = adapter.schedule(config.rollout.num_steps,
                                    latent_shape=adapter.latent_shape(**run.latent_kwargs))
    bar = progress(run, config, "d3po")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        stats, metrics, nfe = TrainLog("preference_accuracy"), {}, 0
        if human is not None:
            # 1. a draw of the judged pairs
            pick = torch.tensor(sorted(rng.sample(range(len(human.winner)),
                                                  min(config.labelled_pairs_per_iteration, len(human.winner)))))
            winner, loser = human.winner[pick], human.loser[pick]
            steps = trained_steps(stored, config.rollout.num_steps, rng, train_last_step=config.train_last_step,
                                  fraction=config.timestep_fraction)
            with run.phase("training"):
                preference_update(run, config, stored, steps, winner, loser, human_cond, schedule, rollout_config,
                                  stats)
        else:
            batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                                  accelerator.process_index, accelerator.num_processes)
            # 1. pairs from one start noise, scored; the reward decides each pair
            cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration)
            winner, loser = pair_preferences(scores.total.float().cpu(), scores.valid_mask().cpu(),
                                             config.min_reward_gap)
            transitions = {t.step: t for t in result.main_transitions()}
            # 2. the per-step preference loss against the sampling policy, clamped ratios
            steps = trained_steps(transitions, config.rollout.num_steps, rng, train_last_step=config.train_last_step,
                                  fraction=config.timestep_fraction)
            with run.phase("training"):
                preference_update(run, config, transitions, steps, winner, loser, cond, result.schedule,
                                  rollout_config, stats)
            metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                     run.gather(scores.valid_mask()))
            nfe = result.nfe

        # 3. bookkeeping
        metrics.update(stats.metrics())
        metrics["train/pairs"] = float(len(winner))
        end_iteration(run, config, reward, heldout, metrics, nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = D3POConfig
