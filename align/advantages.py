"""Scores -> advantages: group normalisation, multi-reward mixing, tree fusion, dense step gains.

Pure functions; each docstring gives its formula.
"""

from __future__ import annotations

import torch
from torch import Tensor


#: the eps of (r - mean) / (std + eps) in GRPO-family advantages (the Flow-GRPO reference's 1e-4)
GRPO_EPS = 1e-4
#: DDPO's eps (its reference's per-prompt statistics: 1e-6), for its per-prompt and batch statistics
DDPO_EPS = 1e-6


def group_stats(values: Tensor, group_ids: Tensor, valid: Tensor | None = None,
                unbiased: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row mean, std (population, or with n - 1 when ``unbiased``) and member count of the
    row's group, over the group's ``valid`` rows only (all rows when None; invalid values, NaN
    included, never enter)."""
    valid = torch.ones_like(values, dtype=torch.bool) if valid is None else valid.to(values.device).bool()
    values = torch.where(valid, values, torch.zeros_like(values))
    weight = valid.to(values.dtype)
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    count = torch.zeros(len(groups), dtype=values.dtype, device=values.device).index_add_(0, inverse, weight)
    total = torch.zeros_like(count).index_add_(0, inverse, values * weight)
    mean = total / count.clamp_min(1)
    sq = torch.zeros_like(count).index_add_(0, inverse, weight * (values - mean[inverse]) ** 2)
    std = torch.sqrt(sq / (count - 1 if unbiased else count).clamp_min(1))
    return mean[inverse], std[inverse], count[inverse]


def group_advantages(rewards: Tensor, group_ids: Tensor, *, std: str = "group", eps: float = GRPO_EPS,
                     clip: float | None = 5.0, valid: Tensor | None = None,
                     unbiased: bool = False) -> tuple[Tensor, Tensor]:
    """A = (r - mean_group) / (std + eps), std of the group ("group") or of the whole batch
    ("global"), clipped to [-clip, clip]. Statistics use the ``valid`` rows only (an unscored
    sample is dropped from its group). Rows without signal get A = 0 and ``keep = False``: invalid
    rows, and the rows of groups with fewer than 2 valid members or whose valid rewards are all
    equal. ``unbiased``: the std with n - 1 (BranchGRPO's reference). Returns (advantages, keep)."""
    rewards = rewards.float()
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.to(rewards.device).bool()
    clean = torch.where(valid, rewards, torch.zeros_like(rewards))
    mean, group_std, count = group_stats(clean, group_ids, valid, unbiased=unbiased)
    if std == "group":
        scale = group_std
    elif std == "global":
        scale = (clean[valid].std(unbiased=unbiased).expand_as(rewards) if int(valid.sum()) > int(unbiased)
                 else torch.zeros_like(rewards))
    else:
        raise ValueError(f"std must be 'group' or 'global', got {std!r}")
    advantages = (clean - mean) / (scale + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    keep = valid & (count >= 2) & (group_std > 0)
    return torch.where(keep, advantages, torch.zeros_like(advantages)), keep


def mixed_advantages(rewards: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor,
                     mode: str = "sum_rewards", valid: Tensor | None = None, **kwargs) -> tuple[Tensor, Tensor]:
    """Several rewards -> one advantage. "sum_rewards": normalise sum_k w_k r_k;
    "sum_advantages" (MixGRPO): sum_k w_k A_k with each reward normalised on its own; "gdpo"
    (:func:`gdpo_advantages`): each reward normalised within its group, the weighted sum normalised
    again over the batch. A row is kept when any reward's advantage carries signal for it."""
    if mode == "sum_rewards":
        total = sum(weights.get(k, 1.0) * r.float() for k, r in rewards.items())
        return group_advantages(total, group_ids, valid=valid, **kwargs)
    if mode == "sum_advantages":
        total, keep = 0.0, None
        for key, r in rewards.items():
            adv, k = group_advantages(r, group_ids, valid=valid, **kwargs)
            total = total + weights.get(key, 1.0) * adv
            keep = k if keep is None else keep | k
        return total, keep
    if mode == "gdpo":
        return gdpo_advantages(rewards, weights, group_ids, valid=valid, eps=kwargs.get("eps", GRPO_EPS),
                               clip=kwargs.get("clip", 5.0))
    raise ValueError(f"mode must be 'sum_rewards', 'sum_advantages' or 'gdpo', got {mode!r}")


def gdpo_advantages(rewards: dict[str, Tensor], weights: dict[str, float], group_ids: Tensor, *,
                    valid: Tensor | None = None, eps: float = GRPO_EPS,
                    clip: float | None = 5.0) -> tuple[Tensor, Tensor]:
    """GDPO's group reward-decoupled normalisation: per reward k, a_k = (r_k - mean_g r_k) /
    (std_g r_k + eps) within each group g (population std); c = sum_k w_k a_k; then
    A = (c - mean c) / (std c + eps) over the whole batch's rows with signal, clipped to +-clip.
    Every reward enters on one scale whatever its spread; a reward constant within a group gives 0
    there. Rows where no reward carries signal get A = 0 and ``keep = False``."""
    combined, keep = 0.0, None
    for key, r in rewards.items():
        adv, k = group_advantages(r, group_ids, std="group", eps=eps, clip=None, valid=valid)
        combined = combined + weights.get(key, 1.0) * adv
        keep = k if keep is None else keep | k
    combined = torch.as_tensor(combined, dtype=torch.float32)
    if int(keep.sum()) == 0:
        return torch.zeros_like(combined), keep
    rows = combined[keep]
    advantages = (combined - rows.mean()) / (rows.std(unbiased=False) + eps)
    if clip is not None:
        advantages = advantages.clamp(-clip, clip)
    return torch.where(keep, advantages, torch.zeros_like(advantages)), keep


# --- trees (BranchGRPO / TreeGRPO) ----------------------------------------------------------------


def fuse_leaf_rewards(leaf_rewards: Tensor, node_of_leaf: Tensor, num_nodes: int, *,
                      mode: str = "mean", leaf_log_probs: Tensor | None = None,
                      valid: Tensor | None = None) -> Tensor:
    """Reward of each internal node from its leaves: the mean, or ("logp") sum_l softmax(logp)_l r_l
    over the node's leaves, where logp is each leaf's path log-prob below the node. Only ``valid``
    (scored) leaves enter; a node without one gets 0 (see :func:`nodes_with_valid_leaves`)."""
    leaf_rewards = leaf_rewards.float()
    if valid is not None:
        leaf_rewards = torch.where(valid.bool(), leaf_rewards, torch.zeros_like(leaf_rewards))
    if mode == "mean":
        weights = torch.ones_like(leaf_rewards)
    elif mode == "logp":
        if leaf_log_probs is None:
            raise ValueError("mode 'logp' needs leaf_log_probs")
        # softmax within each node: subtract each node's max for stability
        lp = leaf_log_probs.float()
        if valid is not None:  # unscored leaves must not set a node's maximum (their weight is 0)
            lp = lp.masked_fill(~valid.bool().to(lp.device), -torch.inf)
        node_max = torch.full((num_nodes,), -torch.inf, device=lp.device).scatter_reduce(
            0, node_of_leaf, lp, reduce="amax")
        weights = torch.exp(lp - node_max[node_of_leaf].clamp_min(-1e30))
    else:
        raise ValueError(f"mode must be 'mean' or 'logp', got {mode!r}")
    if valid is not None:
        weights = weights * valid.float()
    num = torch.zeros(num_nodes, device=leaf_rewards.device).index_add_(0, node_of_leaf, weights * leaf_rewards)
    den = torch.zeros(num_nodes, device=leaf_rewards.device).index_add_(0, node_of_leaf, weights)
    return num / den if valid is None else torch.where(den > 0, num / den.clamp_min(1e-30), torch.zeros_like(num))


def nodes_with_valid_leaves(node_of_leaf: Tensor, num_nodes: int, valid: Tensor) -> Tensor:
    """(num_nodes,) bool: nodes with at least one scored leaf."""
    return torch.zeros(num_nodes).index_add_(0, node_of_leaf.cpu(), valid.float().cpu()) > 0


def depth_advantages(node_rewards: Tensor, tree_ids: Tensor, eps: float = GRPO_EPS,
                     clip: float | None = 5.0, valid: Tensor | None = None) -> Tensor:
    """Advantage of every node at one depth, normalised among the (``valid``) nodes of that depth
    within its tree: (r - mean) / (std + eps)."""
    advantages, _ = group_advantages(node_rewards, tree_ids, eps=eps, clip=clip, valid=valid)
    return advantages


# --- dense step rewards (DenseGRPO) --------------------------------------------------------------


def dense_step_gains(completion_rewards: Tensor) -> Tensor:
    """completion_rewards[:, t] = R(ode(x_t)) for t = 0..T (column T: the final sample). The dense
    reward of step t is R(ode(x_{t+1})) - R(ode(x_t)); returns (B, T)."""
    return completion_rewards[:, 1:] - completion_rewards[:, :-1]


def per_step_advantages(step_rewards: Tensor, group_ids: Tensor | None = None, eps: float = GRPO_EPS,
                        clip: float | None = 5.0, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Normalise each step's rewards (column) across the batch, or within groups, over the
    ``valid`` (B, T) entries: (B, T) -> (advantages, keep), both (B, T)."""
    if group_ids is None:
        group_ids = torch.zeros(step_rewards.shape[0], dtype=torch.long, device=step_rewards.device)
    columns = [group_advantages(step_rewards[:, t], group_ids, eps=eps, clip=clip,
                                valid=None if valid is None else valid[:, t])
               for t in range(step_rewards.shape[1])]
    return torch.stack([c[0] for c in columns], 1), torch.stack([c[1] for c in columns], 1)


class RunningPromptStats:
    """DDPO's per-prompt running statistics: each prompt keeps its last ``buffer_size`` rewards;
    below ``min_count`` entries the batch statistics are used instead."""

    def __init__(self, buffer_size: int = 16, min_count: int = 16) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.history: dict[str, list[float]] = {}

    def advantages(self, prompts: list[str], rewards: Tensor, eps: float = DDPO_EPS,
                   valid: Tensor | None = None) -> Tensor:
        """Advantages of the batch; ``valid`` False rows (unscored) neither enter a buffer nor the
        batch statistics, and get 0."""
        rewards = rewards.float()
        valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid.bool()
        out = torch.zeros_like(rewards)
        if not valid.any():
            return out
        batch_mean, batch_std = rewards[valid].mean(), rewards[valid].std(unbiased=False)
        for prompt in set(p for p, ok in zip(prompts, valid.tolist()) if ok):
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt and bool(valid[i])])
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


def dual_advantages(outcome: Tensor, process: dict[int, Tensor], group_ids: Tensor, *, outcome_weight: float = 1.0,
                    process_weight: float = 1.0, clip: float | None = 5.0) -> dict[int, Tensor]:
    """Per-step advantages of guided GRPO (Euphonium): for each step s with a process reward,
    A_s = outcome_weight * A_outcome + process_weight * (p_s - mean_group(p_s)) / (std_group(p_s) + 1e-4),
    the process reward ``process[s]`` (N,) normalised within each prompt's group at that step.
    ``outcome``: the (N,) outcome advantages (already normalised)."""
    out = {}
    for step, values in process.items():
        normalised, _ = group_advantages(values.to(outcome.device), group_ids.to(outcome.device), std="group",
                                         clip=clip)
        out[step] = outcome_weight * outcome + process_weight * normalised
    return out
