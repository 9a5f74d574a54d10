"""Reward backprop: the gradient of a differentiable reward, through the decode and the denoising
chain, into the LoRA (or full) weights -- AlignProp, DRaFT-K, DRaFT-LV and ReFL in one recipe.

One iteration reads top to bottom:
prompts -> ``mode`` picks the steps that keep gradients -> rollout (those steps' model calls and
the latent chain after them keep their graph, each call checkpointed: ``checkpoint_steps``) ->
decode with gradient -> differentiable reward r -> loss(r) (``loss``: -r, 1 - r, |r - target|,
ReLU(margin - r)) averaged over the scored samples (+ ``regularizer_weight`` x the ordinary
denoising loss on data, ReFL's regulariser) -> backward -> optimizer step.

Modes (``mode``):
- ``draft``: gradients through the last ``truncation_steps`` steps (DRaFT-K; K = 1 works best).
- ``alignprop``: ONE random cut per rollout (``cut_distribution``: uniform over the steps,
  gaussian around ``cut_step`` with ``cut_std``, or fixed at ``cut_step``); the steps from the cut
  on keep gradients through the model and the latent chain, earlier ones are detached.
- ``full``: the whole chain.
- ``draft_lv``: sample x0 without gradient, re-noise it ``lv_renoise`` times to the last step's
  noise level and denoise once with gradient each (DRaFT-LV).
- ``refl``: run to a random step t* of the last ``refl_last_fraction`` of the schedule without
  gradient, predict x0_hat in one step with gradient (ReFL).

Features and the fields that turn them on: per-step non-reentrant checkpointing
(``checkpoint_steps``), the data regulariser (``regularizer_weight``; data: ``regularizer_data``, a
JSONL of {"prompt", "image"} lines with paths relative to the file, or null for samples of the
reference model drawn once at the start: prior preservation). Works on flow models and DDPM-family
models (epsilon / v prediction), images and videos. The reward must be differentiable (a config
error names it otherwise).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.config import ConfigError, check_choice
from align.losses import REWARD_LOSSES, noised_and_target, reward_loss
from align.prompts import iteration_generator, prompts_for_iteration
from align.sampling.kernels import x0_hat
from align.sampling.rollout import RolloutConfig, predict_in_chunks, rollout
from align.trainers.checks import check_common
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.denoising import (DenoisingConfig, denoising_errors, draw_levels, encode_image_files,
                                      training_schedule)
from align.trainers.scoring import check_unscored, sample_and_score

MODES = ("draft", "alignprop", "full", "draft_lv", "refl")
CUT_DISTRIBUTIONS = ("uniform", "gaussian", "fixed")


@dataclass
class RewardBackpropConfig(TrainerConfig):
    trainer: str = "reward_backprop"
    #: any kernel; the deterministic ODE is the usual choice
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=10, kernel="ode"))
    #: draft, alignprop, full, draft_lv or refl (module docstring)
    mode: str = "draft"
    #: draft: the last K steps keep gradients
    truncation_steps: int = 1
    #: alignprop: uniform, gaussian (around cut_step) or fixed (at cut_step)
    cut_distribution: str = "gaussian"
    #: alignprop: the first step that keeps gradients (gaussian mean / fixed cut; null: 0.84 of the
    #: steps, AlignProp's step 42 of 50)
    cut_step: int | None = None
    #: alignprop, gaussian: the std of the cut around its centre, in steps (rounded, kept within the steps)
    cut_std: float = 2.0
    #: draft_lv: re-noised copies of each sample, one gradient step each
    lv_renoise: int = 2
    #: refl: t* is drawn from this last fraction of the steps
    refl_last_fraction: float = 0.25
    #: neg (-r), one_minus (1 - r), target (|r - loss_target|) or hinge (ReLU(loss_margin - r))
    loss: str = "neg"
    #: loss target: the reward value the loss |r - loss_target| pulls towards (10: AlignProp's, for the
    #: aesthetic score)
    loss_target: float = 10.0
    #: loss hinge: the margin of ReLU(loss_margin - r), rewards at or above it add no loss (2: ReFL's)
    loss_margin: float = 2.0
    #: multiplies the reward loss (ReFL scales it by 1e-3 on real models)
    loss_scale: float = 1.0
    #: recompute each gradient step's model call in backward (non-reentrant): memory ~flat in K
    checkpoint_steps: bool = True
    #: weight of the ordinary denoising loss on data (0: off; ReFL's regulariser)
    regularizer_weight: float = 0.0
    #: JSONL of {"prompt", "image"} (paths relative to the file); null: reference-model samples
    regularizer_data: str | None = None
    #: reference-model samples drawn at the start as regulariser data when regularizer_data is null
    regularizer_samples: int = 16
    #: the regulariser's training levels
    denoising: DenoisingConfig = field(default_factory=DenoisingConfig)
    #: samples per prompt, each scored with gradient (2, not the shared 8: the loss compares no samples, and
    #: every sample's gradient-carrying steps cost a backward pass)
    group_size: int = 2


def check_config(config: RewardBackpropConfig, adapter=None) -> None:
    from rewards.registry import reward_class

    check_common(config, adapter)
    check_choice("mode", config.mode, MODES)
    check_choice("cut_distribution", config.cut_distribution, CUT_DISTRIBUTIONS)
    check_choice("loss", config.loss, REWARD_LOSSES)
    config.denoising.validate()
    steps = config.rollout.num_steps
    if not 1 <= config.truncation_steps <= steps:
        raise ConfigError(f"truncation_steps must be in 1..{steps}, got {config.truncation_steps}")
    if config.cut_step is not None and not 0 <= config.cut_step < steps:
        raise ConfigError(f"cut_step must be in 0..{steps - 1}, got {config.cut_step}")
    if config.cut_distribution == "fixed" and config.mode == "alignprop" and config.cut_step is None:
        raise ConfigError("cut_distribution fixed needs cut_step")
    if config.lv_renoise < 1:
        raise ConfigError(f"lv_renoise must be >= 1, got {config.lv_renoise}")
    if not 0 < config.refl_last_fraction <= 1:
        raise ConfigError(f"refl_last_fraction must be in (0, 1], got {config.refl_last_fraction}")
    if config.regularizer_weight < 0:
        raise ConfigError(f"regularizer_weight must be >= 0, got {config.regularizer_weight}")
    if config.regularizer_data is not None and not Path(config.regularizer_data).is_file():
        raise ConfigError(f"regularizer_data: file not found: {config.regularizer_data}")
    for i, spec in enumerate(config.rewards):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        name = spec["name"]
        if not reward_class(name).spec_differentiable(spec):
            raise ConfigError(f"rewards[{i}]: reward {name!r} is not differentiable; reward_backprop needs "
                              f"gradients of the reward (`align rewards list` marks the differentiable ones; "
                              f"black-box rewards train with flow_grpo)")


def first_grad_step(config: RewardBackpropConfig, num_steps: int, rng: random.Random) -> int:
    """The first step that keeps gradients: T - K (draft), 0 (full), or alignprop's one cut."""
    if config.mode == "draft":
        return num_steps - config.truncation_steps
    if config.mode == "full":
        return 0
    if config.cut_distribution == "uniform":
        return rng.randrange(num_steps)
    centre = config.cut_step if config.cut_step is not None else round(0.84 * num_steps)
    if config.cut_distribution == "fixed":
        return centre
    return min(num_steps - 1, max(0, round(rng.gauss(centre, config.cut_std))))


def refl_step(config: RewardBackpropConfig, num_steps: int, rng: random.Random) -> int:
    """ReFL's t*: a step of the last ``refl_last_fraction`` of the schedule."""
    first = min(num_steps - 1, max(0, math.ceil((1 - config.refl_last_fraction) * num_steps)))
    return rng.randint(first, num_steps - 1)


def freeze(reward) -> None:
    """No gradient accumulates in the reward's own weights (only the pixels need one)."""
    for value in vars(reward).values():
        if isinstance(value, torch.nn.Module):
            value.requires_grad_(False)
        elif isinstance(value, dict):
            for item in value.values():
                if hasattr(item, "score"):
                    freeze(item)


def one_step_samples(run, config, cond, x, step: int, schedule):
    """x0_hat from latents ``x`` at ``step`` in one model call with gradient (checkpointed)."""
    adapter = run.adapter
    out = predict_in_chunks(adapter, x, schedule.timesteps[step], cond, config.rollout.max_batch,
                            use_checkpoint=config.checkpoint_steps)
    estimate = x0_hat(x, out, schedule.levels[step], schedule.kind, adapter.prediction_type)
    return adapter.apply_condition(estimate, cond)  # image-to-video: the given first frame in place


def read_regularizer_data(path: str) -> tuple[list[str], list[Path]]:
    """(prompts, image paths) of a {"prompt", "image"} JSONL file; a bad line names its number."""
    prompts, images = [], []
    folder = Path(path).parent
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            prompt, image = row["prompt"], folder / row["image"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} line {number}: expected {{\"prompt\", \"image\"}} ({err})") from None
        if not image.is_file():
            raise ConfigError(f"{path} line {number}: image not found: {image}")
        prompts.append(prompt)
        images.append(image)
    if not prompts:
        raise ConfigError(f"{path} has no rows")
    return prompts, images


def regularizer_set(run, config: RewardBackpropConfig, prompts: list[str]):
    """(clean latents, prompts) the regulariser fits: the data file encoded by the model's VAE, or
    samples of the reference model (LoRA off) drawn once with the run's seed."""
    adapter = run.adapter
    if config.regularizer_data is not None:  # fitted to the run's size, encoded in chunks
        data_prompts, paths = read_regularizer_data(config.regularizer_data)
        return encode_image_files(adapter, paths, run.latent_kwargs), data_prompts
    chosen = [prompts[i % len(prompts)] for i in range(config.regularizer_samples)]
    with run.sampling(), adapter.disable_adapter():
        cond = adapter.encode(chosen, config.negative_prompt, config.rollout.guidance_scale)
        result = rollout(adapter, cond, RolloutConfig(**{**vars(config.rollout), "kernel": "ode", "kernel_params": {}}),
                         generator=iteration_generator(config.run.seed, -1), **run.latent_kwargs)
    return result.samples.float(), chosen


def mean_reward_loss(config: RewardBackpropConfig, outputs: list):
    """``loss_scale`` times the mean of :func:`align.losses.reward_loss` over the scored samples of
    each output (unscored ones weigh 0), averaged over the outputs (draft_lv's re-noised copies)."""
    loss = 0.0
    for out in outputs:
        valid = out.valid_mask().to(out.total.device)
        per_sample = reward_loss(out.total.float(), config.loss, target=config.loss_target, margin=config.loss_margin)
        per_sample = torch.where(valid, per_sample, torch.zeros_like(per_sample))
        loss = loss + config.loss_scale * per_sample.sum() / valid.sum().clamp_min(1) / len(outputs)
    return loss


def data_regularizer(run, config: RewardBackpropConfig, data, schedule, rows: int, generator):
    """The denoising loss of ``rows`` latents drawn from the data set (their prompts, random levels
    and noise): the regulariser that keeps the model near the data it was trained on."""
    latents, data_prompts = data
    pick = torch.randint(len(latents), (rows,), generator=generator)
    with run.accelerator.autocast():
        data_cond = run.adapter.encode([data_prompts[i] for i in pick.tolist()], guidance_scale=1.0)
        errors = denoising_errors(run.adapter, latents[pick], data_cond, schedule,
                                  draw_levels(schedule, len(pick), config.denoising, generator),
                                  torch.randn(latents[pick].shape, generator=generator))
    return errors.mean()


def train(config: RewardBackpropConfig, adapter=None) -> dict[str, float]:
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    freeze(reward)
    num_steps = config.rollout.num_steps
    data = None
    if config.regularizer_weight > 0:
        data = regularizer_set(run, config, prompts)
        train_schedule = training_schedule(adapter, config.denoising, run.latent_kwargs)
    bar = progress(run, config, f"reward_backprop[{config.mode}]")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        generator = iteration_generator(config.run.seed, iteration, accelerator.process_index)
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        nfe_start, stats = adapter.nfe, TrainLog()
        with run.phase("training"), run.accumulate():
            # 1. samples whose pixels carry gradients back to the trained weights
            if config.mode in ("draft", "alignprop", "full"):
                first = first_grad_step(config, num_steps, rng)
                _, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, config.rollout, iteration,
                                                        grad_steps=range(first, num_steps),
                                                        checkpoint_grad_steps=config.checkpoint_steps)
                outputs, grad_calls = [scores], (num_steps - first) * len(result.prompt_index)
                # the rollout drew from its own generator: the regulariser's draws must not replay it
                generator = iteration_generator(config.run.seed, iteration, accelerator.process_index, "train")
            else:
                with run.sampling():
                    cond = adapter.encode(batch_prompts, config.negative_prompt, config.rollout.guidance_scale)
                    row_prompt = torch.arange(len(batch_prompts)).repeat_interleave(config.group_size)
                    row_cond = cond.select(row_prompt)
                    stop = None if config.mode == "draft_lv" else refl_step(config, num_steps, rng)
                    result = rollout(adapter, cond, config.rollout, group_size=config.group_size, generator=generator,
                                     stop_at=stop, **run.latent_kwargs)
                schedule, outputs = result.schedule, []
                copies = config.lv_renoise if config.mode == "draft_lv" else 1
                with accelerator.autocast():
                    for _ in range(copies):
                        if config.mode == "draft_lv":  # x0 re-noised to the last step's level
                            step = num_steps - 1
                            noise = torch.randn(result.samples.shape, generator=generator).to(result.samples.device)
                            level = schedule.levels[step].expand(len(noise))
                            x = noised_and_target(result.samples, noise, level, schedule.kind,
                                                  adapter.prediction_type)[0]
                        else:
                            step, x = stop, result.samples
                        pixels = adapter.decode(one_step_samples(run, config, row_cond, x, step, schedule)
                                                .to(adapter.dtype)).float()
                        outputs.append(reward(pixels, [batch_prompts[i] for i in row_prompt.tolist()]))
                        check_unscored(run, reward, outputs[-1].valid_mask(), iteration)
                grad_calls = copies * len(row_prompt)

            # 2. the reward loss over the scored samples (+ the data regulariser)
            loss = mean_reward_loss(config, outputs)
            if data is not None:
                regularizer = data_regularizer(run, config, data, train_schedule, len(outputs[0].total), generator)
                loss = loss + config.regularizer_weight * regularizer
                stats.add(regularizer=regularizer.detach())
            if torch.is_tensor(loss) and loss.requires_grad:
                accelerator.backward(loss)
                stats.add(loss)
            stats.record_update(run.optimizer_step())

        # 3. bookkeeping: model calls with a backward pass (and their recomputation) count apart
        named = {k: run.gather(torch.cat([o.scores[k].detach().float() for o in outputs])) for k in outputs[0].scores}
        valid = run.gather(torch.cat([o.valid_mask() for o in outputs]))
        metrics = reward_metrics(named, valid)
        metrics.update(stats.metrics())
        metrics.update({"train/backward_calls": float(grad_calls),
                        "train/recomputed_calls": float(grad_calls if config.checkpoint_steps else 0)})
        end_iteration(run, config, reward, heldout, metrics, adapter.nfe - nfe_start)
    return finish_run(config, run, reward, heldout)


CONFIG = RewardBackpropConfig
