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


def test_flow_grpo_closed_form():
    sigma, sigma_next, a = 0.8, 0.6, 0.7
    out = flow_grpo_sde_step(X, V, sigma, sigma_next, noise=NOISE, noise_level=a)
    std_t = a * math.sqrt(sigma / (1 - sigma))
    dt = sigma_next - sigma
    mean = X + (V + std_t**2 * (X + (1 - sigma) * V) / (2 * sigma)) * dt
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((3,), std_t * math.sqrt(-dt)))
    torch.testing.assert_close(out.prev_sample, mean + std_t * math.sqrt(-dt) * NOISE)


def test_flow_grpo_sigma_one_uses_next_sigma():
    out = flow_grpo_sde_step(X, V, 1.0, 0.9, noise=NOISE, noise_level=0.7)
    std_t = 0.7 * math.sqrt(1.0 / (1 - 0.9))
    torch.testing.assert_close(out.std, torch.full((3,), std_t * math.sqrt(0.1)))
    assert torch.isfinite(out.log_prob).all()


def test_dance_grpo_closed_form():
    sigma, sigma_next, eta = 0.7, 0.5, 0.3
    out = dance_grpo_sde_step(X, V, sigma, sigma_next, noise=NOISE, eta=eta)
    score = -(X + (1 - sigma) * V) / sigma
    dt = sigma_next - sigma
    torch.testing.assert_close(out.mean, X + V * dt - 0.5 * eta**2 * score * dt)
    torch.testing.assert_close(out.std, torch.full((3,), eta * math.sqrt(sigma - sigma_next)))


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


def test_cps_preserves_coefficients():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next, a = 0.8, 0.5, 0.7
    x = (1 - sigma) * x0 + sigma * eps
    out = cps_step(x, eps - x0, sigma, sigma_next, noise=NOISE[:2, :3, :4, :4], noise_level=a)
    s = sigma_next * math.sin(a * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - sigma_next) * x0 + math.sqrt(sigma_next**2 - s**2) * eps)
    # noise coefficients squared add up to sigma'^2: the sample stays on the (1 - sigma') x0 + sigma' eps path
    assert math.isclose((sigma_next**2 - s**2) + s**2, sigma_next**2)
    torch.testing.assert_close(out.log_prob, -((out.prev_sample - out.mean) ** 2).mean(dim=(1, 2, 3)))


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
