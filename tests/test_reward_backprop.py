"""Reward backprop: the gradient through the denoising chain matches float64 finite differences;
each truncation mode keeps gradients exactly at the steps it names; bad settings are one line."""

from __future__ import annotations

import random
import re

import pytest
import torch

from align.config import ConfigError
from align.losses import reward_loss
from align.sampling.rollout import RolloutConfig, rollout
from rewards.base import REWARDS, Reward, register_reward
from tests.conftest import GaussianAdapter, GaussianDDPMAdapter, gaussian_trainer

if "test_smooth_brightness" not in REWARDS:
    @register_reward("test_smooth_brightness")
    class SmoothBrightness(Reward):
        """-(mean pixel - 0.8)^2: smooth and differentiable."""

        differentiable = True

        def score(self, samples, prompts, **context):
            return {"score": -((samples.mean(dim=(1, 2, 3)) - 0.8) ** 2)}


@pytest.mark.parametrize("make_adapter", [GaussianAdapter, GaussianDDPMAdapter], ids=["flow", "eps"])
@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
def test_chain_gradient_matches_float64_finite_differences(make_adapter, checkpointed):
    """d loss / d gain through a 4-step ODE chain (every model call and the latent chain keep
    gradients; the reward sees a smooth decode), against central differences in float64."""
    adapter = make_adapter(shape=(2, 3, 3))
    adapter.denoiser.double()
    kernel = "ode"
    cond = adapter.encode(["0.3", "0.7"], guidance_scale=1.0)
    noise = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    config = RolloutConfig(kernel=kernel, num_steps=4)

    def loss():
        result = rollout(adapter, cond, config, initial_noise=noise, grad_steps=range(4),
                         checkpoint_grad_steps=checkpointed)
        assert result.samples.dtype == torch.float64
        pixels = torch.sigmoid(result.samples)
        return reward_loss(-((pixels.mean(dim=(1, 2, 3)) - 0.8) ** 2), "neg").mean()

    gain = adapter.denoiser.gain
    with torch.no_grad():
        gain.fill_(0.9)
    (analytic,) = torch.autograd.grad(loss(), gain)
    h = 1e-6
    with torch.no_grad():
        gain.fill_(0.9 + h)
        up = loss()
        gain.fill_(0.9 - h)
        down = loss()
    numeric = (up - down) / (2 * h)
    assert abs(float(analytic)) > 1e-4  # the check has something to compare
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-10)


class CallLog:
    """Which model calls of a run carried a gradient back: (sigma of the call, rows)."""

    def __init__(self, adapter):
        self.calls, forward = [], adapter.forward

        def logged(x, t, tensors, extra):
            out = forward(x, t, tensors, extra)
            if out.requires_grad:
                record = {"t": [round(float(v), 3) for v in t.unique()], "grad": False}
                self.calls.append(record)
                out.register_hook(lambda grad: record.__setitem__("grad", bool(grad.abs().sum() > 0)))
            return out

        adapter.forward = logged

    def grad_timesteps(self) -> list[float]:
        return sorted({t for c in self.calls if c["grad"] for t in c["t"]})


def run_mode(tmp_path, *overrides, steps=6):
    module, config = gaussian_trainer("reward_backprop", tmp_path, "rewards=[test_smooth_brightness]", "iterations=1",
                                      "group_size=2", f"rollout.num_steps={steps}", "rollout.kernel=ode",
                                      "run.checkpoint_every=0", *overrides)
    adapter = GaussianAdapter(shape=(3, 4, 4))
    log = CallLog(adapter)
    module.train(config, adapter=adapter)
    return log, adapter.schedule(steps).timesteps.tolist()


@pytest.mark.parametrize("mode, overrides, kept", [
    ("draft", ["truncation_steps=1"], [5]),
    ("draft", ["truncation_steps=3"], [3, 4, 5]),
    ("alignprop", ["cut_distribution=fixed", "cut_step=2"], [2, 3, 4, 5]),
    ("full", [], [0, 1, 2, 3, 4, 5]),
])
def test_truncation_keeps_gradients_exactly_from_the_cut(mode, overrides, kept, tmp_path):
    log, timesteps = run_mode(tmp_path, f"mode={mode}", *overrides)
    assert log.grad_timesteps() == sorted(round(timesteps[i], 3) for i in kept)


def test_draft_lv_and_refl_take_one_gradient_call_per_copy(tmp_path):
    log, timesteps = run_mode(tmp_path / "lv", "mode=draft_lv", "lv_renoise=3")
    assert [c["t"] for c in log.calls if c["grad"]] == [[round(timesteps[-1], 3)]] * 3
    log, timesteps = run_mode(tmp_path / "refl", "mode=refl", "refl_last_fraction=0.5")
    (call,) = [c for c in log.calls if c["grad"]]
    assert call["t"][0] in [round(t, 3) for t in timesteps[3:]]


def test_alignprop_draws_one_cut_per_rollout_around_its_centre():
    from align.trainers.reward_backprop import RewardBackpropConfig, first_grad_step

    gaussian = RewardBackpropConfig(mode="alignprop", cut_distribution="gaussian", cut_std=2.0)
    cuts = [first_grad_step(gaussian, 50, random.Random(i)) for i in range(2000)]
    assert abs(sum(cuts) / len(cuts) - 42) < 0.3 and min(cuts) >= 0 and max(cuts) <= 49
    uniform = RewardBackpropConfig(mode="alignprop", cut_distribution="uniform")
    assert set(first_grad_step(uniform, 6, random.Random(i)) for i in range(200)) == set(range(6))


def test_the_reward_rises_and_the_regulariser_holds_the_model_to_its_reference(tmp_path):
    """Brightness pulls the analytic model's gain away from 1 (its exact velocity); the denoising
    loss on reference-model samples (prior preservation) pulls it back."""
    def gain_after(weight):
        module, config = gaussian_trainer("reward_backprop", tmp_path / str(weight), "rewards=[test_smooth_brightness]",
                                          "iterations=8", "group_size=2", "rollout.kernel=ode", "optim.lr=0.05",
                                          "mode=draft", "truncation_steps=2", f"regularizer_weight={weight}",
                                          "regularizer_samples=4")
        adapter = GaussianAdapter(shape=(3, 4, 4))
        summary = module.train(config, adapter=adapter)
        return float(adapter.denoiser.gain), summary

    free, summary = gain_after(0)
    held, _ = gain_after(20)
    assert summary["reward_after"] > summary["reward_before"] + 0.02, summary
    assert abs(free - 1) > 0.1 and abs(held - 1) < 0.5 * abs(free - 1), (free, held)


def test_reward_losses_closed_forms():
    r = torch.tensor([0.2, 1.5, 3.0])
    assert reward_loss(r, "neg").tolist() == pytest.approx([-0.2, -1.5, -3.0])
    assert reward_loss(r, "one_minus").tolist() == pytest.approx([0.8, -0.5, -2.0])
    assert reward_loss(r, "target", target=1.5).tolist() == pytest.approx([1.3, 0.0, 1.5])
    assert reward_loss(r, "hinge", margin=2.0).tolist() == pytest.approx([1.8, 0.5, 0.0])


@pytest.mark.parametrize("override, expected", [
    ("rewards=[jpeg_compressibility]", "rewards[0]: reward 'jpeg_compressibility' is not differentiable"),
    ("mode=drft", "mode"),
    ("truncation_steps=7", "truncation_steps must be in 1..6"),
    ("loss=square", "loss"),
    ("regularizer_data=missing.jsonl", "regularizer_data: file not found: missing.jsonl"),
])
def test_bad_settings_are_one_line(override, expected, tmp_path):
    with pytest.raises(ConfigError, match=re.escape(expected)) as err:
        module, config = gaussian_trainer("reward_backprop", tmp_path, "rewards=[test_smooth_brightness]",
                                          "rollout.kernel=ode", override)
        module.check_config(config)
    assert "\n" not in str(err.value)
