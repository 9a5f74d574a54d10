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


def guard_step_weights(stds: Tensor) -> Tensor:
    """GRPO-Guard's step reweighting: w_s = std_s^2 / mean_s(std_s^2) for the trained steps' noise
    levels std_s, so the low-noise steps, whose log-prob gradients scale as 1 / std_s^2, do not drown
    the high-noise ones; the weights average to 1."""
    return stds**2 / (stds**2).mean()


def truncated_importance(log_prob_now: Tensor, log_prob_sampled: Tensor, max_weight: float) -> tuple[Tensor, Tensor]:
    """The truncated importance weight of a stale sample's step, min(pi_now / pi_sampled, c) =
    min(exp(log pi_now - log pi_sampled), c) (pass detached log-probs), and whether it was truncated."""
    weight = torch.exp(log_prob_now - log_prob_sampled)
    return weight.clamp(max=max_weight), weight > max_weight


def proximal_log_ratio(log_prob: Tensor, old_log_prob: Tensor, ref_log_prob: Tensor, clip_range: float) -> Tensor:
    """PRDP's per-step log-ratio to the reference with the proximal clip:
    l = log pi_old + clip(log pi_theta - log pi_old, -c, c) - log pi_ref. Outside the clip l is
    constant in theta (no gradient); inside it is log pi_theta - log pi_ref."""
    return old_log_prob + (log_prob - old_log_prob).clamp(-clip_range, clip_range) - ref_log_prob


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


# --- gradient-based and preference methods -------------------------------------------------------

#: reward_backprop's loss forms of a differentiable reward r
REWARD_LOSSES = ("neg", "one_minus", "target", "hinge")


def reward_loss(reward: Tensor, form: str = "neg", *, target: float = 10.0, margin: float = 2.0) -> Tensor:
    """Per-sample loss of a differentiable reward r: "neg" -r, "one_minus" 1 - r (HPS-like scores in
    [0, 1]), "target" |r - target| (AlignProp's aesthetic), "hinge" ReLU(margin - r) (ReFL)."""
    if form == "neg":
        return -reward
    if form == "one_minus":
        return 1 - reward
    if form == "target":
        return (reward - target).abs()
    if form == "hinge":
        return torch.relu(margin - reward)
    raise ValueError(f"reward loss must be one of {', '.join(REWARD_LOSSES)}, got {form!r}")


def noised_and_target(x0: Tensor, noise: Tensor, level: Tensor, kind: str,
                      prediction_type: str) -> tuple[Tensor, Tensor]:
    """The forward process at ``level`` (per sample) and the model's regression target there:
    flow: x_s = (1 - s) x0 + s eps, target v = eps - x0; DDPM (level = alpha_bar a):
    x_a = sqrt(a) x0 + sqrt(1 - a) eps, target eps ("epsilon") or sqrt(a) eps - sqrt(1 - a) x0
    ("v_prediction")."""
    shape = (-1, *([1] * (x0.ndim - 1)))
    level = level.to(x0.device, torch.float32).reshape(shape)
    if kind == "flow":
        return (1 - level) * x0 + level * noise, noise - x0
    a, b = level.sqrt(), (1 - level).sqrt()
    x_t = a * x0 + b * noise
    if prediction_type == "epsilon":
        return x_t, noise
    if prediction_type == "v_prediction":
        return x_t, a * noise - b * x0
    raise ValueError(f"no denoising target for prediction type {prediction_type!r}")


def diffusion_dpo_loss(err_w: Tensor, err_l: Tensor, ref_err_w: Tensor, ref_err_l: Tensor,
                       beta: float) -> tuple[Tensor, Tensor]:
    """Diffusion-DPO (and Flow-DPO with the velocity target) per pair, from the per-sample squared
    errors of the winner w and loser l under the model and the reference at one shared t and noise:
    inside = -(beta / 2) [(err_w - err_l) - (ref_err_w - ref_err_l)], loss = -log sigmoid(inside).
    The beta convention has the 1/2 (beta 5000 here = 2500 without it). At model = reference the
    loss is ln 2. Returns (loss per pair, inside: the implicit reward margin)."""
    inside = -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))
    return -torch.nn.functional.logsigmoid(inside), inside


def d3po_loss(log_ratio_w: Tensor, log_ratio_l: Tensor, beta: float, clip: float) -> Tensor:
    """D3PO at one denoising step of a pair that shares its prompt and start noise: with
    log rho = log pi_theta - log pi_ref of the step clamped to [log(1 - clip), log(1 + clip)],
    loss = -log sigmoid(beta [log rho_w - log rho_l]) (ln 2 at rho_w = rho_l)."""
    low, high = torch.log1p(torch.tensor(-clip)).item(), torch.log1p(torch.tensor(clip)).item()
    inside = beta * (log_ratio_w.clamp(low, high) - log_ratio_l.clamp(low, high))
    return -torch.nn.functional.logsigmoid(inside)


def prdp_loss(rhat_a: Tensor, rhat_b: Tensor, reward_a: Tensor, reward_b: Tensor, beta: float) -> Tensor:
    """PRDP's reward-difference regression of a pair of trajectories of one prompt, with
    rhat = sum over steps of log pi_theta / pi_ref: (rhat_a - rhat_b - (r_a - r_b) / beta)^2. It is 0
    exactly when the log-ratio difference equals the reward difference over beta; its optimum is
    the KL-regularised optimum pi* ~ pi_ref exp(r / beta)."""
    return (rhat_a - rhat_b - (reward_a - reward_b) / beta) ** 2


def rwr_weights(rewards: Tensor, temperature: float, valid: Tensor | None = None) -> Tensor:
    """Reward-weighted regression weights exp(r / temperature), normalised to mean 1 over the
    (valid) batch: softmax(r / T) * N. Invalid rows weigh 0."""
    logits = rewards.float() / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid.bool(), float("-inf"))
    count = int(valid.sum()) if valid is not None else len(rewards)
    return torch.softmax(logits, dim=0) * max(count, 1)


#: AWM's weightings w(sigma) phi(m) of a sample's flow-matching error m
AWM_WEIGHTINGS = ("ghuber", "uniform", "t", "t2", "huber")


def awm_weighted_error(mse: Tensor, sigma: Tensor, weighting: str = "ghuber", power: float = 0.25) -> Tensor:
    """AWM's per-item error w(sigma) phi(m), m = the mean over elements of (v_theta - (eps - x0))^2:
    "uniform" m, "t" sigma m, "t2" sigma^2 m, "huber" sigma sqrt(m), "ghuber" (the reference's)
    sigma ((m + 1e-10)^p - (1e-10)^p) / p, whose gradient sigma m^(p - 1) dm gives samples with a
    large error less weight."""
    mse, sigma = mse.double(), sigma.double().reshape(mse.shape)
    if weighting == "uniform":
        return mse
    if weighting == "t":
        return sigma * mse
    if weighting == "t2":
        return sigma**2 * mse
    if weighting == "huber":
        return sigma * torch.sqrt(mse + 1e-10)
    if weighting == "ghuber":
        return sigma * ((mse + 1e-10) ** power - 1e-10**power) / power
    raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")


def awm_loss(mse: Tensor, sigma: Tensor, advantages: Tensor, weighting: str = "ghuber", power: float = 0.25,
             weights: Tensor | None = None) -> Tensor:
    """Advantage Weighted Matching: mean_i A_i w(sigma_i) phi(m_i) (:func:`awm_weighted_error`) over the
    re-noised final samples. Minimising it lowers the flow-matching error of samples with A > 0 (raises
    their likelihood) and raises it on A < 0; A = 0 contributes nothing, a uniform A = c is c times
    the (weighted) pretraining loss."""
    return weighted_mean(advantages.double() * awm_weighted_error(mse, sigma, weighting, power), weights).float()


def dgpo_group_logits(d_theta: Tensor, d_ref: Tensor, advantages: Tensor, group_ids: Tensor, beta: float,
                      group_size: int) -> Tensor:
    """DGPO's group logit of each row's group: S_g = (beta / G) sum_{i in g} A_i (d_theta,i - d_ref,i),
    d the flow-matching error (a likelihood surrogate: log p_theta / p_ref ~ -(d_theta - d_ref)), G the
    nominal group size. S_g < 0 when the group's good samples are more likely under theta than under
    the reference and its bad ones less."""
    terms = advantages.float() * (d_theta.float() - d_ref.float())
    groups, inverse = torch.unique(group_ids, return_inverse=True)
    sums = torch.zeros(len(groups), dtype=terms.dtype, device=terms.device).index_add_(0, inverse, terms)
    return (beta / group_size) * sums[inverse]


def dgpo_clipped(d_old: Tensor, d_theta: Tensor, advantages: Tensor, clip_range: float) -> Tensor:
    """DGPO's PPO-style clip against the old policy (a fast EMA of theta): with the likelihood ratio
    rho_i = exp(d_old,i - d_theta,i) (d the flow-matching error), row i stops training (its d_theta is
    detached) once it has moved far enough the way its advantage asks: A_i > 0 and rho_i > 1 + c, or
    A_i <= 0 and rho_i < 1 - c. Returns the mask of clipped rows."""
    ratio = torch.exp(d_old.float() - d_theta.detach().float())
    return ((advantages > 0) & (ratio > 1 + clip_range)) | ((advantages <= 0) & (ratio < 1 - clip_range))


def dgpo_loss(d_theta: Tensor, d_ref: Tensor, advantages: Tensor, group_ids: Tensor, beta: float, group_size: int,
              form: str = "surrogate") -> Tensor:
    """DGPO's group preference loss, -log sigmoid(-S_g) (:func:`dgpo_group_logits`), a Bradley-Terry
    likelihood between a group's positive and negative halves (sum A = 0). "literal": its mean over
    groups (ln 2 at the reference policy, where S_g = 0); "surrogate" (the reference code's):
    mean_i sg(sigmoid(S_g(i))) A_i d_theta,i over the rows, whose gradient is the literal loss's divided
    by beta (the gate sigmoid(S_g) -> 0 once a group is ranked right against the reference)."""
    logits = dgpo_group_logits(d_theta, d_ref, advantages, group_ids, beta, group_size)
    if form == "literal":  # each group once: its rows share S_g, each weighted 1 / (its group's rows)
        _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
        per_row = -torch.nn.functional.logsigmoid(-logits) / counts[inverse].to(logits.dtype)
        return per_row.sum() / len(counts)
    if form == "surrogate":
        return (torch.sigmoid(logits.detach()) * advantages.float() * d_theta.float()).mean()
    raise ValueError(f"form must be 'surrogate' or 'literal', got {form!r}")
