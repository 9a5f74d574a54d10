"""What a rollout records: every stochastic :class:`Transition` (latents before and after, mean, std,
log-prob, rows and prompts, kernel and parameters), the :class:`StepView` its hooks see, and the
:class:`Rollout` result with its tree bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from pipelines.base import Schedule


@dataclass
class Transition:
    """A batch of recorded stochastic steps ``step``: latents -> next_latents."""

    step: int
    latents: Tensor
    next_latents: Tensor
    mean: Tensor
    std: Tensor  # (N,)
    log_prob: Tensor  # (N,)
    prompt_index: Tensor  # (N,) row of the prompt batch
    #: main transitions: index of the source row among the main rows before the step;
    #: branch transitions: the same, for the main row the branch left from
    parent: Tensor
    #: main transitions: row index among main rows after the step; branch: index into branch_samples
    rows: Tensor
    #: the kernel the step was sampled with and its parameters (noise scale applied, log-prob
    #: reduction included): re-scoring uses exactly these (no default: every transition says)
    kernel: str
    params: dict
    branch: bool = False
    #: factor applied to the kernel's noise level (split steps of a tree, per-step multipliers)
    noise_scale: float = 1.0
    #: the rollout's unconditional CFG prediction for these rows (``rollout.cfg_split``), else None
    uncond: Tensor | None = None
    #: the rollout's guided model output for these rows with its autograd graph (``keep_policy_graph``):
    #: a backward through it gives the weights' gradient without calling the model again; usable
    #: once, before the weights change
    policy_out: Tensor | None = None
    #: the expert network that predicted this step (``adapter.expert_at``; None: a single network);
    #: re-scoring pins it
    expert: int | None = None

    def subset(self, index: Tensor) -> "Transition":
        """The transitions of rows ``index``."""
        return Transition(self.step, self.latents[index], self.next_latents[index], self.mean[index],
                          self.std[index], self.log_prob[index], self.prompt_index[index], self.parent[index],
                          self.rows[index], self.kernel, self.params, self.branch, self.noise_scale,
                          None if self.uncond is None else self.uncond[index],
                          None if self.policy_out is None else self.policy_out[index.to(self.policy_out.device)],
                          self.expert)


@dataclass
class StepView:
    """What a hook sees of one step's main rows: the latents before the step ``x``, the timestep,
    the noise levels, the model output, the clean-sample estimate ``x0_hat`` and each row's prompt;
    for a ``select`` hook also ``next_x``, the rows after the step (split children included)."""

    step: int
    x: Tensor
    timestep: Tensor
    level: Tensor
    level_next: Tensor
    model_out: Tensor
    x0_hat: Tensor
    prompt_index: Tensor
    next_x: Tensor | None = None


#: ``drift(view) -> mean shift`` (shape of view.x) or None for no shift at this step
DriftHook = Callable[[StepView], "Tensor | None"]
#: ``select(view) -> index`` into view.next_x of the rows to keep (repeats copy a row), or None
SelectHook = Callable[[StepView], "Tensor | None"]


@dataclass
class Rollout:
    samples: Tensor  # final latents of the main rows (leaves of a tree)
    prompt_index: Tensor  # (M,) prompt of each final main row
    transitions: list[Transition]
    #: main-row lineage: lineage[i][r] = index, before step i, of the row r after step i
    lineage: list[Tensor]
    schedule: Schedule
    nfe: int  # per-sample model evaluations (a CFG pair counts once)
    transformer_rows: int  # rows the network actually processed (CFG doubles them)
    initial_noise: Tensor
    #: the last step's clean-sample estimate x0_hat of every final main row (BranchGRPO's reference
    #: decodes its leaves from it)
    final_x0_hat: Tensor | None = None
    #: the decoded final samples, when the caller decoded them (trainers: sample_and_score)
    pixels: Tensor | None = None
    branch_samples: Tensor | None = None  # clean completions of the branches
    branch_origin: Tensor | None = None  # (Nb,) the step each branch left from
    branch_parent: Tensor | None = None  # (Nb,) main row (before that step) it left from
    branch_prompt_index: Tensor | None = None

    def ancestor(self, step: int) -> Tensor:
        """For each final main row, the index of its ancestor among the main rows before ``step``."""
        index = torch.arange(self.samples.shape[0])
        for parents in reversed(self.lineage[step:]):
            index = parents[index]
        return index

    def main_transitions(self, steps=None) -> list[Transition]:
        keep = None if steps is None else set(steps)
        return [t for t in self.transitions if not t.branch and (keep is None or t.step in keep)]

    def stacked(self, steps=None) -> dict[str, Tensor]:
        """Main transitions of a topology without splits as (M, K, ...) tensors (K = steps kept)."""
        chosen = self.main_transitions(steps)
        if any(len(t.rows) != self.samples.shape[0] for t in chosen):
            raise ValueError("stacked() needs a rollout without splits; use transitions for trees")
        if not chosen:
            raise ValueError("the rollout recorded no stochastic transition at those steps")
        return {
            "latents": torch.stack([t.latents for t in chosen], 1),
            "next_latents": torch.stack([t.next_latents for t in chosen], 1),
            "log_probs": torch.stack([t.log_prob for t in chosen], 1),
            "steps": torch.tensor([t.step for t in chosen]),
        }
