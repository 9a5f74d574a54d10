"""The rollout engine: one loop drives a step kernel over a topology.

Rows of the batch advance in lockstep through the schedule, so every model call at one step is a
single batch (CFG included) whatever the topology:

- independent trajectories (optionally the same start noise for every member of a group);
- an SDE window inside an ODE run (``sde_steps``: only those steps are stochastic and recorded);
- a tree (``split_steps``): at a split step each row's single model evaluation feeds
  ``branch_factor`` stochastic children, so all nodes of one depth are one batch;
- branches (``branch_steps``): from each main row, at each listed step, ``branches_per_step`` side
  rows leave with the ODE (dense rewards: ODE completion of x_t) or with the SDE (TempFlow: a
  stochastic child) and are then completed to a clean sample by ODE. A branch shares the model
  evaluation of its main row at the step it leaves.

The rollout records, for every stochastic transition, the latents before and after, the mean, std
and log-prob, and which row / prompt it belongs to, and counts model evaluations (NFE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from align.config import ConfigError
from align.sampling.kernels import StepOut, get_kernel
from pipelines.base import Conditioning, ModelAdapter, Schedule

#: the parameter of each kernel that sets its noise level (scaled at split steps)
NOISE_PARAM = {"flow_grpo": "noise_level", "cps": "noise_level", "dance_grpo": "eta", "ddim": "eta"}
DEFAULT_KERNEL_PARAMS = {"flow_grpo": {"noise_level": 0.7}, "cps": {"noise_level": 0.7},
                         "dance_grpo": {"eta": 0.3}, "ddim": {"eta": 1.0}, "ode": {}}


@dataclass
class RolloutConfig:
    num_steps: int = 10
    #: classifier-free guidance scale (null: the model's default)
    guidance_scale: float | None = None
    #: stochastic kernel: flow_grpo, dance_grpo, cps (flow models), ddim (UNet models), or ode
    kernel: str = "flow_grpo"
    #: kernel options, e.g. {noise_level: 0.7} or {eta: 0.3}; merged over the kernel's defaults
    kernel_params: dict = field(default_factory=dict)
    #: steps that use the stochastic kernel (null: all); the others are ODE steps (Fast/Mix windows)
    sde_steps: list[int] | None = None
    #: tree: steps at which every row spawns branch_factor children
    split_steps: list[int] = field(default_factory=list)
    branch_factor: int = 2
    #: multiplies the kernel's noise level at split steps
    split_noise_scale: float = 1.0
    #: per-step multipliers of the kernel's noise level (null: 1 everywhere); depth-varying tree
    #: noise, DenseGRPO's calibrated noise
    step_noise_scales: list[float] | None = None
    #: side branches completed by ODE: the steps they leave from (null: none; "all" via all_branch_steps)
    branch_steps: list[int] | None = None
    #: how a branch leaves its main row: "ode" (dense completion) or "sde" (TempFlow children)
    branch_kernel: str = "ode"
    branches_per_step: int = 1
    #: one start noise per prompt, shared by its group
    same_noise_per_group: bool = False
    #: "mean" (default, as the public implementations) or "sum" over latent elements
    log_prob_reduce: str = "mean"
    #: split model calls into chunks of at most this many rows (null: one call per step)
    max_batch: int | None = None

    def validate(self, num_steps: int | None = None) -> None:
        steps = self.num_steps if num_steps is None else num_steps
        if steps < 1:
            raise ConfigError(f"rollout.num_steps must be >= 1, got {steps}")
        for name in ("sde_steps", "split_steps", "branch_steps"):
            bad = [s for s in (getattr(self, name) or []) if not 0 <= s < steps]
            if bad:
                raise ConfigError(f"rollout.{name} has step {bad[0]} outside 0..{steps - 1}")
        if self.step_noise_scales is not None and len(self.step_noise_scales) != steps:
            raise ConfigError(f"rollout.step_noise_scales has {len(self.step_noise_scales)} entries for {steps} steps")
        if self.branch_factor < 1 or self.branches_per_step < 1:
            raise ConfigError("rollout.branch_factor and rollout.branches_per_step must be >= 1")
        if self.branch_kernel not in ("ode", "sde"):
            raise ConfigError(f"rollout.branch_kernel must be 'ode' or 'sde', got {self.branch_kernel!r}")
        if self.log_prob_reduce not in ("mean", "sum"):
            raise ConfigError(f"rollout.log_prob_reduce must be 'mean' or 'sum', got {self.log_prob_reduce!r}")


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
    branch: bool = False
    #: factor applied to the kernel's noise level (split steps of a tree)
    noise_scale: float = 1.0

    def subset(self, index: Tensor) -> "Transition":
        """The transitions of rows ``index``."""
        return Transition(self.step, self.latents[index], self.next_latents[index], self.mean[index],
                          self.std[index], self.log_prob[index], self.prompt_index[index], self.parent[index],
                          self.rows[index], self.branch, self.noise_scale)


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


def kernel_params(config: RolloutConfig, adapter: ModelAdapter) -> dict:
    params = {**DEFAULT_KERNEL_PARAMS.get(config.kernel, {}), **config.kernel_params}
    if config.kernel == "ddim":
        params.setdefault("prediction_type", adapter.prediction_type)
    return params


def _scaled(params: dict, kernel_name: str, scale: float) -> dict:
    if scale == 1.0 or kernel_name not in NOISE_PARAM:
        return params
    key = NOISE_PARAM[kernel_name]
    return {**params, key: params[key] * scale}


def predict_in_chunks(adapter: ModelAdapter, x: Tensor, t: Tensor, cond: Conditioning, max_batch: int | None,
                      use_checkpoint: bool = False) -> Tensor:
    """``adapter.predict`` over at most ``max_batch`` rows per call (null: one call). ``t`` is one
    timestep for all rows or one per row; ``use_checkpoint`` recomputes activations in backward."""
    def call(x_, t_, c_):
        if use_checkpoint:
            return checkpoint(adapter.predict, x_, t_, c_, use_reentrant=False)
        return adapter.predict(x_, t_, c_)
    if not max_batch or x.shape[0] <= max_batch:
        return call(x, t, cond)
    per_row = t.ndim > 0 and t.shape[0] == x.shape[0]
    outs = []
    for start in range(0, x.shape[0], max_batch):
        rows = torch.arange(start, min(start + max_batch, x.shape[0]))
        outs.append(call(x[rows], t[rows] if per_row else t, cond.select(rows)))
    return torch.cat(outs)


def rollout(adapter: ModelAdapter, cond: Conditioning, config: RolloutConfig, *, group_size: int = 1,
            generator: torch.Generator | None = None, initial_noise: Tensor | None = None,
            grad_steps=(), checkpoint_grad_steps: bool = False, height: int | None = None,
            width: int | None = None, num_frames: int | None = None) -> Rollout:
    """Sample ``group_size`` trajectories for each prompt row of ``cond`` over the configured topology.

    ``grad_steps``: steps whose model call keeps gradients (reward backprop); every other step runs
    without a graph, which also detaches the latent chain before them. ``checkpoint_grad_steps``
    recomputes those calls in the backward pass (non-reentrant checkpointing) to save memory.
    """
    config.validate()
    num_prompts = len(cond)
    rows = num_prompts * group_size
    shape = adapter.latent_shape(height, width, num_frames)
    schedule = adapter.schedule(config.num_steps, latent_shape=shape)
    sde = get_kernel(config.kernel, schedule.kind)
    ode = get_kernel("ode", schedule.kind)
    params = kernel_params(config, adapter)
    ode_params = {"prediction_type": adapter.prediction_type} if schedule.kind == "ddpm" else {}
    num_steps = len(schedule)
    config.validate(num_steps)
    if config.kernel == "ode":
        sde_steps = set()
    else:
        sde_steps = set(range(num_steps)) if config.sde_steps is None else set(config.sde_steps)
    split_steps, branch_steps = set(config.split_steps), set(config.branch_steps or [])
    step_scales = config.step_noise_scales or [1.0] * num_steps
    grad_steps = set(grad_steps)

    main_prompt = torch.arange(num_prompts).repeat_interleave(group_size)
    if initial_noise is None:
        count = num_prompts if config.same_noise_per_group else rows
        initial_noise = adapter.initial_noise(count, generator, height=height, width=width,
                                              num_frames=num_frames)
        if config.same_noise_per_group:
            initial_noise = initial_noise.repeat_interleave(group_size, dim=0)
    if initial_noise.shape != (rows, *shape):
        raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {(rows, *shape)}")
    x = initial_noise.float().to(adapter.device)
    nfe0, rows0 = adapter.nfe, adapter.transformer_rows

    branch_x = x.new_zeros((0, *shape))
    branch_prompt = torch.zeros(0, dtype=torch.long)
    origins, branch_parents = [], []
    branch_count = 0  # branches are appended in creation order, so a branch's row is its id
    transitions: list[Transition] = []
    lineage: list[Tensor] = []
    row_cond, row_prompt = None, None

    for i in range(num_steps):
        level, level_next = schedule.levels[i], schedule.levels[i + 1]
        n_main = x.shape[0]
        all_x = torch.cat([x, branch_x]) if len(branch_x) else x
        all_prompt = torch.cat([main_prompt, branch_prompt])
        if row_cond is None or not torch.equal(row_prompt, all_prompt):  # rows changed: re-select
            row_cond, row_prompt = cond.select(all_prompt), all_prompt
        with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
            model_out = predict_in_chunks(adapter, all_x, schedule.timesteps[i], row_cond,
                                          config.max_batch, checkpoint_grad_steps and i in grad_steps)
            main_out, branch_out = model_out[:n_main], model_out[n_main:]

            # main rows: a split step repeats each row branch_factor times before the kernel
            factor = config.branch_factor if i in split_steps else 1
            parent = torch.arange(n_main).repeat_interleave(factor)
            x_src = x[parent] if factor > 1 else x
            v_src = main_out[parent] if factor > 1 else main_out
            if i in sde_steps:
                scale = step_scales[i] * (config.split_noise_scale if i in split_steps else 1.0)
                out = sde(x_src, v_src, level, level_next, generator=generator,
                          reduce=config.log_prob_reduce, **_scaled(params, config.kernel, scale))
                transitions.append(Transition(i, x_src.detach(), out.prev_sample.detach(), out.mean.detach(),
                                              out.std.detach(), out.log_prob.detach(), main_prompt[parent],
                                              parent, torch.arange(len(parent)), noise_scale=scale))
            else:
                out = ode(x_src, v_src, level, level_next, **ode_params)

            # branches leaving the main rows at this step share the main rows' model evaluation
            new_branches = None
            if i in branch_steps:
                src = torch.arange(n_main).repeat_interleave(config.branches_per_step)
                if config.branch_kernel == "sde":
                    b = sde(x[src], main_out[src], level, level_next, generator=generator,
                            reduce=config.log_prob_reduce, **_scaled(params, config.kernel, step_scales[i]))
                    ids = torch.arange(branch_count, branch_count + len(src))
                    transitions.append(Transition(i, x[src].detach(), b.prev_sample.detach(), b.mean.detach(),
                                                  b.std.detach(), b.log_prob.detach(), main_prompt[src], src,
                                                  ids, branch=True, noise_scale=step_scales[i]))
                else:
                    b = ode(x[src], main_out[src], level, level_next, **ode_params)
                new_branches = (b.prev_sample, main_prompt[src], src)
            # live branches continue by ODE
            if len(branch_x):
                branch_x = ode(branch_x, branch_out, level, level_next, **ode_params).prev_sample
            if new_branches is not None:
                bx, bp, src = new_branches
                branch_count += len(src)
                branch_x = torch.cat([branch_x, bx])
                branch_prompt = torch.cat([branch_prompt, bp])
                origins.append(torch.full((len(src),), i))
                branch_parents.append(src)

        x = out.prev_sample
        main_prompt = main_prompt[parent]
        lineage.append(parent)

    result = Rollout(x, main_prompt, transitions, lineage, schedule, adapter.nfe - nfe0,
                     adapter.transformer_rows - rows0, initial_noise)
    if branch_count:
        result.branch_samples = branch_x
        result.branch_origin = torch.cat(origins)
        result.branch_parent = torch.cat(branch_parents)
        result.branch_prompt_index = branch_prompt
    return result


def rescore(adapter: ModelAdapter, transition: Transition, cond: Conditioning, schedule: Schedule,
            config: RolloutConfig, *, share_parents: bool = False) -> StepOut:
    """Log-prob of a stored transition under the adapter's current weights (the PPO ratio's
    numerator). With unchanged weights and the same batch it equals the recorded log-prob exactly.

    ``share_parents``: rows with the same parent (siblings of a tree, which leave the same latents)
    share one model evaluation, as in the rollout; with all rows of a step this repeats the rollout's
    batch and its log-probs exactly."""
    i = transition.step
    latents, prompt_index = transition.latents, transition.prompt_index
    if share_parents:  # evaluate the first row of each parent, then give every sibling its output
        unique, inverse = torch.unique(transition.parent, return_inverse=True)
        position = torch.arange(len(inverse), device=inverse.device)
        first = torch.full((len(unique),), len(inverse), dtype=torch.long,
                           device=inverse.device).scatter_reduce(0, inverse, position, "amin")
        latents, prompt_index = latents[first], prompt_index[first]
    model_out = predict_in_chunks(adapter, latents, schedule.timesteps[i], cond.select(prompt_index),
                                  config.max_batch)
    if share_parents:
        model_out = model_out[inverse]
    kernel = get_kernel(config.kernel, schedule.kind)
    return kernel(transition.latents, model_out, schedule.levels[i], schedule.levels[i + 1],
                  prev_sample=transition.next_latents, reduce=config.log_prob_reduce,
                  **_scaled(kernel_params(config, adapter), config.kernel, transition.noise_scale))
