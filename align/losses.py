"""Training losses as small pure functions (formulas in the docstrings)."""

from __future__ import annotations

import torch
from torch import Tensor

from align.sampling.kernels import reduce_elements


def ppo_clip_loss(log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, clip_range: float,
                  weights: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """mean of max(-A rho, -A clip(rho, 1 - eps, 1 + eps)), rho = exp(logp - logp_old).
    At rho = 1 the loss is -mean(A). Returns the loss and stats (ratio mean, clip fraction,
    approx-KL = 0.5 E[(logp - logp_old)^2])."""
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - clip_range, 1 + clip_range)
    loss = weighted_mean(torch.maximum(unclipped, clipped), weights)
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean(),
            "clip_fraction": ((ratio - 1).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (log_ratio**2).mean(),
        }
    return loss, stats


def mean_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, reduce: str = "mean") -> Tensor:
    """KL between N(mean, std^2) and N(ref_mean, std^2) per sample: ||mean - ref||^2 / (2 std^2),
    averaged (or summed) over latent elements."""
    std = std.float().reshape(-1, *([1] * (mean.ndim - 1)))
    return reduce_elements((mean.float() - ref_mean.float()) ** 2 / (2 * std**2), reduce)


def flow_grpo_kl(mean: Tensor, ref_mean: Tensor, std: Tensor, dt: Tensor | float, reduce: str = "mean") -> Tensor:
    """The Flow-GRPO reference's KL term: ||mean - ref||^2 / (2 std_t^2) with the SDE's std_t
    (a sqrt(sigma / (1 - sigma)) for its kernel), i.e. without the step's sqrt(-dt): the step std is
    std_t sqrt(-dt), so this is the exact Gaussian KL (:func:`mean_kl`) times (-dt)."""
    scale = (-torch.as_tensor(dt, dtype=torch.float32, device=mean.device)).reshape(-1)
    return mean_kl(mean, ref_mean, std, reduce) * scale


#: the KL forms by name: "exact" (the step's Gaussian KL) or "flow_grpo" (the reference's, x (-dt))
KL_FORMS = ("flow_grpo", "exact")
#: the CFG gradient of training re-scores: "cond_only" (the Flow-GRPO reference) or "full"
CFG_GRADS = ("cond_only", "full")


def normalize_log_ratio(log_ratio: Tensor, target_std: Tensor | float, eps: float = 1e-8) -> Tensor:
    """GRPO-Guard: one denoising step's log-ratios d, centred and rescaled across the batch so the
    PPO clip stays two-sided at low-noise steps where d drifts below 0:
    (d - mean(d)) / std(d) * target_std, with the statistics detached (gradients keep flowing
    through d) and target_std shared by all steps (e.g. the pooled std over steps); while d has no
    spread (the on-policy pass) it is only centred."""
    detached = log_ratio.detach()
    centred = log_ratio - detached.mean()
    std = detached.std(unbiased=False)
    target = torch.as_tensor(target_std, dtype=std.dtype, device=std.device)
    if std < eps or target < eps:  # on-policy (all ratios 1): nothing to rescale, keep the gradient
        return centred
    return centred / std * target


def flow_matching_target(x0: Tensor, noise: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """x_sigma = (1 - sigma) x0 + sigma eps and the velocity target eps - x0."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
    return (1 - s) * x0 + s * noise, noise - x0


def weighted_mean(values: Tensor, weights: Tensor | None = None) -> Tensor:
    """mean(values), or sum(w values) / sum(w) with per-sample weights (0 when every weight is 0)."""
    if weights is None:
        return values.mean()
    return (weights * values).sum() / weights.sum().clamp_min(1e-12)


def nft_loss(v_theta: Tensor, v_old: Tensor, target: Tensor, optimality: Tensor, beta: float,
             weights: Tensor | None = None) -> Tensor:
    """DiffusionNFT: with implicit policies v+ = (1 - beta) v_old + beta v_theta and
    v- = (1 + beta) v_old - beta v_theta, minimise r ||v+ - v||^2 + (1 - r) ||v- - v||^2
    (mean over elements), r in [0, 1] the optimality weight of each sample; ``weights`` (per
    sample, e.g. 0 for unscored ones) weight the mean over samples."""
    v_pos = (1 - beta) * v_old + beta * v_theta
    v_neg = (1 + beta) * v_old - beta * v_theta
    pos = reduce_elements((v_pos - target) ** 2)
    neg = reduce_elements((v_neg - target) ** 2)
    return weighted_mean(optimality * pos + (1 - optimality) * neg, weights)
