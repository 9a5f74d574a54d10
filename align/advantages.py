"""Scores -> advantages: group normalisation, multi-reward mixing, tree fusion, dense step gains.

Pure functions; each docstring gives its formula.
"""

from __future__ import annotations

import torch
from torch import Tensor


def group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row mean and (population) std of the row's group."""
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), dtype=values.dtype, device=values.device).index_add_(
        0, inverse, torch.ones_like(values))
    total = torch.zeros_like(count).index_add_(0, inverse, values)
    mean = total / count
    sq = torch.zeros_like(count).index_add_(0, inverse, (values - mean[inverse]) ** 2)
    std = torch.sqrt(sq / count)
    return mean[inverse], std[inverse]


def group_advantages(rewards: Tensor, group_ids: Tensor, *, std: str = "group", eps: float = 1e-4,
                     clip: float | None = 5.0) -> tuple[Tensor, Tensor]:
    """A = (r - mean_group) / (std + eps), std of the group ("group") or of the whole batch
    ("global"), clipped to [-clip, clip]. Groups whose rewards are all equal carry no signal:
    they get A = 0 and ``keep = False``. Returns (advantages, keep)."""
    rewards = rewards.float()
    mean, group_std = group_stats(rewards, group_ids)
    if std == "group":
        scale = group_std
    elif std == "global":
        scale = rewards.std(unbiased=False).expand_as(rewards)
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    advantages = (rewards - mean) / (scale + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    keep = group_std > 0
    return torch.where(keep, advantages, torch.zeros_like(advantages)), keep


def mixed_advantages(rewards: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor,
                     mode: str = "sum_rewards", **kwargs) -> tuple[Tensor, Tensor]:
    """Several rewards -> one advantage. "sum_rewards": normalise sum_k w_k r_k;
    "sum_advantages" (MixGRPO): sum_k w_k A_k with each reward normalised on its own."""
    if mode == "sum_rewards":
        total = sum(weights.get(k, 1.0) * r.float() for k, r in rewards.items())
        return group_advantages(total, group_ids, **kwargs)
    if mode == "sum_advantages":
        total, keep = 0.0, None
        for key, r in rewards.items():
            adv, k = group_advantages(r, group_ids, **kwargs)
            total = total + weights.get(key, 1.0) * adv
            keep = k if keep is None else keep | k
        return total, keep
    raise ValueError(f"mode must be 'sum_rewards' or 'sum_advantages', got {mode!r}")


# --- trees (BranchGRPO / TreeGRPO) ----------------------------------------------------------------


def fuse_leaf_rewards(leaf_rewards: Tensor, node_of_leaf: Tensor, num_nodes: int, *,
                      mode: str = "mean", leaf_log_probs: Tensor | None = None) -> Tensor:
    """Reward of each internal node from its leaves: the mean, or ("logp") sum_l softmax(logp)_l r_l
    over the node's leaves, where logp is each leaf's path log-prob below the node."""
    leaf_rewards = leaf_rewards.float()
    if mode == "mean":
        weights = torch.ones_like(leaf_rewards)
    elif mode == "logp":
        if leaf_log_probs is None:
            raise ValueError("mode 'logp' needs leaf_log_probs")
        # softmax within each node: subtract each node's max for stability
        lp = leaf_log_probs.float()
        node_max = torch.full((num_nodes,), -torch.inf, device=lp.device).scatter_reduce(
            0, node_of_leaf, lp, reduce="amax")
        weights = torch.exp(lp - node_max[node_of_leaf])
    else:
        raise ValueError(f"mode must be 'mean' or 'logp', got {mode!r}")
    num = torch.zeros(num_nodes, device=leaf_rewards.device).index_add_(0, node_of_leaf, weights * leaf_rewards)
    den = torch.zeros(num_nodes, device=leaf_rewards.device).index_add_(0, node_of_leaf, weights)
    return num / den


def depth_advantages(node_rewards: Tensor, tree_ids: Tensor, eps: float = 1e-4,
                     clip: float | None = 5.0) -> Tensor:
    """Advantage of every node at one depth, normalised among the nodes of that depth within its
    tree: (r - mean) / (std + eps)."""
    advantages, _ = group_advantages(node_rewards, tree_ids, eps=eps, clip=clip)
    return advantages


# --- dense step rewards (DenseGRPO) --------------------------------------------------------------


def dense_step_gains(completion_rewards: Tensor) -> Tensor:
    """completion_rewards[:, t] = R(ode(x_t)) for t = 0..T (column T: the final sample). The dense
    reward of step t is R(ode(x_{t+1})) - R(ode(x_t)); returns (B, T)."""
    return completion_rewards[:, 1:] - completion_rewards[:, :-1]


def per_step_advantages(step_rewards: Tensor, group_ids: Tensor | None = None, eps: float = 1e-4,
                        clip: float | None = 5.0) -> Tensor:
    """Normalise each step's rewards (column) across the batch, or within groups: (B, T) -> (B, T)."""
    if group_ids is None:
        group_ids = torch.zeros(step_rewards.shape[0], dtype=torch.long, device=step_rewards.device)
    columns = [group_advantages(step_rewards[:, t], group_ids, eps=eps, clip=clip)[0]
               for t in range(step_rewards.shape[1])]
    return torch.stack(columns, 1)


class RunningPromptStats:
    """DDPO's per-prompt running statistics: each prompt keeps its last ``buffer_size`` rewards;
    below ``min_count`` entries the batch statistics are used instead."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, list[float]] = {}

    def advantages(self, prompts: list[str], rewards: Tensor, eps: float = 1e-6) -> Tensor:
        rewards = rewards.float()
        out = torch.empty_like(rewards)
        batch_mean, batch_std = rewards.mean(), rewards.std(unbiased=False)
        for prompt in set(prompts):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.history.setdefault(prompt, [])
            buffer.extend(rewards[rows].tolist())
            del buffer[:-self.buffer_size]
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                values = torch.tensor(buffer)
                mean, std = values.mean(), values.std(unbiased=False)
            out[rows] = (rewards[rows] - mean) / (std + eps)
        return out

    def state_dict(self) -> dict:
        return {"history": {k: list(v) for k, v in self.history.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = {k: list(v) for k, v in state["history"].items()}
