"""BranchGRPO and TreeGRPO: GRPO over a tree of denoising trajectories.

Each tree starts from one noise (one row of the prompt batch per tree). At the split steps every node
spawns ``branch_factor`` stochastic children, so 16 leaves of a 20-step run cost 203 model evaluations
instead of 320 (all nodes of one depth are one batch). Only the leaves are scored; credit reaches the
earlier steps through the tree:

* ``variant: branch_grpo`` -- an internal node's reward is its leaves' mean reward (``fusion: mean``)
  or their softmax(log-prob)-weighted mean (``fusion: logp``, log-prob = the leaf's summed
  log-probs on the path below the node); the rewards of the nodes of one depth are normalised within
  their tree: A = (r - mean) / (std + adv_eps), with the reference's unbiased std and eps 1e-8.
* ``variant: tree_grpo`` -- the leaves' rewards are normalised within their tree and a node's
  advantage is the (mean or log-prob weighted) fusion of its leaves' advantages.

Every recorded parent -> child edge (one transition row) is trained with its child's advantage, by
the Flow-GRPO loss (PPO clip + optional KL to the reference). The child of the row at step s is the
row's index after the step; its leaves are those whose ancestor at step s + 1 is that row.

Pruning cuts training cost, never sampling: ``width_keep_fraction`` trains only the edges of the best
(and worst) leaves of each tree, ``prune_depths`` / ``prune_steps`` / ``prune_window`` skip the edges
of some depths or steps.

One iteration: prompts -> trees -> decode leaves -> reward -> node rewards -> advantages per depth ->
for each trained step, re-score the kept edges (one model call per distinct parent, as in the
rollout) -> PPO-clip (+ KL) -> optimizer step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
import torch

from align.config import ConfigError, check_choice
from align.prompts import iteration_generator, prompts_for_iteration
from align.sampling.rollout import RolloutConfig, rollout
from align.trainers import ppo
from align.trainers.checks import check_common, require_stochastic_kernel
from align.trainers.common import TrainLog, end_iteration, finish_run, progress, reward_metrics, start_run
from align.trainers.config import TrainerConfig
from align.trainers.ppo import PPOConfig, PPOTerm, RolloutBatch
from align.trainers.scoring import check_unscored
from align.training.model_setup import LoraSettings
from align.training.optim import OptimConfig
from align.trees import node_targets, width_kept_leaves

VARIANTS = ("branch_grpo", "tree_grpo")


@dataclass
class BranchGRPOConfig(TrainerConfig):
    trainer: str = "branch_grpo"
    #: the tree: splits at steps 0, 3, 6 of 10 with 2 children each -> 8 leaves per tree, 43 model
    #: evaluations per tree instead of 80 (the paper: splits 0, 3, 6, 9 of 20 -> 16 leaves)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(
        num_steps=10, kernel="flow_grpo", guidance_scale=3.0, split_steps=[0, 3, 6], branch_factor=2))
    #: "branch_grpo" (fuse leaf rewards, normalise per depth) or "tree_grpo" (normalise the leaves,
    #: fuse leaf advantages upwards)
    variant: str = "branch_grpo"
    #: trees per prompt in one iteration (each tree has its own root noise)
    trees_per_prompt: int = 2
    #: unused by trees (a tree's leaves are its group: branch_factor ** len(split_steps)); 0, or that
    #: number as a consistency check
    group_size: int = 0
    #: internal-node reward from its leaves: "mean", "logp" (softmax of the leaves' summed path
    #: log-probs below the node) or "logp_edge" (the reference: at every split, a softmax over the
    #: children's one-step edge log-probs, applied recursively from the leaves up)
    fusion: str = "mean"
    #: "logp" / "logp_edge" fusion: softmax(logp / temperature); small values approach the most
    #: likely child
    fusion_temperature: float = 1.0
    #: what a leaf is decoded from: "x0_hat" (the reference: the last step's clean estimate, without
    #: the last step's noise) or "final" (the last step's sample)
    leaf_sample: str = "x0_hat"
    #: the eps of the depth normalisation (r - mean) / (std + adv_eps) (1e-8: the reference's)
    adv_eps: float = 1e-8
    #: that std with n - 1 (true: the reference's unbiased std) or the population std (false)
    adv_unbiased: bool = True
    #: normalise each depth within its "tree", or across all trees of one "prompt"
    adv_group: str = "tree"
    #: divide by the std of the group ("group", as the paper) or of all nodes of that depth in the
    #: batch ("global": a tree whose leaves barely differ gets small advantages, not +-1)
    adv_std: str = "group"
    #: one multiplier per split on the kernel's noise level, applied from that split to the next
    #: (depth-varying noise; needs a per-step noise scale in the rollout engine, see
    #: ``per_step_noise_scale``); null: the kernel's level everywhere (times split_noise_scale at splits)
    depth_noise_scale: list[float] | None = None
    #: width pruning: train only the edges of this fraction of each tree's leaves (1.0: all)
    width_keep_fraction: float = 1.0
    #: which leaves width pruning keeps: "both" (half best, half worst) or "best"
    width_keep: str = "both"
    #: width pruning applies to the leaf-depth edges only (false, as the paper) or to every edge off
    #: the kept leaves' paths (true)
    width_prune_paths: bool = False
    #: depth pruning: depths whose edges are not trained (depth d = edges into the nodes made by the
    #: d-th split, 1-based; 0 = edges before the first split)
    prune_depths: list[int] = field(default_factory=list)
    #: steps whose edges are not trained
    prune_steps: list[int] = field(default_factory=list)
    #: a window of this many depths skipped from training, sliding by one depth every
    #: prune_window_slide_every iterations (null: off)
    prune_window: int | None = None
    #: iterations between moves of the pruning window by one depth (it wraps round to depth 1)
    prune_window_slide_every: int = 10
    #: a toy-sized LoRA, rank 8 and alpha 16 (the shared Flow-GRPO SD3.5-M values: rank 32, alpha 64)
    lora: LoraSettings = field(default_factory=lambda: LoraSettings(rank=8, alpha=16.0))
    #: a toy-sized learning rate, 1e-3 (the shared Flow-GRPO SD3.5-M value: 3e-4)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3))
    #: the PPO update: clip range 1e-3, no KL (BranchGRPO); ppo.inner_epochs passes over the trees
    ppo: PPOConfig = field(default_factory=lambda: PPOConfig(clip_range=1e-3))
    #: trees per optimizer step (null: all trees of the iteration, one step)
    trees_per_update: int | None = None
    #: kept edges per optimizer step, shuffled across steps and trees (the reference: 12, about 37
    #: updates an iteration at 2 trees of 218 edges, so the clip acts); null: trees_per_update. One
    #: process only for now (under DDP every process must make the same number of updates)
    edges_per_update: int | None = None
    #: loss weight of each trained step: "edges" (every edge counts once: deep steps weigh more) or
    #: "steps" (every step counts once)
    step_weighting: str = "edges"


def check_config(config: BranchGRPOConfig, adapter=None) -> None:
    check_common(config, adapter)
    choices = {"variant": VARIANTS, "fusion": ("mean", "logp", "logp_edge"), "adv_group": ("tree", "prompt"),
               "leaf_sample": ("x0_hat", "final"),
               "adv_std": ("group", "global"), "width_keep": ("both", "best"), "step_weighting": ("edges", "steps")}
    for key, valid in choices.items():
        check_choice(key, getattr(config, key), valid)
    if config.ppo.timestep_fraction < 1:
        raise ConfigError("ppo.timestep_fraction: branch_grpo chooses its trained edges by pruning (prune_depths, "
                          "prune_steps, prune_window, width_keep_fraction); leave it 1")
    r = config.rollout
    if not r.split_steps:
        raise ConfigError("a tree needs rollout.split_steps (e.g. [0, 3, 6] of 10 steps)")
    if r.branch_factor < 2:
        raise ConfigError(f"rollout.branch_factor must be >= 2 for a tree, got {r.branch_factor}")
    require_stochastic_kernel(r)  # a deterministic kernel would also make identical children
    if r.sde_steps is not None:
        deterministic = sorted(set(r.split_steps) - set(r.sde_steps))
        if deterministic:
            raise ConfigError(f"split step {deterministic[0]} is not in rollout.sde_steps: its children would be "
                              "identical")
    if r.branch_steps:
        raise ConfigError("rollout.branch_steps (side branches) is not used by tree training; leave it empty")
    leaves = leaves_per_tree(r)
    if config.group_size not in (0, leaves):
        raise ConfigError(f"group_size {config.group_size} does not match the tree's {leaves} leaves "
                          "(branch_factor ** len(split_steps)); set group_size: 0")
    if not 0 < config.width_keep_fraction <= 1:
        raise ConfigError(f"width_keep_fraction must be in (0, 1], got {config.width_keep_fraction}")
    if config.depth_noise_scale is not None:
        if len(config.depth_noise_scale) != len(set(r.split_steps)):
            raise ConfigError(f"depth_noise_scale needs one multiplier per split ({len(set(r.split_steps))}), "
                              f"got {len(config.depth_noise_scale)}")
        if any(m <= 0 for m in config.depth_noise_scale):
            raise ConfigError("depth_noise_scale multipliers must be > 0")
    if config.prune_window is not None and not 1 <= config.prune_window < len(set(r.split_steps)):
        raise ConfigError(f"prune_window must be in 1..{len(set(r.split_steps)) - 1}, got {config.prune_window}")
    if config.edges_per_update is not None and config.trees_per_update is not None:
        raise ConfigError("set one of edges_per_update and trees_per_update, not both")
    from accelerate import PartialState

    if config.edges_per_update and PartialState().num_processes > 1:
        raise ConfigError("edges_per_update runs on one process; under DDP use trees_per_update")
    recorded = set(range(r.num_steps)) if r.sde_steps is None else set(r.sde_steps)
    if not [s for s in recorded if trainable_step(config, s, depth_of_step(r.split_steps, s))]:
        raise ConfigError("no step is left to train after depth pruning and the last-step rule")


# --- the tree's bookkeeping (pure functions) ------------------------------------------------------


def leaves_per_tree(config: RolloutConfig) -> int:
    return config.branch_factor ** len(set(config.split_steps))


def depth_of_step(split_steps, step: int) -> int:
    """Depth of the node an edge at ``step`` leads to: the number of splits at or before it."""
    return sum(1 for s in set(split_steps) if s <= step)


def trainable_step(config: BranchGRPOConfig, step: int, depth: int, iteration: int = 0) -> bool:
    if step == config.rollout.num_steps - 1 and not config.ppo.train_last_step:
        return False
    if step in config.prune_steps or depth in config.prune_depths:
        return False
    return depth not in pruned_window(config, iteration)


def pruned_window(config: BranchGRPOConfig, iteration: int) -> set[int]:
    """The sliding depth-pruning window of this iteration (depths 1..number of splits)."""
    if config.prune_window is None:
        return set()
    depths = len(set(config.rollout.split_steps))
    start = (iteration // config.prune_window_slide_every) % (depths - config.prune_window + 1)
    return set(range(1 + start, 1 + start + config.prune_window))


def per_step_noise_scale(split_steps, num_steps: int, depth_scale) -> list[float]:
    """Depth multipliers (one per split) -> one multiplier per step: split k's multiplier holds from
    step split_k up to the next split; steps before the first split keep 1."""
    splits = sorted(set(split_steps))
    scales = [1.0] * num_steps
    for step in range(num_steps):
        depth = depth_of_step(splits, step)
        if depth:
            scales[step] = float(depth_scale[depth - 1])
    return scales


def rollout_config_with_noise(config: BranchGRPOConfig) -> RolloutConfig:
    """The rollout config with depth-varying noise: one multiplier per step of the kernel's noise
    level (``RolloutConfig.step_noise_scales``), each depth's value from its split step on."""
    r = config.rollout
    if config.depth_noise_scale is None:
        return r
    return replace(r, step_noise_scales=per_step_noise_scale(r.split_steps, r.num_steps, config.depth_noise_scale))


# --- training --------------------------------------------------------------------------------------


def trained_edges(config: BranchGRPOConfig, result, targets: dict, leaf_rewards, leaf_valid,
                  iteration: int) -> tuple[dict, dict]:
    """The edges to train: ``({step: transition}, {step: kept rows})`` of every trainable step (depth
    pruning), each keeping the rows whose node carries signal and, with width pruning, lies on the
    path of a kept leaf (unscored leaves rank at the mean and are never kept)."""
    split_steps = config.rollout.split_steps
    leaf_tree = result.prompt_index.cpu()
    ranked = torch.where(leaf_valid, leaf_rewards, leaf_rewards[leaf_valid].mean() if leaf_valid.any() else 0.0)
    kept_leaves = width_kept_leaves(ranked, leaf_tree, config.width_keep_fraction, config.width_keep) & leaf_valid
    last_depth = len(set(split_steps))
    transitions, edge_rows = {}, {}
    for t in result.main_transitions():
        depth = depth_of_step(split_steps, t.step)
        if not trainable_step(config, t.step, depth, iteration):
            continue
        keep = targets[t.step].keep.clone()
        if config.width_keep_fraction < 1 and (config.width_prune_paths or depth == last_depth):
            on_path = torch.zeros(len(t.rows), dtype=torch.bool)
            on_path[result.ancestor(t.step + 1)[kept_leaves]] = True
            keep &= on_path
        transitions[t.step], edge_rows[t.step] = t, keep
    return transitions, edge_rows


def update_batches(run, config: BranchGRPOConfig, transitions: dict, edge_rows: dict, steps: list[int],
                   num_trees: int, generator: torch.Generator):
    """The kept edges of one pass, split into optimizer updates: ``({step: rows}, {step: weights})``
    per update. ``edges_per_update``: all kept edges shuffled together, that many per update (the
    reference: 12); otherwise ``trees_per_update`` trees (all trees: one update, in the rollout's row
    order, so the first pass re-scores exactly). ``train_rows`` keeps every process running the same
    forward / backward calls under DDP (tree updates)."""
    if config.edges_per_update:
        edges = [(s, int(r)) for s in steps for r in edge_rows[s].nonzero().flatten()]
        order = torch.randperm(len(edges), generator=generator).tolist()
        for start in range(0, len(edges), config.edges_per_update):
            rows: dict[int, list[int]] = {}
            for k in order[start:start + config.edges_per_update]:
                rows.setdefault(edges[k][0], []).append(edges[k][1])
            selected = {s: torch.tensor(sorted(r)) for s, r in sorted(rows.items())}
            yield selected, {s: None for s in selected}
        return
    per_update = config.trees_per_update or num_trees
    order = torch.randperm(num_trees, generator=generator)
    if per_update >= num_trees:
        order = torch.arange(num_trees)  # the rollout's row order: exact first-step ratios
    for start in range(0, num_trees, per_update):
        chosen = torch.zeros(num_trees, dtype=torch.bool)
        chosen[order[start:start + per_update]] = True
        selected, edge_weights = {}, {}
        for s in steps:
            in_trees = chosen[transitions[s].prompt_index.cpu()].nonzero().flatten()
            index, weights = ppo.train_rows(run, edge_rows[s][in_trees])
            if len(index):
                selected[s] = in_trees[index]
                edge_weights[s] = None if weights is None else weights[index]
        if selected:
            yield selected, edge_weights



def edge_terms(config: BranchGRPOConfig, transitions: dict, targets: dict, selected: dict,
               edge_weights: dict) -> tuple[list[PPOTerm], float]:
    """One update's terms, one per trained step (its selected edges, their children's advantages)
    and the update's edge count. A term's share of the loss: its edges over the update's
    (``step_weighting`` "edges": every edge counts once) or one over the step count ("steps")."""
    def count(step):
        return len(selected[step]) if edge_weights[step] is None else float(edge_weights[step].sum())

    total = sum(count(s) for s in selected)
    terms = [PPOTerm(transitions[s].subset(index), targets[s].advantage[index],
                     count(s) / max(total, 1) if config.step_weighting == "edges" else 1 / len(selected),
                     edge_weights[s]) for s, index in selected.items()]
    return terms, total


def train(config: BranchGRPOConfig, adapter=None) -> dict[str, float]:
    rollout_config = rollout_config_with_noise(config)
    run, reward, heldout, prompts = start_run(config, adapter)  # validates first (check_config)
    adapter, accelerator = run.adapter, run.accelerator
    bar = progress(run, config, config.variant)
    for iteration in bar:
        rng = random.Random(f"{config.run.seed}-{iteration}")
        batch_prompts = prompts_for_iteration(prompts, config.prompts_per_iteration, config.run.seed, iteration,
                                              accelerator.process_index, accelerator.num_processes)
        num_trees = len(batch_prompts) * config.trees_per_prompt
        tree_prompt = torch.arange(len(batch_prompts)).repeat_interleave(config.trees_per_prompt)

        # 1. one tree per row of the prompt batch (a prompt's trees are repeated rows), decode, score
        with run.sampling():
            cond = adapter.encode(batch_prompts, config.negative_prompt, rollout_config.guidance_scale)
            cond = cond.repeat_interleave(config.trees_per_prompt)
            result = rollout(adapter, cond, rollout_config, group_size=1,
                             generator=iteration_generator(config.run.seed, iteration, accelerator.process_index),
                             **run.latent_kwargs)
            leaves = result.final_x0_hat if config.leaf_sample == "x0_hat" else result.samples
            pixels = adapter.decode(leaves.to(adapter.dtype)).float()
        with run.phase("reward"), torch.no_grad():
            leaf_tree = result.prompt_index.cpu()
            leaf_prompts = [batch_prompts[int(tree_prompt[i])] for i in leaf_tree.tolist()]
            scores = reward(pixels, leaf_prompts)
            leaf_rewards, leaf_valid = scores.total.float().cpu(), scores.valid_mask().cpu()
        check_unscored(run, reward, leaf_valid, iteration)

        # 2. node rewards and advantages per depth (trees never span processes: no gather needed)
        group_of_tree = torch.arange(num_trees) if config.adv_group == "tree" else tree_prompt
        targets = node_targets(result, leaf_rewards, variant=config.variant, fusion=config.fusion,
                               temperature=config.fusion_temperature, group_of_tree=group_of_tree,
                               std=config.adv_std, clip=config.ppo.adv_clip, leaf_valid=leaf_valid,
                               eps=config.adv_eps, unbiased=config.adv_unbiased)
        transitions, edge_rows = trained_edges(config, result, targets, leaf_rewards, leaf_valid, iteration)
        steps = sorted(transitions)

        # 3. PPO over the kept edges: edges_per_update shuffled edges (the reference), or
        # trees_per_update trees, per optimizer step; siblings share their parent's model
        # evaluation, as in the rollout
        batch = RolloutBatch(cond, result.schedule, rollout_config)
        log = TrainLog()
        edges_trained = 0
        with run.phase("training"):
            for _ in range(config.ppo.inner_epochs):
                generator = torch.Generator().manual_seed(rng.randrange(2**31))
                for selected, edge_weights in update_batches(run, config, transitions, edge_rows, steps, num_trees,
                                                             generator):
                    terms, edges = edge_terms(config, transitions, targets, selected, edge_weights)
                    with run.accumulate():
                        ppo.ppo_backward(run, terms, batch, config.ppo, log, share_parents=True)
                        log.record_update(run.optimizer_step())
                    edges_trained += edges

        # 4. bookkeeping
        metrics = reward_metrics({k: run.gather(v.float()) for k, v in scores.scores.items()},
                                 run.gather(leaf_valid))
        trained_adv = [targets[s].advantage[edge_rows[s]] for s in steps]
        trained_adv = torch.cat(trained_adv) if trained_adv else torch.zeros(0)
        metrics.update({"advantage/abs_mean": float(trained_adv.abs().mean()) if len(trained_adv) else 0.0,
                        "tree/leaves": float(len(leaf_rewards)), "tree/nfe_per_leaf": result.nfe / len(leaf_rewards),
                        "tree/edges_trained": float(edges_trained)})
        metrics.update(log.metrics())
        end_iteration(run, config, reward, heldout, metrics, result.nfe)
    return finish_run(config, run, reward, heldout)


CONFIG = BranchGRPOConfig
