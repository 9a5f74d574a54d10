"""Credit in a tree of denoising trajectories (BranchGRPO, TreeGRPO): the leaves' path log-probs,
internal-node rewards fused from their leaves (mean, path log-prob softmax, or edge by edge),
per-depth node advantages, and the leaves width pruning keeps."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from align.advantages import fuse_leaf_rewards, group_advantages, nodes_with_valid_leaves
from align.sampling.records import Rollout


def leaf_path_log_probs(result: Rollout) -> Tensor:
    """(num_steps + 1, leaves): row s is each leaf's summed recorded log-probs at steps >= s (the
    path below the node the leaf descends from after step s - 1); row num_steps is 0."""
    num_steps, leaves = len(result.lineage), result.samples.shape[0]
    per_step = torch.zeros(num_steps, leaves)
    for t in result.main_transitions():
        per_step[t.step] = t.log_prob.float().cpu()[result.ancestor(t.step + 1)]
    below = per_step.flip(0).cumsum(0).flip(0)
    return torch.cat([below, torch.zeros(1, leaves)])


class NodeTargets(NamedTuple):
    """Per row of one step's transition: the child node's reward (branch_grpo) or fused leaf
    advantage (tree_grpo), its advantage, and whether its group carries signal."""

    reward: Tensor
    advantage: Tensor
    keep: Tensor


def edge_fused_rewards(result: Rollout, leaf_values: Tensor, temperature: float = 1.0,
                       leaf_valid: Tensor | None = None) -> list[Tensor]:
    """BranchGRPO's reference fusion, from the leaves up: a node's value is
    sum_c softmax(logp_c / temperature) value_c over its children c, logp_c the one-step log-prob
    of the edge to c (unscored leaves take no part; a node with none left gets 0). Returns, for each
    step s, the values of the main rows after step s (index s) and before step 0 (index -1)."""
    leaf_values = leaf_values.float().cpu()
    valid = torch.ones_like(leaf_values, dtype=torch.bool) if leaf_valid is None else leaf_valid.bool().cpu()
    edge_logp = {t.step: t.log_prob.float().cpu() for t in result.main_transitions()}
    after = torch.where(valid, leaf_values, torch.zeros_like(leaf_values))
    alive = valid.float()
    values = [None] * len(result.lineage)
    for step in reversed(range(len(result.lineage))):
        values[step] = after
        parent = result.lineage[step].cpu()
        rows_before = int(parent.max()) + 1 if len(parent) else 0
        logp = edge_logp.get(step, torch.zeros(len(parent))) / temperature
        masked = logp.masked_fill(alive == 0, -torch.inf)
        node_max = torch.full((rows_before,), -torch.inf).scatter_reduce(0, parent, masked, reduce="amax")
        weights = torch.exp(logp - node_max[parent].clamp_min(-1e30)) * alive
        num = torch.zeros(rows_before).index_add_(0, parent, weights * after)
        den = torch.zeros(rows_before).index_add_(0, parent, weights)
        after = torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))
        alive = (den > 0).float()
    return values + [after]


def node_targets(result: Rollout, leaf_rewards: Tensor, *, variant: str = "branch_grpo", fusion: str = "mean",
                 temperature: float = 1.0, group_of_tree: Tensor | None = None, std: str = "group",
                 eps: float = 1e-4, clip: float | None = 5.0, leaf_valid: Tensor | None = None,
                 unbiased: bool = False) -> dict[int, NodeTargets]:
    """For every recorded main transition (step s): the targets of its rows' child nodes.

    The child of row r is the node r after step s; its leaves are the leaves whose ancestor at step
    s + 1 is r. ``group_of_tree`` maps a tree (row of the prompt batch) to its normalisation group
    (default: each tree alone); ``std``: "group" or "global" (the std of all nodes of the depth).
    ``leaf_valid``: the scored leaves; unscored ones enter no fusion, and a node without a scored
    leaf is dropped from its depth's group."""
    leaf_rewards = leaf_rewards.float().cpu()
    leaf_valid = torch.ones_like(leaf_rewards, dtype=torch.bool) if leaf_valid is None else leaf_valid.bool().cpu()
    leaf_tree = result.prompt_index.cpu()
    group_of_tree = torch.arange(int(leaf_tree.max()) + 1) if group_of_tree is None else group_of_tree.cpu()
    below = leaf_path_log_probs(result) / temperature if fusion == "logp" else None
    leaf_adv = leaf_keep = None
    if variant == "tree_grpo":
        leaf_adv, leaf_keep = group_advantages(leaf_rewards, group_of_tree[leaf_tree], std=std, eps=eps, clip=clip,
                                               valid=leaf_valid, unbiased=unbiased)
    edge_values = None
    if fusion == "logp_edge":
        edge_values = edge_fused_rewards(result, leaf_rewards if variant == "branch_grpo" else leaf_adv,
                                         temperature, leaf_valid)
    out = {}
    for t in result.main_transitions():
        nodes = len(t.rows)
        node_of_leaf = result.ancestor(t.step + 1)
        lp = None if below is None else below[t.step + 1]
        groups = group_of_tree[t.prompt_index.cpu()]
        node_valid = nodes_with_valid_leaves(node_of_leaf, nodes, leaf_valid)
        if variant == "branch_grpo":
            reward = (edge_values[t.step] if edge_values is not None else
                      fuse_leaf_rewards(leaf_rewards, node_of_leaf, nodes, mode=fusion, leaf_log_probs=lp,
                                        valid=leaf_valid))
            advantage, keep = group_advantages(reward, groups, std=std, eps=eps, clip=clip, valid=node_valid,
                                               unbiased=unbiased)
        else:
            reward = (edge_values[t.step] if edge_values is not None else
                      fuse_leaf_rewards(leaf_adv, node_of_leaf, nodes, mode=fusion, leaf_log_probs=lp,
                                        valid=leaf_valid))
            advantage = reward
            keep = torch.zeros(nodes).index_add_(0, node_of_leaf, leaf_keep.float()) > 0
        out[t.step] = NodeTargets(reward, advantage, keep)
    return out


def width_kept_leaves(leaf_rewards: Tensor, leaf_tree: Tensor, fraction: float, mode: str = "both") -> Tensor:
    """Bool mask of the leaves whose edges width pruning keeps: per tree, round(fraction * leaves)
    (at least 1; "both": the better half of them from the top, the rest from the bottom)."""
    keep = torch.zeros(len(leaf_rewards), dtype=torch.bool)
    if fraction >= 1:
        return keep.fill_(True)
    for tree in torch.unique(leaf_tree):
        members = (leaf_tree == tree).nonzero().flatten()
        order = members[torch.argsort(leaf_rewards[members].float(), descending=True, stable=True)]
        count = max(1, round(fraction * len(members)))
        if mode == "best":
            chosen = order[:count]
        else:
            top = math.ceil(count / 2)
            chosen = torch.cat([order[:top], order[len(order) - (count - top):]])
        keep[chosen] = True
    return keep
