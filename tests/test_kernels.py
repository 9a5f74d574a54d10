"""Step kernels against closed forms, torch.distributions and diffusers' own schedulers."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from align.config import ConfigError
from align.sampling.kernels import (cps_step, dance_grpo_sde_step, ddim_step, euler_step, flow_grpo_sde_step,
                                    gaussian_log_prob, get_kernel)

torch.manual_seed(0)
X = torch.randn(3, 4, 5, 5)
V = torch.randn(3, 4, 5, 5)
NOISE = torch.randn(3, 4, 5, 5)


def normal_log_prob(sample, mean, std, reduce="mean"):
    std = std.reshape(-1, *([1] * (sample.ndim - 1))).expand_as(sample)
    lp = torch.distributions.Normal(mean.double(), std.double()).log_prob(sample.double())
    return lp.mean(dim=(1, 2, 3)) if reduce == "mean" else lp.sum(dim=(1, 2, 3))


@pytest.mark.parametrize("reduce", ["mean", "sum"])
@pytest.mark.parametrize("kernel,kwargs,levels", [
    (flow_grpo_sde_step, {"noise_level": 0.7}, (0.8, 0.6)),
    (dance_grpo_sde_step, {"eta": 0.3}, (0.8, 0.6)),
    (ddim_step, {"eta": 1.0}, (0.3, 0.5)),
])
def test_log_prob_equals_torch_normal(kernel, kwargs, levels, reduce):
    out = kernel(X, V, *levels, noise=NOISE, reduce=reduce, **kwargs)
    expected = normal_log_prob(out.prev_sample, out.mean, out.std, reduce)
    torch.testing.assert_close(out.log_prob.double(), expected, rtol=1e-5, atol=1e-4)
    # re-scoring the produced sample gives the identical log-prob
    again = kernel(X, V, *levels, prev_sample=out.prev_sample, reduce=reduce, **kwargs)
    assert torch.equal(again.log_prob, out.log_prob)


def point_mass_marginal_after_step(kernel, sigma, sigma_next, n=200_000, x0=0.7, **params):
    """Samples of x_sigma = (1 - sigma) x0 + sigma eps for data at the point x0 (whose exact velocity
    is v = eps - x0), one kernel step to sigma'; returns the mean and std of the stepped samples.
    A kernel that follows the flow's marginals gives ((1 - sigma') x0, sigma')."""
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(n, 1, generator=gen)
    x = (1 - sigma) * x0 + sigma * eps
    out = kernel(x, eps - x0, sigma, sigma_next, noise=torch.randn(n, 1, generator=gen), **params)
    return out.prev_sample.mean().item(), out.prev_sample.std().item()


@pytest.mark.parametrize("kernel, params", [(flow_grpo_sde_step, {"noise_level": 0.7}),
                                            (dance_grpo_sde_step, {"eta": 0.3})])
def test_sde_kernels_keep_the_flow_marginals_to_first_order(kernel, params):
    """The Flow-GRPO and DanceGRPO SDEs share the probability-flow ODE's marginals: a small step
    lands on N((1 - sigma') x0, sigma'^2) (within sampling noise, std error ~1.5e-3 at n = 2e5), and
    the discretisation error of the std shrinks at least linearly with the step."""
    x0 = 0.7
    mean, std = point_mass_marginal_after_step(kernel, 0.5, 0.49, **params)
    assert abs(mean - (1 - 0.49) * x0) < 5e-3 and abs(std - 0.49) < 3e-3
    big = abs(point_mass_marginal_after_step(kernel, 0.8, 0.6, **params)[1] - 0.6)
    small = abs(point_mass_marginal_after_step(kernel, 0.8, 0.78, **params)[1] - 0.78)
    assert small < big / 5 + 2e-3


def test_cps_keeps_the_marginal_exactly_at_any_step_size():
    """Coefficients-preserving sampling lands on the flow's marginal N((1 - sigma') x0, sigma'^2)
    even for a large step (where the SDE kernels are off by up to 20%), and its log-prob is the
    negative mean squared deviation from the mean."""
    mean, std = point_mass_marginal_after_step(cps_step, 0.8, 0.5, noise_level=0.7)
    assert abs(mean - 0.5 * 0.7) < 5e-3 and abs(std - 0.5) < 3e-3
    sde_error = abs(point_mass_marginal_after_step(flow_grpo_sde_step, 0.8, 0.5, noise_level=0.7)[1] - 0.5)
    assert sde_error > 0.05
    out = cps_step(X, V, 0.8, 0.5, noise=NOISE, noise_level=0.7)
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3)))


def test_flow_grpo_sigma_one_uses_next_sigma():
    out = flow_grpo_sde_step(X, V, 1.0, 0.9, noise=NOISE, noise_level=0.7)
    std_t = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    torch.testing.assert_close(out.std, torch.full((3,), std_t * math.sqrt(0.1)))
    assert torch.isfinite(out.log_prob).all()


def test_euler_is_exact_on_a_straight_path_and_matches_diffusers():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next = 0.75, 0.5
    x = (1 - sigma) * x0 + sigma * eps
    out = euler_step(x, eps - x0, sigma, sigma_next)
    torch.testing.assert_close(out.prev_sample, (1 - sigma_next) * x0 + sigma_next * eps)
    assert torch.equal(out.log_prob, torch.zeros(2))

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(8)
    i = 3
    v = torch.randn_like(x)
    ours = euler_step(x, v, scheduler.sigmas[i], scheduler.sigmas[i + 1]).prev_sample
    scheduler._step_index = i
    theirs = scheduler.step(v, scheduler.timesteps[i], x).prev_sample
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers_scheduler(eta):
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    t_prev = t - scheduler.config.num_train_timesteps // 10
    alpha, alpha_prev = scheduler.alphas_cumprod[t], scheduler.alphas_cumprod[t_prev]
    theirs = scheduler.step(V, t, X, eta=eta, variance_noise=NOISE).prev_sample
    ours = ddim_step(X, V, alpha, alpha_prev, noise=NOISE, eta=eta)
    torch.testing.assert_close(ours.prev_sample, theirs, rtol=1e-5, atol=1e-5)


def test_ddim_v_prediction_agrees_with_eps_prediction():
    alpha, alpha_prev = torch.tensor(0.4), torch.tensor(0.6)
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
    v = alpha.sqrt() * eps - (1 - alpha).sqrt() * x0
    a = ddim_step(x, eps, alpha, alpha_prev, eta=0.0, prediction_type="epsilon")
    b = ddim_step(x, v, alpha, alpha_prev, eta=0.0, prediction_type="v_prediction")
    torch.testing.assert_close(a.prev_sample, b.prev_sample, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.prev_sample, alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps,
                               rtol=1e-5, atol=1e-5)


def test_per_sample_levels_match_scalar_levels():
    sig = torch.tensor([0.9, 0.5, 0.3])
    nxt = torch.tensor([0.8, 0.4, 0.1])
    batched = flow_grpo_sde_step(X, V, sig, nxt, noise=NOISE)
    for b in range(3):
        single = flow_grpo_sde_step(X[b:b + 1], V[b:b + 1], float(sig[b]), float(nxt[b]), noise=NOISE[b:b + 1])
        torch.testing.assert_close(batched.prev_sample[b:b + 1], single.prev_sample)
        torch.testing.assert_close(batched.log_prob[b:b + 1], single.log_prob)


def test_guided_drift_moves_sample_but_log_prob_uses_unguided_mean():
    drift = 0.05 * torch.ones_like(X)
    plain = flow_grpo_sde_step(X, V, 0.6, 0.5, noise=NOISE)
    guided = flow_grpo_sde_step(X, V, 0.6, 0.5, noise=NOISE, mean_shift=drift)
    torch.testing.assert_close(guided.prev_sample, plain.prev_sample + drift)
    torch.testing.assert_close(guided.mean, plain.mean)
    torch.testing.assert_close(guided.log_prob, gaussian_log_prob(guided.prev_sample, plain.mean,
                                                                  plain.std.reshape(-1, 1, 1, 1)))
    assert (guided.log_prob < plain.log_prob).all()


def test_bf16_inputs_are_computed_in_fp32():
    out = flow_grpo_sde_step(X.bfloat16(), V.bfloat16(), 0.6, 0.5, noise=NOISE)
    ref = flow_grpo_sde_step(X.bfloat16().float(), V.bfloat16().float(), 0.6, 0.5, noise=NOISE)
    assert out.prev_sample.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    assert torch.equal(out.prev_sample, ref.prev_sample)


def test_gradient_flows_through_the_mean_in_float64():
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    noise = torch.randn(1, 2, 3, 3)

    def f(x_):
        out = flow_grpo_sde_step(x_.float(), v.float(), 0.6, 0.5, noise=noise)
        return out.prev_sample.double().sum()

    f(x).backward()
    sigma, dt, std_t2 = 0.6, -0.1, 0.49 * 0.6 / 0.4
    # d prev / d x = 1 + std_t^2 dt / (2 sigma) elementwise
    torch.testing.assert_close(x.grad, torch.full_like(x, 1 + std_t2 * dt / (2 * sigma)), rtol=1e-4, atol=1e-5)


def test_unknown_kernel_is_a_one_line_error_with_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'flow_grpo'") as err:
        get_kernel("flow_grop", "flow")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="ddpm schedule"):
        get_kernel("flow_grpo", "ddpm")
