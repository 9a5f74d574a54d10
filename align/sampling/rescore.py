"""Re-scoring a stored transition under the current weights: the numerator of every PPO ratio and
of the preference trainers' step log-ratios, with the kernel, parameters, expert and topology
bookkeeping the rollout recorded (so unchanged weights give the recorded log-prob exactly)."""

from __future__ import annotations

import torch

from align.sampling.kernels import StepOut, kernel_spec
from align.sampling.records import Transition
from align.sampling.rollout import RolloutConfig, predict_in_chunks
from align.sampling.triton_step import fused_or_reference
from pipelines.base import Conditioning, ModelAdapter, Schedule


def rescore(adapter: ModelAdapter, transition: Transition, cond: Conditioning, schedule: Schedule,
            config: RolloutConfig | None = None, *, share_parents: bool = False, cfg_grad: str = "full",
            reuse_uncond: bool = False) -> StepOut:
    """Log-prob of a stored transition under the adapter's current weights (the PPO ratio's
    numerator), with the kernel and parameters the transition was sampled with (``config`` is read
    for ``max_batch``, ``fused_step`` and ``cfg_split``). With unchanged weights and the same batch it
    equals the recorded log-prob exactly.

    ``share_parents``: rows with the same parent (siblings of a tree, which leave the same latents)
    share one model evaluation, as in the rollout; with all rows of a step this repeats the rollout's
    batch and its log-probs exactly. ``cfg_grad``: "cond_only" detaches the unconditional CFG branch
    (the Flow-GRPO reference's training gradient), "full" differentiates both. ``reuse_uncond``: the
    weights are the rollout's (no update since), so the unconditional prediction the rollout kept
    (``rollout.cfg_split``) is used as it is; only "cond_only" may (it carries no gradient). With
    ``reuse_uncond`` a transition that kept its graph (``policy_out``) is not re-scored at all: the
    kernel runs on the rollout's own model output, graph included."""
    i = transition.step
    kernel = fused_or_reference(transition.kernel, kernel_spec(transition.kernel).resolve(schedule.kind),
                                config.fused_step if config is not None else "auto")
    if reuse_uncond and transition.policy_out is not None:
        return kernel(transition.latents, transition.policy_out, schedule.levels[i], schedule.levels[i + 1],
                      prev_sample=transition.next_latents, **transition.params)
    latents, prompt_index, uncond = transition.latents, transition.prompt_index, transition.uncond
    if not reuse_uncond or cfg_grad != "cond_only":
        uncond = None
    if share_parents:  # evaluate the first row of each parent, then give every sibling its output
        unique, inverse = torch.unique(transition.parent, return_inverse=True)
        position = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((len(unique),), len(inverse), dtype=torch.long,
                           device=inverse.device).scatter_reduce(0, inverse, position, "amin")
        latents, prompt_index = latents[first], prompt_index[first]
        uncond = None if uncond is None else uncond[first.to(uncond.device)]
    with adapter.pinned_expert(transition.expert):
        model_out = predict_in_chunks(adapter, latents, schedule.timesteps[i], cond.select(prompt_index),
                                      config.max_batch if config is not None else None, cfg_grad=cfg_grad,
                                      cfg_split=config is not None and config.cfg_split, uncond=uncond)
    if share_parents:
        model_out = model_out[inverse]
    return kernel(transition.latents, model_out, schedule.levels[i], schedule.levels[i + 1],
                  prev_sample=transition.next_latents, **transition.params)
