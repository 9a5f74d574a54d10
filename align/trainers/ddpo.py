"""DDPO (denoising diffusion policy optimisation) for UNet models: SD 1.x / 2.x and SDXL, with
epsilon or v prediction.

One iteration reads top to bottom:
prompts -> rollout with the DDIM kernel (eta 1, log-probs recorded) -> decode -> reward ->
per-prompt running statistics (each prompt's last ``stats_buffer`` rewards; the batch statistics
while a prompt has fewer than ``stats_min_count``) -> advantages -> for each minibatch, for each
trained step: re-score the stored transition with the current weights, PPO-clip loss -> optimizer
step. Logged: approx-KL = 0.5 E[(logp - logp_old)^2] and the clip fraction, over all minibatches and
(``train/on_policy_*``, the largest over steps) over the first minibatch of each iteration, before any
update: both are exactly 0 when training re-scores a transition exactly as the rollout scored it.

DDPO is for DDPM-family (UNet) models. Flow models (the toy model, SD3, FLUX, Wan) have no DDIM
posterior: on one, the trainer stops with a one-line error that names ``flow_grpo``, the trainer
of the same clipped objective over flow SDE steps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from align.advantages import DDPO_EPS, RunningPromptStats, group_advantages
from align.config import ConfigError
from align.models import ModelConfig
from align.prompts import prompts_for_iteration
from align.sampling.rollout import RolloutConfig
from align.trainers import ppo
from align.trainers.checks import check_common, require_stochastic_kernel
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import PPOConfig, PPOTerm, RolloutBatch
from align.trainers.scoring import sample_and_score


@dataclass
class DDPOConfig(TrainerConfig):
    trainer: str = "ddpo"
    #: a DDPM-family (UNet) model: SD 1.x / 2.x (sd) or SDXL (sdxl); give model.path
    model: ModelConfig = field(default_factory=lambda: ModelConfig(name="sd"))
    #: DDIM with eta = 1 (the DDPO paper samples 50 steps with CFG 5; 20 keeps CPU runs short)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(num_steps=20, kernel="ddim",
                                                                         kernel_params={"eta": 1.0}))
    #: the PPO update: DDPO has no KL term and differentiates both CFG branches; its DDIM steps keep
    #: a real std to the end, so the last step is trained (when alpha_bar ends at 1 it is
    #: deterministic and skipped anyway); a KL weight adds Flow-GRPO's penalty in the exact form
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(kl_form="exact", cfg_grad="full",
                                                             train_last_step=True))
    #: per-prompt running statistics (false: normalise by the statistics of the whole batch)
    per_prompt_stats: bool = True
    #: rewards kept per prompt
    stats_buffer: int = 16
    #: below this many kept rewards a prompt is normalised with the batch statistics
    stats_min_count: int = 16
    #: rollout rows per optimizer step (null: all rows of the iteration; the on-policy ratios are then
    #: exactly 1, while a smaller batch changes the model's float rounding slightly)
    train_batch_size: int | None = None


@dataclass
class DDPOState:
    """What a DDPO run carries from iteration to iteration (saved with each checkpoint)."""

    #: each prompt's last stats_buffer rewards (the per-prompt running statistics)
    prompt_stats: dict = field(default_factory=dict)


def check_config(config: DDPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    require_stochastic_kernel(config.rollout)
    if not 1 <= config.stats_min_count <= config.stats_buffer:
        raise ConfigError(f"need 1 <= stats_min_count <= stats_buffer (a prompt never keeps more than "
                          f"stats_buffer rewards), got {config.stats_min_count} and {config.stats_buffer}")


def check_ddpm_model(model_name: str, schedule_kind: str | None = None) -> None:
    """DDPO needs a DDPM-family (UNet) model: a flow model is a one-line error naming the trainer to
    use. Checked on the adapter's name before it loads, and on its schedule once it has."""
    from pipelines.registry import FLOW_ADAPTERS

    if schedule_kind == "flow" or (schedule_kind is None and model_name in FLOW_ADAPTERS):
        raise ConfigError(f"model.name: ddpo trains DDPM-family (UNet) models (sd, sdxl); {model_name!r} is a "
                          f"flow-matching model: use `align train flow_grpo` (the same clipped objective over "
                          f"flow SDE steps)")


def ddpo_advantages(config: DDPOConfig, stats: RunningPromptStats, prompts: list[str],
                    rewards: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Advantages of the gathered batch, clipped (unscored rows, ``valid`` False, get 0 and stay
    out of every statistic); and the fraction of rows normalised with their prompt's own running
    statistics (the rest used the batch statistics)."""
    rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
    if config.per_prompt_stats:
        advantages = stats.advantages(prompts, rewards, valid=valid)
        own = sum(len(stats.history.get(p, ())) >= stats.min_count for p in prompts) / max(1, len(prompts))
    else:
        # the whole batch as one group, with DDPO's eps (the per-prompt statistics use it too)
        advantages, _ = group_advantages(rewards, torch.zeros_like(rewards, dtype=torch.long), eps=DDPO_EPS,
                                         clip=None, valid=valid)
        own = 0.0
    return advantages.clamp(-config.ppo.adv_clip, config.ppo.adv_clip), float(own)


def train(config: DDPOConfig, adapter=None) -> dict[str, float]:
    from accelerate.utils import gather_object

    check_config(config, adapter)
    if adapter is None:  # before anything loads: the adapter's name, or (given) its schedule
        check_ddpm_model(config.model.name)
    else:
        size = {"height": config.model.height, "width": config.model.width, "num_frames": config.model.num_frames}
        check_ddpm_model(adapter.name, adapter.schedule(1, latent_shape=adapter.latent_shape(**size)).kind)
    run, reward, heldout, prompts = start_run(config, adapter, DDPOState())
    adapter, accelerator = run.adapter, run.accelerator
    rollout_config = config.rollout
    # the per-prompt reward buffers live in the checkpointed trainer state (restored on resume);
    # the tracker updates that very dict in place, so every checkpoint holds the current buffers
    stats_tracker = RunningPromptStats(config.stats_buffer, config.stats_min_count)
    stats_tracker.history = run.state.trainer.prompt_stats

    bar = progress(run, config, "ddpo")
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)

        # 1. sample (DDIM, eta 1, log-probs recorded), decode, score
        cond, result, scores, _ = sample_and_score(run, config, reward, batch_prompts, rollout_config, iteration)
        sample_prompts = [batch_prompts[i] for i in result.prompt_index.tolist()]

        # 2. advantages from the gathered batch; every process updates the same statistics
        all_rewards = run.gather(scores.total.float())
        all_prompts = gather_object(sample_prompts) if accelerator.num_processes > 1 else sample_prompts
        all_valid = run.gather(scores.valid_mask())
        advantages, own_stats = ddpo_advantages(config, stats_tracker, all_prompts, all_rewards, all_valid)
        rows = len(sample_prompts)
        local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
        advantages = advantages[local].to(accelerator.device)

        # 3. PPO-clip over the trained steps: ppo.inner_epochs x minibatches, one optimizer step each
        steps = ppo.ppo_steps(config.ppo, result.main_transitions(), len(result.schedule), rng)
        transitions = {t.step: t for t in result.main_transitions(steps)}
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        with run.phase("training"):
            batch_size = config.train_batch_size or rows
            for index in ppo.epoch_minibatches(config.ppo.inner_epochs, rows, batch_size, rng):
                terms = [PPOTerm(transitions[s].subset(index), advantages[index], 1 / len(steps)) for s in steps]
                with run.accumulate():
                    ppo.ppo_backward(run, terms, batch, config.ppo, log)
                    if steps:
                        log.record_update(run.optimizer_step())

        # 4. bookkeeping
        metrics = reward_metrics({**{k: run.gather(v.float()) for k, v in scores.scores.items()},
                                  **({"total": all_rewards} if len(scores.scores) > 1 else {})}, all_valid)
        metrics.update({"advantage/abs_mean": float(advantages.abs().mean()),
                        "stats/per_prompt_fraction": own_stats, "stats/prompts_tracked": len(stats_tracker.history),
                        "train/trained_steps": len(steps)})
        metrics.update(log.metrics())
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = DDPOConfig
