"""DiffusionNFT: the loss's gradient direction, the optimality mapping, the sampling policy's EMA,
resume, and short training runs on the analytic Gaussian model and a LoRA smoke run on the embedded
toy model (its reward rise: test_toy_reward_rise.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from align.config import ConfigError, load_config
from align.evaluation import EvalConfig
from align.losses import nft_loss
from align.training.model_setup import LoraSettings
from align.training.optim import OptimConfig
from align.training.run import RunConfig
from align.models import ModelConfig
from align.sampling.rollout import RolloutConfig
from align.trainers.snapshot import WeightSnapshot
from align.trainers.diffusion_nft import (DiffusionNFTConfig, adaptive_nft_loss, check_config,
                                          draw_t, optimality, policy_decay, train)
from conftest import GaussianAdapter
from pipelines.toy import TOY_WEIGHTS_DIR
from rewards.base import Reward, register_reward

pytestmark = pytest.mark.usefixtures("one_thread")
needs_toy = pytest.mark.skipif(not (TOY_WEIGHTS_DIR / "config.json").exists(),
                               reason="toy model weights not built (scripts/train_toy.py)")
#: the prompts the CFG-free toy model does worst on (digit reward 0.77-0.86 at 6 steps, the rest ~0.94)


@register_reward("test_nft_brightness")
class Brightness(Reward):
    """Mean pixel value of the (clamped) samples."""

    def score(self, samples, prompts, **context):
        return {"score": samples.float().mean(dim=(1, 2, 3))}


# --- the loss ---------------------------------------------------------------------------------------


def _gradient(loss_fn, r: float, beta: float):
    torch.manual_seed(0)
    v_old, target = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    v_theta = v_old.clone().requires_grad_(True)
    loss_fn(v_theta, v_old, target, torch.full((4,), r), beta).backward()
    return v_theta.grad, v_old, target


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_nft_gradient_pulls_v_theta_to_the_target_for_r_1_and_pushes_it_away_for_r_0(beta):
    grad, v_old, target = _gradient(nft_loss, 1.0, beta)
    # at v_theta = v_old: d/dv_theta r ||v+ - v||^2 = 2 beta (v_old - v) / n per sample
    torch.testing.assert_close(grad, 2 * beta * (v_old - target) / (3 * 8 * 8 * 4))
    step = v_old - 10.0 * grad  # a small descent step
    assert (step - target).norm() < (v_old - target).norm()

    grad0, _, _ = _gradient(nft_loss, 0.0, beta)
    torch.testing.assert_close(grad0, -grad)  # r = 0: the negative policy, the opposite direction
    assert (v_old - 10.0 * grad0 - target).norm() > (v_old - target).norm()

    half, _, _ = _gradient(nft_loss, 0.5, beta)
    assert half.abs().max() < 1e-6 * grad.abs().max()  # r = 1/2 at v_theta = v_old: no push either way


def test_adaptive_weighting_keeps_the_direction():
    def loss(v_theta, v_old, target, r, beta):
        return adaptive_nft_loss(v_theta, v_old, target, r, beta, torch.full((4,), 0.7))

    grad, v_old, target = _gradient(loss, 1.0, 1.0)
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(), (v_old - target).flatten(), dim=0)
    assert cosine > 0.99  # per-sample positive weights: still towards the target


def test_optimality_maps_clipped_advantages_to_unit_interval():
    a = torch.tensor([-10.0, -5.0, -2.5, 0.0, 2.5, 5.0, 10.0])
    torch.testing.assert_close(optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0]))


# --- the sampling policy -----------------------------------------------------------------------------


def test_ema_update_swap_and_state():
    p = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    q = torch.nn.Parameter(torch.tensor([[3.0]]))
    policy = WeightSnapshot([p, q])
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 6.0]))
        q.copy_(torch.tensor([[-1.0]]))
    policy.update(0.25)  # old <- 0.25 old + 0.75 theta
    torch.testing.assert_close(policy.shadow[0], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(policy.shadow[1], torch.tensor([[0.0]]))
    assert policy.distance() == pytest.approx(((0.25 + 1.0 + 1.0) / 3) ** 0.5)

    with policy.swapped():
        torch.testing.assert_close(p.detach(), torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 6.0]))  # trained weights restored

    state = policy.state_dict()  # holds the live tensors: later updates show in it
    policy.update(0.0)  # decay 0: the old policy becomes theta
    torch.testing.assert_close(state["shadow"][0], torch.tensor([3.0, 6.0]))
    fresh = WeightSnapshot([torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(1, 1))])
    fresh.load_state_dict({"shadow": [torch.tensor([7.0, 8.0]), torch.tensor([[9.0]])]})
    torch.testing.assert_close(fresh.shadow[0], torch.tensor([7.0, 8.0]))
    with pytest.raises(ConfigError, match="LoRA settings"):
        fresh.load_state_dict({"shadow": [torch.zeros(3)]})


def test_policy_decay_schedule():
    config = DiffusionNFTConfig(policy_ema_decay=0.5, policy_ema_rate=0.001)
    assert [policy_decay(config, i) for i in (0, 100, 499, 5000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])
    config.policy_ema_rate = None
    assert policy_decay(config, 0) == 0.5


def test_t_distributions():
    g = torch.Generator().manual_seed(0)
    config = DiffusionNFTConfig(t_min=0.2, t_max=0.6)
    t = draw_t(config, 2000, g, torch.linspace(1, 0, 11))
    assert 0.2 <= t.min() and t.max() <= 0.6 and abs(float(t.mean()) - 0.4) < 0.01
    config = DiffusionNFTConfig(t_distribution="logit_normal")
    t = draw_t(config, 4000, g, torch.linspace(1, 0, 11))
    assert abs(float(t.median()) - 0.5) < 0.03 and 0 < t.min() and t.max() < 1
    config = DiffusionNFTConfig(t_distribution="schedule", t_min=0.25)
    t = draw_t(config, 200, g, torch.linspace(1, 0, 5))  # levels 1, .75, .5, .25 (0 is not a step)
    assert set(t.tolist()) == {1.0, 0.75, 0.5, 0.25}


@pytest.mark.parametrize("change, match", [
    ({"beta": 0.0}, "beta"), ({"t_distribution": "beta"}, "t_distribution"), ({"t_min": 0.7, "t_max": 0.3}, "t_min"),
    ({"policy_ema_decay": 1.0}, "policy_ema_decay"), ({"loss_weighting": "x"}, "loss_weighting"),
    ({"group_size": 1, "adv_std": "group"}, "group_size"),
])
def test_bad_config_is_a_clear_error(change, match):
    with pytest.raises(ConfigError, match=match):
        check_config(DiffusionNFTConfig(**change))


# --- training ----------------------------------------------------------------------------------------


def gaussian_config(out: Path, **overrides) -> DiffusionNFTConfig:
    """The analytic Gaussian flow (tests/conftest.py): prompt "m" means data around m; the only
    weight is a gain on the exact velocity, fully fine-tuned."""
    values = dict(model=ModelConfig(name="toy", device="cpu"),
                  rollout=RolloutConfig(num_steps=8, kernel="ode", guidance_scale=1.0),
                  rewards=["test_nft_brightness"], prompts=["0.3", "0.5"], eval_prompts=["0.3", "0.5"],
                  iterations=20, prompts_per_iteration=2, group_size=8, t_per_sample=2,
                  lora=LoraSettings(enabled=False), optim=OptimConfig(lr=1e-2, weight_decay=0.0),
                  run=RunConfig(output_dir=str(out), seed=0, log_with="none", checkpoint_every=0,
                                progress=False, resume=None), eval=EvalConfig(per_prompt=16))
    values.update(overrides)
    return DiffusionNFTConfig(**values)


def test_gaussian_run_raises_the_reward(tmp_path):
    """Measured (seeds 0, 1, 2): eval reward 0.4192 -> 0.4568, 0.4590, 0.4552 (+0.038 +- 0.002)."""
    adapter = GaussianAdapter(shape=(3, 4, 4))
    summary = train(gaussian_config(tmp_path / "run"), adapter=adapter)
    assert summary["reward_after"] - summary["reward_before"] > 0.02, summary
    assert adapter.denoiser.gain.item() > 1.1  # brighter samples come from a larger velocity gain


def test_options_cfg_sampling_sde_adaptive_kl_each_take_effect(tmp_path):
    """CFG and an SDE in the sampler, conditional-only training, logit-normal t, the adaptive
    weighting, the KL to the reference and several minibatches: the KL is 0 while theta is the
    reference and positive once it moved; the adaptive weighting changes the loss of the same
    batch; 2 epochs of 2 minibatches make 4 updates an iteration."""
    def run(out, **options):
        config = gaussian_config(out, iterations=2, train_batch_size=8, t_distribution="logit_normal", kl_beta=0.1,
                                 beta=0.1, inner_epochs=2, rollout=RolloutConfig(num_steps=4, kernel="flow_grpo",
                                                                                 guidance_scale=2.0), **options)
        train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
        return [m for m in (json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())
                if "train/loss" in m]

    adaptive = run(tmp_path / "adaptive", loss_weighting="adaptive")
    plain = run(tmp_path / "plain", loss_weighting="velocity")
    assert len(adaptive) == 2 and adaptive[0]["policy/ema_decay"] < 0.01
    assert adaptive[0]["train/kl"] > 0 and adaptive[1]["train/kl"] > 0  # 0 on the very first minibatch only
    assert adaptive[0]["train/loss"] != plain[0]["train/loss"]


def test_resume_restores_the_sampling_policy(tmp_path):
    """4 + 2 resumed iterations end exactly where 6 uninterrupted ones do; the EMA (decay 0.5 from
    iteration 3 on) matters: losing it changes the samples and the result."""
    def config(out, iterations):
        return gaussian_config(out, iterations=iterations, group_size=4, policy_ema_rate=0.2,
                               run=RunConfig(output_dir=str(out), seed=0, log_with="none", checkpoint_every=2,
                                             progress=False), eval=EvalConfig(per_prompt=2))

    whole = GaussianAdapter(shape=(3, 4, 4))
    train(config(tmp_path / "whole", 6), adapter=whole)
    train(config(tmp_path / "parts", 4), adapter=GaussianAdapter(shape=(3, 4, 4)))
    resumed = GaussianAdapter(shape=(3, 4, 4))
    train(config(tmp_path / "parts", 6), adapter=resumed)
    assert resumed.denoiser.gain.item() == whole.denoiser.gain.item()
    from align.training.checkpoint_files import read_part

    checkpoint = tmp_path / "parts" / "checkpoints" / "iteration-000004"
    saved = read_part(checkpoint, "state")
    theta = read_part(checkpoint, "trainable")["gain"]
    old = saved["trainer"]["snapshot"]["shadow"][0]
    assert 0 < abs(old.item() - theta.item()) < abs(theta.item() - 1.0)  # an EMA between start and theta


def test_ddpm_models_are_rejected(tmp_path):
    class DDPMGaussian(GaussianAdapter):
        def schedule(self, num_steps, *, latent_shape=None):
            schedule = super().schedule(num_steps)
            schedule.kind = "ddpm"
            return schedule

    with pytest.raises(ConfigError, match="ddpo"):
        train(gaussian_config(tmp_path / "run", iterations=1), adapter=DDPMGaussian(shape=(3, 4, 4)))


def toy_config(out: Path, *overrides: str) -> DiffusionNFTConfig:
    """The embedded toy model and the digit reward, configured as on the command line."""
    return load_config(DiffusionNFTConfig, None, [
        "model.name=toy", "rewards=[digit]", f"run.output_dir={out}", "run.log_with=none", "run.resume=null",
        "run.progress=false", "run.checkpoint_every=0", "lora.rank=8", "lora.alpha=16", *overrides])


@needs_toy
def test_toy_model_lora_smoke(tmp_path):
    """Two iterations with the LoRA: the old policy trails theta once the EMA decay is nonzero, and
    the LoRA is exported."""
    out = tmp_path / "run"
    train(toy_config(out, "iterations=2", "rollout.num_steps=4", "group_size=4", "prompts_per_iteration=2",
                     "eval.per_prompt=2", "t_per_sample=2", "train_batch_size=4", "optim.lr=3e-3"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in rows if "train/loss" in m]
    # 8 samples in minibatches of 4: 2 updates an iteration; decay min(0.5, 0.001 x updates so far)
    assert [m["policy/ema_decay"] for m in trained] == pytest.approx([0.002, 0.004])
    assert 0.0 < trained[0]["policy/weight_distance"]  # the old policy trails theta
    assert trained[1]["train/policy_gap"] > 0.0  # the second minibatch sees an updated theta
    assert (out / "lora" / "lora.safetensors").exists()
