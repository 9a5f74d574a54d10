"""Diffusion-DPO (epsilon / v-prediction models) and Flow-DPO (velocity models): preference pairs,
offline from a JSONL file or online from the model's own samples.

One iteration reads top to bottom:
pairs (winner w, loser l, prompt) -> clean latents (offline: the images encoded by the model's VAE;
online: the best and worst of a sampled group of each prompt) -> one t and one noise eps shared by
the pair -> per-sample errors of the model and the reference, e = ||f(x_t, t) - target||^2 / D
(target: eps, v, or the velocity eps - x0) -> inside = -(beta / 2) [(e_w - e_l) - (e_ref_w - e_ref_l)],
loss = -log sigmoid(inside) -> optimizer step.

At model = reference the loss is ln 2. The loss can look flat while training works: watch
``train/implicit_accuracy`` (fraction of pairs with inside > 0) and ``train/reward_margin``.

Features and their fields: offline pairs (``pairs``: the JSONL format of docs/preference_pairs.md),
relabelling of pairs by the trained reward (``relabel``), online pairs (``pairs`` null), the
reference (``ref_refresh_every``: null, the base model with the LoRA off; N, a copy of the trained
weights refreshed every N optimizer updates), timesteps (``denoising.t_distribution``: uniform,
or logit_normal as Flow-DPO). Works on images and videos.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.config import ConfigError
from align.losses import diffusion_dpo_loss
from align.prompts import iteration_generator, prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.denoising import (DenoisingConfig, denoising_errors, draw_levels, encode_image_files,
                                      training_schedule)
from align.trainers.scoring import sample_and_score
from align.trainers.snapshot import SnapshotState, checkpointed_snapshot


@dataclass
class DPOConfig(TrainerConfig):
    trainer: str = "dpo"
    #: online pairs are sampled with this rollout (any kernel)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="ode"))
    #: offline pairs: a JSONL file of {"prompt", "chosen", "rejected", "label"?} (docs/preference_pairs.md);
    #: null: online pairs, the best and worst of group_size samples of each prompt
    pairs: str | None = None
    #: offline: pairs per optimizer update
    pairs_per_iteration: int = 8
    #: offline: re-rank every pair by the trained reward (ties dropped)
    relabel: bool = False
    #: the convention WITH the 1/2: loss = -log sigmoid(-(beta / 2) (d_model - d_ref)); Diffusion-DPO's
    #: 5000 here is 2500 without the 1/2; Flow-DPO uses about 100 (null: 5000 for epsilon / v models,
    #: 100 for flow models)
    beta: float | None = None
    #: the reference: null = the base model (LoRA off); N = a copy of the trained weights refreshed
    #: every N optimizer updates (online DPO)
    ref_refresh_every: int | None = None
    #: noise draws (t, eps) per pair in one update
    t_per_pair: int = 1
    #: the training levels t, one per pair shared by its winner and loser: uniform, or logit_normal (Flow-DPO)
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    #: online pairs: samples per prompt, its best and worst by the reward forming the pair (4, not the shared
    #: 8: a pair uses only two of them); offline pairs: unused
    group_size: int = 4


@dataclass
class Pair:
    prompt: str
    chosen: Path
    rejected: Path


def label_row_as_pair(row: dict) -> dict | None:
    """A judged row of ``align label``'s pairs.jsonl ({"prompt", "a", "b", "preferred"}) as a pair row
    ({"prompt", "chosen", "rejected"}); None for a tie or an unjudged pair (dropped, as ties are)."""
    preferred = row["preferred"]
    if preferred not in ("a", "b", "tie", None):
        raise ValueError(f"preferred must be one of a, b, tie or null, got {preferred!r}")
    if preferred in ("tie", None):
        return None
    other = "b" if preferred == "a" else "a"
    return {"prompt": row["prompt"], "chosen": row[preferred], "rejected": row[other]}


def read_pairs(path: str) -> list[Pair]:
    """The pairs of a JSONL file: one {"prompt", "chosen", "rejected", "label"?} object per line;
    image paths are relative to the file's folder; label 1 (default) prefers chosen, 0 prefers
    rejected, 0.5 is a tie (dropped). The pairs.jsonl of an ``align label`` folder, judged, reads
    too: {"prompt", "a", "b", "preferred"} rows (ties and unjudged pairs dropped). A bad line or a
    missing image is a ConfigError naming the file, the line and what is wrong."""
    pairs = []
    folder = Path(path).parent
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            row = json.loads(line)
            if "preferred" in row and "chosen" not in row:  # align label's row
                row = label_row_as_pair(row)
                if row is None:
                    continue
            prompt, chosen, rejected = str(row["prompt"]), folder / row["chosen"], folder / row["rejected"]
            label = float(row.get("label", 1))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{where}: expected a JSON object with prompt, chosen, rejected (and an optional "
                              f"label): {err}") from None
        for image in (chosen, rejected):
            if not image.is_file():
                raise ConfigError(f"{where}: image not found: {image}")
        if label not in (0.0, 0.5, 1.0):
            raise ConfigError(f"{where}: label must be 1 (chosen preferred), 0 (rejected preferred) or 0.5 (tie), "
                              f"got {label}")
        if label == 0.5:
            continue
        pairs.append(Pair(prompt, chosen, rejected) if label == 1 else Pair(prompt, rejected, chosen))
    if not pairs:
        raise ConfigError(f"{path}: no preference pairs (ties and unjudged pairs are dropped)")
    return pairs


def check_config(config: DPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    config.denoising.validate()
    if config.pairs is not None:
        if not Path(config.pairs).is_file():
            raise ConfigError(f"pairs: file not found: {config.pairs}")
        read_pairs(config.pairs)
    elif config.group_size < 2:
        raise ConfigError("group_size must be >= 2: online pairs are the best and worst of a group")
    if config.beta is not None and config.beta <= 0:
        raise ConfigError(f"beta must be > 0, got {config.beta}")
    for key in ("pairs_per_iteration", "t_per_pair"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    if config.ref_refresh_every is not None and config.ref_refresh_every < 1:
        raise ConfigError(f"ref_refresh_every must be >= 1 (or null), got {config.ref_refresh_every}")


def default_beta(config: DPOConfig, schedule_kind: str) -> float:
    return config.beta if config.beta is not None else (100.0 if schedule_kind == "flow" else 5000.0)


def best_and_worst(scores: torch.Tensor, valid: torch.Tensor, groups: torch.Tensor) -> tuple[list[int], list[int]]:
    """Per group, the row of the highest and of the lowest scored reward (groups whose scored rows
    are all equal, or fewer than 2, give no pair)."""
    winners, losers = [], []
    for g in groups.unique().tolist():
        rows = ((groups == g) & valid.bool()).nonzero().flatten()
        if len(rows) < 2:
            continue
        values = scores[rows]
        if float(values.max()) == float(values.min()):
            continue
        winners.append(int(rows[values.argmax()]))
        losers.append(int(rows[values.argmin()]))
    return winners, losers


def offline_batch(run, config: DPOConfig, pairs: list[Pair], reward, iteration: int):
    """(winner latents, loser latents, prompts) of this iteration's pairs (a fresh order per pass),
    the images fitted to the run's size; ``relabel`` re-ranks each pair by the reward (ties and
    unscored pairs dropped)."""
    from rewards.media import load_sample

    adapter = run.adapter
    processes, process = run.accelerator.num_processes, run.accelerator.process_index
    per_pass = max(1, len(pairs) // (config.pairs_per_iteration * processes))  # each process its own pairs
    order = list(range(len(pairs)))
    random.Random(f"{config.run.seed}-pass-{iteration // per_pass}").shuffle(order)
    start = ((iteration % per_pass) * processes + process) * config.pairs_per_iteration
    chosen = [pairs[order[(start + k) % len(pairs)]] for k in range(config.pairs_per_iteration)]
    prompts = [p.prompt for p in chosen]
    winners, losers = [p.chosen for p in chosen], [p.rejected for p in chosen]
    if config.relabel:
        with torch.no_grad():  # one image at a time: the files may differ in size
            scored = [reward(load_sample(p)[None].to(adapter.device), [q]) for p, q in zip(winners, prompts)]
            scored_l = [reward(load_sample(p)[None].to(adapter.device), [q]) for p, q in zip(losers, prompts)]
        kept_w, kept_l, kept_p = [], [], []
        for a, b, q, ra, rb in zip(winners, losers, prompts, scored, scored_l):
            if not (bool(ra.valid_mask()[0]) and bool(rb.valid_mask()[0])) or float(ra.total[0]) == float(rb.total[0]):
                continue
            first = float(ra.total[0]) > float(rb.total[0])
            kept_w.append(a if first else b)
            kept_l.append(b if first else a)
            kept_p.append(q)
        winners, losers, prompts = kept_w, kept_l, kept_p
    if not prompts:
        return None
    return (encode_image_files(adapter, winners, run.latent_kwargs), encode_image_files(adapter, losers, run.latent_kwargs),
            prompts)


def train(config: DPOConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter, SnapshotState())  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    schedule = training_schedule(adapter, config.denoising, run.latent_kwargs)
    beta = default_beta(config, schedule.kind)
    pairs = read_pairs(config.pairs) if config.pairs is not None else None
    reference = None
    if config.ref_refresh_every is not None:  # the reference snapshot lives in the checkpointed state
        reference = checkpointed_snapshot(run)

    bar = progress(run, config, "dpo")
    for iteration in bar:
        # training draws (t, noise): independent of the rollout's stream
        generator = iteration_generator(config.run.seed, iteration, accelerator.process_index, "train")
        nfe_start, stats, scores = adapter.nfe, TrainLog("implicit_accuracy", "reward_margin"), None

        # 1. pairs: offline from the file, online the best and worst sample of each prompt's group
        if pairs is not None:
            batch = offline_batch(run, config, pairs, reward, iteration)
        else:
            batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                                  accelerator.process_index, accelerator.num_processes)
            _, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout, iteration)
            winners, losers = best_and_worst(scores.total.float().cpu(), scores.valid_mask().cpu(),
                                             result.prompt_index.cpu())
            batch = None
            if winners:
                batch = (result.samples[winners].float(), result.samples[losers].float(),
                         [batch_prompts[int(result.prompt_index[i])] for i in winners])

        # 2. the DPO loss at a t and noise shared within each pair
        with run.phase("training"), run.accumulate():
            if batch is not None:
                w, lo, pair_prompts = batch
                n = len(pair_prompts)
                with accelerator.autocast():
                    cond = adapter.encode(pair_prompts * 2, guidance_scale=1.0)
                    for _ in range(config.t_per_pair):
                        index = draw_levels(schedule, n, config.denoising, generator).repeat(2)
                        noise = torch.randn(w.shape, generator=generator).repeat(2, *[1] * (w.ndim - 1))
                        x0 = torch.cat([w, lo])
                        # the reference first: a swapped-in snapshot writes the weights in place,
                        # which must not happen between the model's forward and its backward
                        with torch.no_grad(), (reference.swapped() if reference is not None
                                               else adapter.disable_adapter()):
                            ref_errors = denoising_errors(adapter, x0, cond, schedule, index, noise)
                        errors = denoising_errors(adapter, x0, cond, schedule, index, noise)
                        pair_loss, inside = diffusion_dpo_loss(errors[:n], errors[n:], ref_errors[:n], ref_errors[n:],
                                                               beta)
                        loss = pair_loss.mean() / config.t_per_pair
                        accelerator.backward(loss)  # per draw: the next reference pass may swap weights
                        stats.add(loss * config.t_per_pair, implicit_accuracy=(inside > 0).float().mean(),
                                  reward_margin=inside.mean().detach())
                stats.record_update(run.optimizer_step())
        if reference is not None and stats.updates and run.state.updates % config.ref_refresh_every == 0:
            reference.update(0.0)  # the reference catches up with the trained weights

        # 3. bookkeeping
        metrics = {} if scores is None else reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                                           run.gather(scores.valid_mask()))
        metrics.update(stats.metrics())
        metrics["train/pairs"] = float(0 if batch is None else len(batch[2]))
        end_iteration(run, config, reward, heldout, metrics, adapter.nfe - nfe_start)
    return finish_run(config, run, reward, heldout)


CONFIG = DPOConfig
