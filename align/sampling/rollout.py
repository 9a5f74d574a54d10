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

Two hooks steer the same loop (no method needs a second sampler):

- ``drift(view) -> mean shift`` for the main rows of a step (guided SDE sampling, reward guidance):
  added to the sample by every kernel, while the recorded mean and log-prob stay those of the
  unguided step, so training on the transitions distils the guidance into the model;
- ``select(view) -> row index`` after a step: keep, drop or copy main rows (test-time pruning,
  branching at a step that moves), seeing the step's x0_hat.

The rollout records, for every stochastic transition, the latents before and after, the mean, std
and log-prob, which row / prompt it belongs to, and the kernel and parameters it was sampled with
(re-scoring uses exactly those), and counts model evaluations (NFE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from align.errors import ConfigError
from align.sampling.kernels import kernel_spec, upcast, x0_hat
from align.sampling.records import DriftHook, Rollout, SelectHook, StepView, Transition
from align.sampling.triton_step import fused_or_reference
from pipelines.base import Conditioning, ModelAdapter


@dataclass
class RolloutConfig:
    #: sampling steps of a rollout: the model's schedule in this many steps, one model evaluation per step
    #: (10: the Flow-GRPO reference's training rollouts on SD3.5-M)
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
    #: tree: children each row spawns at a split step (leaves per start noise: branch_factor ** len(split_steps);
    #: 2 as BranchGRPO)
    branch_factor: int = 2
    #: multiplies the kernel's noise level at split steps
    split_noise_scale: float = 1.0
    #: how split_noise_scale acts: "density" (the kernel's noise parameter is scaled: the recorded
    #: mean, std and log-prob are those of the wider step, a consistent density) or "injected"
    #: (BranchGRPO's reference: only the injected noise is scaled, the recorded mean / std / log-prob
    #: stay the unscaled kernel's, off-policy by design)
    split_noise: str = "density"
    #: per-step multipliers of the kernel's noise level (null: 1 everywhere); depth-varying tree
    #: noise, DenseGRPO's calibrated noise
    step_noise_scales: list[float] | None = None
    #: side branches completed by ODE: the steps they leave from (null: none)
    branch_steps: list[int] | None = None
    #: how a branch leaves its main row: "ode" (dense completion) or "sde" (TempFlow children)
    branch_kernel: str = "ode"
    #: side branches leaving each main row at each of branch_steps (TempFlow: the SDE children compared)
    branches_per_step: int = 1
    #: one start noise per prompt, shared by its group
    same_noise_per_group: bool = False
    #: "mean" (default, as the public implementations) or "sum" over latent elements
    log_prob_reduce: str = "mean"
    #: split model calls into chunks of at most this many rows (null: one call per step)
    max_batch: int | None = None
    #: the fused Triton step with log-prob (flow_grpo, dance_grpo, cps) for steps without gradients:
    #: auto (on CUDA), on (also CPU tensors under TRITON_INTERPRET=1), off (the torch kernels)
    fused_step: str = "auto"
    #: CFG's branches as two model calls instead of one [u; c] batch, and each stochastic step's
    #: unconditional prediction kept with its transition: a "cond_only" re-score then backpropagates
    #: through the conditional rows only, and re-scores before an iteration's first update reuse the
    #: kept prediction instead of recomputing it (same weights, inputs and call: the same values)
    cfg_split: bool = False

    def validate(self, num_steps: int | None = None) -> None:
        kernel_spec(self.kernel).check_params(self.kernel_params)  # unknown names: one line each
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
        if self.split_noise not in ("density", "injected"):
            raise ConfigError(f"rollout.split_noise must be 'density' or 'injected', got {self.split_noise!r}")
        if self.branch_kernel not in ("ode", "sde"):
            raise ConfigError(f"rollout.branch_kernel must be 'ode' or 'sde', got {self.branch_kernel!r}")
        if self.log_prob_reduce not in ("mean", "sum"):
            raise ConfigError(f"rollout.log_prob_reduce must be 'mean' or 'sum', got {self.log_prob_reduce!r}")
        if self.fused_step not in ("auto", "on", "off"):
            raise ConfigError(f"rollout.fused_step must be 'auto', 'on' or 'off', got {self.fused_step!r}")


def kernel_params(config: RolloutConfig, adapter: ModelAdapter) -> dict:
    """The configured kernel's parameters: its registry defaults, then ``rollout.kernel_params``."""
    return kernel_spec(config.kernel).params(config.kernel_params, adapter.prediction_type)


def predict_in_chunks(adapter: ModelAdapter, x: Tensor, t: Tensor, cond: Conditioning, max_batch: int | None,
                      use_checkpoint: bool = False, cfg_grad: str = "full", cfg_split: bool = False,
                      uncond: Tensor | None = None, return_uncond: bool = False):
    """``adapter.predict`` over at most ``max_batch`` rows per call (null: one call). ``t`` is one
    timestep for all rows or one per row; ``use_checkpoint`` recomputes activations in backward;
    ``cfg_grad``, ``cfg_split``, ``uncond`` and ``return_uncond`` as in :meth:`ModelAdapter.predict`."""
    def call(x_, t_, c_, u_):
        kwargs = dict(cfg_grad=cfg_grad, cfg_split=cfg_split, uncond=u_, return_uncond=return_uncond)
        if use_checkpoint:
            return checkpoint(adapter.predict, x_, t_, c_, use_reentrant=False, **kwargs)
        return adapter.predict(x_, t_, c_, **kwargs)
    if not max_batch or x.shape[0] <= max_batch:
        return call(x, t, cond, uncond)
    per_row = t.ndim > 0 and t.shape[0] == x.shape[0]
    outs = []
    for start in range(0, x.shape[0], max_batch):
        rows = torch.arange(start, min(start + max_batch, x.shape[0]))
        outs.append(call(x[rows], t[rows] if per_row else t, cond.select(rows),
                         None if uncond is None else uncond[rows.to(uncond.device)]))
    if not return_uncond:
        return torch.cat(outs)
    parts = [u for _, u in outs]
    return torch.cat([o for o, _ in outs]), None if parts[0] is None else torch.cat(parts)


def rows_with_graph(out: Tensor | None, n_main: int, parent: Tensor) -> Tensor | None:
    """``out[:n_main][parent]`` keeping its graph (the rollout's step body runs without one)."""
    if out is None:
        return None
    with torch.enable_grad():
        return out[:n_main][parent.to(out.device)]


def rollout(adapter: ModelAdapter, cond: Conditioning, config: RolloutConfig, *, group_size: int = 1,
            generator: torch.Generator | None = None, initial_noise: Tensor | None = None,
            grad_steps=(), checkpoint_grad_steps: bool = False, height: int | None = None,
            width: int | None = None, num_frames: int | None = None, drift: DriftHook | None = None,
            select: SelectHook | None = None, stop_at: int | None = None, keep_policy_graph: bool = False,
            cfg_grad: str = "full") -> Rollout:
    """Sample ``group_size`` trajectories for each prompt row of ``cond`` over the configured topology.

    ``grad_steps``: steps whose model call keeps gradients (reward backprop); every other step runs
    without a graph, which also detaches the latent chain before them. ``checkpoint_grad_steps``
    recomputes those calls in the backward pass (non-reentrant checkpointing) to save memory.
    ``drift`` / ``select``: the hooks of the module docstring (main rows only; branches are not
    steered). ``stop_at``: run steps 0 .. stop_at - 1 only; ``samples`` are then the latents before
    step ``stop_at`` (still noisy: ReFL's one-step prediction starts there).
    ``keep_policy_graph``: every stochastic step's model call keeps its graph to the weights (on
    detached latents, with the CFG gradient ``cfg_grad``), stored as ``Transition.policy_out``: the
    PPO pass before the first update backpropagates it instead of re-scoring (Flow-GRPO's
    ``reuse_rollout_graph``). The sampled values are the same; the graphs of all those steps are held
    until the training pass.
    """
    config.validate()
    if keep_policy_graph and (drift is not None or select is not None or grad_steps or config.branch_steps):
        raise ValueError("keep_policy_graph is for plain rollouts: no drift / select hook, grad_steps or branches")
    num_prompts = len(cond)
    rows = num_prompts * group_size
    shape = adapter.latent_shape(height, width, num_frames)
    schedule = adapter.schedule(config.num_steps, latent_shape=shape)
    spec = kernel_spec(config.kernel)
    sde = fused_or_reference(config.kernel, spec.resolve(schedule.kind), config.fused_step)
    # a deterministic solver named as the kernel (DPM-Solver++) takes every step; else the ODE kernel
    ode = sde if not spec.stochastic and spec.schedule_kind != "any" else kernel_spec("ode").resolve(schedule.kind)
    prev_x0, level_prev = None, None  # the main rows' previous step, for multistep solvers
    params = kernel_params(config, adapter)
    ode_params = {"prediction_type": adapter.prediction_type} if schedule.kind == "ddpm" else {}
    num_steps = len(schedule)
    config.validate(num_steps)
    if not spec.stochastic:
        sde_steps = set()
    else:
        sde_steps = set(range(num_steps)) if config.sde_steps is None else set(config.sde_steps)
    split_steps, branch_steps = set(config.split_steps), set(config.branch_steps or [])
    step_scales = config.step_noise_scales or [1.0] * num_steps
    grad_steps = set(grad_steps)

    def recorded_params(scale: float) -> dict:
        return {**spec.scaled(params, scale), "reduce": config.log_prob_reduce}

    main_prompt = torch.arange(num_prompts).repeat_interleave(group_size)
    if initial_noise is None:
        count = num_prompts if config.same_noise_per_group else rows
        initial_noise = adapter.initial_noise(count, generator, height=height, width=width,
                                              num_frames=num_frames)
        if config.same_noise_per_group:
            initial_noise = initial_noise.repeat_interleave(group_size, dim=0)
    if initial_noise.shape != (rows, *shape):
        raise ValueError(f"initial_noise has shape {tuple(initial_noise.shape)}, expected {(rows, *shape)}")
    x = upcast(initial_noise).to(adapter.device)
    # parts the conditioning fixes (image-to-video's first frame) stay in place at every end of the loop
    x = adapter.apply_condition(x, cond.select(main_prompt))
    nfe0, rows0 = adapter.nfe, adapter.transformer_rows

    branch_x = x.new_zeros((0, *shape))
    branch_prompt = torch.zeros(0, dtype=torch.long)
    origins, branch_parents = [], []
    branch_count = 0  # branches are appended in creation order, so a branch's row is its id
    transitions: list[Transition] = []
    lineage: list[Tensor] = []
    row_cond, row_prompt = None, None
    last_x0_hat = None
    if stop_at is not None and not 0 <= stop_at <= num_steps:
        raise ValueError(f"stop_at must be in 0..{num_steps}, got {stop_at}")

    for i in range(num_steps if stop_at is None else stop_at):
        level, level_next = schedule.levels[i], schedule.levels[i + 1]
        n_main = x.shape[0]
        all_x = torch.cat([x, branch_x]) if len(branch_x) else x
        all_prompt = torch.cat([main_prompt, branch_prompt])
        if row_cond is None or not torch.equal(row_prompt, all_prompt):  # rows changed: re-select
            row_cond, row_prompt = cond.select(all_prompt), all_prompt
        keep_graph = keep_policy_graph and i in sde_steps
        with torch.set_grad_enabled(keep_graph or (torch.is_grad_enabled() and i in grad_steps)):
            model_out, uncond_out = predict_in_chunks(adapter, all_x.detach() if keep_graph else all_x,
                                                      schedule.timesteps[i], row_cond, config.max_batch,
                                                      checkpoint_grad_steps and i in grad_steps,
                                                      cfg_grad=cfg_grad if keep_graph else "full",
                                                      cfg_split=config.cfg_split, return_uncond=True)
            policy_out = None
            if keep_graph:  # the rest of the step runs without the graph
                policy_out, model_out = model_out, model_out.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
            if not config.cfg_split:
                uncond_out = None  # the joint call's u is not kept: re-scores recompute it
            main_out, branch_out = model_out[:n_main], model_out[n_main:]
            view = None
            if drift is not None or select is not None:
                estimate = x0_hat(x, main_out, level, schedule.kind, adapter.prediction_type)
                view = StepView(i, x, schedule.timesteps[i], level, level_next, main_out,
                                adapter.apply_condition(estimate, cond.select(main_prompt)), main_prompt)
            shift = drift(view) if drift is not None else None

            # main rows: a split step repeats each row branch_factor times before the kernel
            factor = config.branch_factor if i in split_steps else 1
            parent = torch.arange(n_main).repeat_interleave(factor)
            x_src = x[parent] if factor > 1 else x
            v_src = main_out[parent] if factor > 1 else main_out
            shift_src = shift[parent] if shift is not None and factor > 1 else shift
            if i in sde_steps:
                split_scale = config.split_noise_scale if i in split_steps else 1.0
                injected = config.split_noise == "injected" and split_scale != 1.0
                scale = step_scales[i] * (1.0 if injected else split_scale)
                step_params = recorded_params(scale)
                noise = None
                if injected:  # a wider draw around the unscaled kernel's mean, scored by that kernel
                    noise = split_scale * torch.randn(x_src.shape, generator=generator, device="cpu" if generator
                                                      is None else generator.device).to(x_src.device)
                out = sde(x_src, v_src, level, level_next, generator=generator, mean_shift=shift_src, noise=noise,
                          **step_params)
                transitions.append(Transition(i, x_src.detach(), out.prev_sample.detach(), out.mean.detach(),
                                              out.std.detach(), out.log_prob.detach(), main_prompt[parent],
                                              parent, torch.arange(len(parent)), noise_scale=scale,
                                              kernel=config.kernel, params=step_params,
                                              uncond=None if uncond_out is None else uncond_out[:n_main][parent],
                                              policy_out=rows_with_graph(policy_out, n_main, parent),
                                              expert=adapter.expert_at(schedule.timesteps[i])))
            else:
                history = {"prev_x0": prev_x0[parent] if prev_x0 is not None and factor > 1 else prev_x0,
                           "level_prev": level_prev} if spec.multistep else {}
                out = ode(x_src, v_src, level, level_next, mean_shift=shift_src, **ode_params, **history)

            # branches leaving the main rows at this step share the main rows' model evaluation
            new_branches = None
            if i in branch_steps:
                src = torch.arange(n_main).repeat_interleave(config.branches_per_step)
                if config.branch_kernel == "sde":
                    step_params = recorded_params(step_scales[i])
                    b = sde(x[src], main_out[src], level, level_next, generator=generator, **step_params)
                    ids = torch.arange(branch_count, branch_count + len(src))
                    transitions.append(Transition(i, x[src].detach(), b.prev_sample.detach(), b.mean.detach(),
                                                  b.std.detach(), b.log_prob.detach(), main_prompt[src], src,
                                                  ids, branch=True, noise_scale=step_scales[i],
                                                  kernel=config.kernel, params=step_params,
                                                  uncond=None if uncond_out is None else uncond_out[:n_main][src],
                                                  expert=adapter.expert_at(schedule.timesteps[i])))
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

        if i == num_steps - 1 or spec.multistep:
            last_x0_hat = x0_hat(x_src, v_src, level, schedule.kind, adapter.prediction_type)
            prev_x0, level_prev = last_x0_hat, level
        x = out.prev_sample
        main_prompt = main_prompt[parent]
        if select is not None:
            view.next_x, view.prompt_index = x, main_prompt
            view.x0_hat = view.x0_hat[parent] if factor > 1 else view.x0_hat
            keep = select(view)
            if keep is not None:  # rows after the step are re-indexed, this step's transitions with them
                keep = torch.as_tensor(keep, dtype=torch.long).cpu()
                x, main_prompt, parent = x[keep.to(x.device)], main_prompt[keep], parent[keep]
                if i == num_steps - 1 or spec.multistep:
                    last_x0_hat = prev_x0 = last_x0_hat[keep.to(last_x0_hat.device)]
                for j, t in enumerate(transitions):
                    if t.step == i and not t.branch:
                        kept = t.subset(keep.to(t.rows.device))
                        kept.rows = torch.arange(len(keep))
                        transitions[j] = kept
        lineage.append(parent)

    x = adapter.apply_condition(x, cond.select(main_prompt))
    if last_x0_hat is not None:
        last_x0_hat = adapter.apply_condition(last_x0_hat, cond.select(main_prompt))
    if len(branch_x):
        branch_x = adapter.apply_condition(branch_x, cond.select(branch_prompt))
    result = Rollout(x, main_prompt, transitions, lineage, schedule, adapter.nfe - nfe0,
                     adapter.transformer_rows - rows0, initial_noise, final_x0_hat=last_x0_hat)
    if branch_count:
        result.branch_samples = branch_x
        result.branch_origin = torch.cat(origins)
        result.branch_parent = torch.cat(branch_parents)
        result.branch_prompt_index = branch_prompt
    return result
