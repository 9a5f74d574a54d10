"""Each trainer option shown to have its effect, through real runs on the analytic Gaussian model:
the sliding (Mix) window, ``timestep_fraction``, TempFlow's noise weighting, GRPO-Guard against no
guard, the ``max_nfe`` stop, DenseGRPO's noise calibration, the KL term after some updates,
JPEG incompressibility, and the evaluation's own settings."""

from __future__ import annotations

import json

import pytest
import torch

from align.trainers import ppo, trainer_module
from rewards.base import Reward
from tests.conftest import GaussianAdapter, gaussian_trainer


class Brightness(Reward):
    def score(self, samples, prompts, **context):
        return {"score": samples.mean(dim=(1, 2, 3))}


def configured(name, tmp_path, *extra):
    return gaussian_trainer(name, tmp_path, "iterations=4", "eval.per_prompt=4", *extra)


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


class Spy:
    """Records every call of ``module.<name>`` (with the iteration it came in) and passes it on."""

    def __init__(self, monkeypatch, module, name, record):
        self.calls, self.original, self.record = [], getattr(module, name), record
        monkeypatch.setattr(module, name, self)

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        self.calls.append(self.record(args, kwargs, out))
        return out


def image_adapter():
    return GaussianAdapter(shape=(3, 4, 4))


def steps_per_iteration(monkeypatch, module, name, tmp_path, *extra):
    """The steps trained in each iteration (the trainer's per-step PPO calls, in order)."""
    iterations: list[list[int]] = []
    spy = Spy(monkeypatch, ppo, "ppo_transition_loss", lambda a, k, out: a[1].step)
    progress = module.progress

    class Counting(progress):
        def __iter__(self):
            for iteration in super().__iter__():
                start = len(spy.calls)
                yield iteration
                iterations.append(spy.calls[start:])

    monkeypatch.setattr(module, "progress", Counting)
    _, config = configured(name, tmp_path, *extra)
    module.train(config, adapter=image_adapter())
    return iterations


def test_sliding_window_moves_one_step_every_n_iterations(monkeypatch, tmp_path):
    module = trainer_module("flow_grpo")
    trained = steps_per_iteration(monkeypatch, module, "flow_grpo", tmp_path, "group_size=4", "ppo.kl_beta=0",
                                  "window_size=2", "window_mode=sliding", "window_slide_every=2", "iterations=8")
    # 6 steps, windows of 2 end before the last step: starts 0..3, one step later every 2 iterations
    assert trained == [[0, 1], [0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [3, 4], [3, 4]]


def test_random_window_trains_only_its_steps(monkeypatch, tmp_path):
    module = trainer_module("flow_grpo")
    trained = steps_per_iteration(monkeypatch, module, "flow_grpo", tmp_path, "group_size=4", "ppo.kl_beta=0",
                                  "window_size=2", "window_mode=random", "iterations=8")
    assert all(len(s) == 2 and s[1] == s[0] + 1 and s[1] < 5 for s in trained)
    assert len({tuple(s) for s in trained}) > 1  # the window moves at random


def test_timestep_fraction_trains_a_random_subset_of_the_steps(monkeypatch, tmp_path):
    module = trainer_module("flow_grpo")
    trained = steps_per_iteration(monkeypatch, module, "flow_grpo", tmp_path, "group_size=4", "ppo.kl_beta=0",
                                  "ppo.timestep_fraction=0.4", "iterations=6")
    # 5 trainable steps (the last one is not), 40% of them: 2, a different draw each iteration
    assert all(len(s) == 2 and len(set(s)) == 2 and max(s) < 5 for s in trained)
    assert len({tuple(s) for s in trained}) > 1
    full = steps_per_iteration(monkeypatch, module, "flow_grpo", tmp_path / "full", "group_size=4", "ppo.kl_beta=0",
                               "iterations=1")
    assert full == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("weighting", [True, False])
def test_tempflow_noise_weighting_scales_each_steps_loss_by_its_noise_level(weighting, monkeypatch, tmp_path):
    """The loss of step t reaches backward multiplied by std_t / mean(std) (1 without weighting):
    the high-noise steps that decide the layout are not drowned by the low-noise ones."""
    module = trainer_module("tempflow_grpo")
    stds, backward = [], []
    original_loss = ppo.ppo_transition_loss

    def unit_loss(run_, part, *args, **kwargs):  # the real loss, replaced by 1: backward sees the weight
        original_loss(run_, part, *args, **kwargs)
        stds.append(float(part.std.mean()))
        return torch.ones((), requires_grad=True), {}

    monkeypatch.setattr(ppo, "ppo_transition_loss", unit_loss)
    from accelerate import Accelerator

    original = Accelerator.backward
    monkeypatch.setattr(Accelerator, "backward", lambda self, loss, **kw: (backward.append(float(loss.detach())),
                                                                          original(self, loss, **kw))[1])
    _, config = configured("tempflow_grpo", tmp_path, "group_size=1", "branches_per_step=4", "iterations=1",
                           "steps_per_iteration=3", f"noise_weighting={str(weighting).lower()}")
    module.train(config, adapter=image_adapter())
    stds = torch.tensor(stds)
    factors = torch.tensor(backward) * len(stds)
    expected = stds / stds.mean() if weighting else torch.ones_like(stds)
    assert len(stds) == 3 and stds.std() > 0.01  # the three steps have different noise levels
    torch.testing.assert_close(factors, expected, rtol=1e-4, atol=1e-6)


def test_grpo_guard_centres_every_steps_log_ratio(monkeypatch, tmp_path):
    """Two inner epochs, so the second pass sees log-ratios that drift from 0: with GRPO-Guard the
    log-ratio each step's PPO term sees is centred (mean 0 per step) and its spread is kept; without
    it the drift is there."""
    import align.losses

    def log_ratio_means(guard, out):
        spy = Spy(monkeypatch, align.losses, "ppo_clip_loss",
                  lambda a, k, o: (a[0] - a[1]).detach())
        _, config = configured("flow_grpo", out, "group_size=8", "ppo.kl_beta=0", "ppo.inner_epochs=2", "iterations=2",
                               "ppo.clip_range=0.2", f"guard={str(guard).lower()}")
        trainer_module("flow_grpo").train(config, adapter=image_adapter())
        monkeypatch.setattr(align.losses, "ppo_clip_loss", spy.original)
        return spy.calls

    guarded = log_ratio_means(True, tmp_path / "guard")
    plain = log_ratio_means(False, tmp_path / "plain")
    assert max(float(r.abs().max()) for r in plain) > 1e-3  # later passes are off-policy
    assert max(abs(float(r.mean())) for r in guarded) < 1e-6
    assert max(abs(float(r.mean())) for r in plain) > 1e-4
    assert max(float(r.std()) for r in guarded) > 1e-4  # centred, not flattened


def test_max_nfe_stops_the_run_once_the_budget_is_spent(tmp_path):
    module, config = configured("flow_grpo", tmp_path, "group_size=4", "ppo.kl_beta=0", "iterations=10",
                                "max_nfe=60")  # 4 rows x 6 steps = 24 evaluations an iteration
    module.train(config, adapter=image_adapter())
    trained = [m for m in metrics(tmp_path) if "train/loss" in m]
    assert [m["nfe"] for m in trained] == [24, 48, 72]  # the third crosses 60; no fourth starts


def test_dense_grpo_calibration_moves_each_steps_noise_toward_the_mean_spread(monkeypatch, tmp_path):
    """After one iteration, steps whose gains spread less than the mean get more noise and the
    others less; the next iteration's rollout samples (and records) each step with its new scale."""
    module = trainer_module("dense_grpo")
    spy = Spy(monkeypatch, ppo, "ppo_transition_loss", lambda a, k, out: (a[1].step, a[1].noise_scale))
    _, config = configured("dense_grpo", tmp_path, "group_size=4", "iterations=2", "calibrate_noise=true",
                           "calibration_bounds=[0.1,10.0]", "ppo.clip_range=0.2")
    module.train(config, adapter=image_adapter())
    first = next(m for m in metrics(tmp_path) if "train/loss" in m)
    spreads = torch.tensor([first[f"dense/gain_std/step{t}"] for t in range(5)])
    scales = torch.tensor([first[f"dense/noise_scale/step{t}"] for t in range(5)])
    below = spreads < spreads.mean()
    assert below.any() and (~below).any()
    assert (scales[below] > 1).all() and (scales[~below] < 1).all()
    second = dict(spy.calls[5:])  # iteration 2's steps, with the scale they were sampled at
    torch.testing.assert_close(torch.tensor([second[t] for t in range(5)]), scales)


def test_kl_term_is_zero_on_the_reference_then_holds_the_policy_back(tmp_path):
    """The KL to the reference (a frozen copy in full fine-tuning) is exactly 0 before the first
    update, positive after, and a strong KL keeps the trained weight closer to the reference."""
    def run(beta, out):
        module, config = configured("flow_grpo", out, "group_size=8", f"ppo.kl_beta={beta}", "iterations=5",
                                    "ppo.clip_range=0.2")
        adapter = image_adapter()
        module.train(config, adapter=adapter)
        return adapter.denoiser.gain.item(), [m for m in metrics(out) if "train/loss" in m]

    free_gain, _ = run(0.0, tmp_path / "free")
    held_gain, rows = run(50.0, tmp_path / "held")
    assert rows[0]["train/kl"] == 0.0 and all(m["train/kl"] > 0 for m in rows[1:])
    assert free_gain > 1.05 and abs(held_gain - 1.0) < abs(free_gain - 1.0) / 2


def test_jpeg_incompressibility_prefers_detail_and_mirrors_compressibility():
    from rewards import build_reward

    flat = torch.full((1, 3, 32, 32), 0.5)
    noisy = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    incompressible, compressible = build_reward("jpeg_incompressibility"), build_reward("jpeg_compressibility")
    images, prompts = torch.cat([flat, noisy]), ["a", "b"]
    size = incompressible(images, prompts).total
    assert size[1] > 2 * size[0] > 0  # random detail costs far more bytes than a flat grey
    torch.testing.assert_close(size, -compressible(images, prompts).total)


def test_evaluation_uses_its_own_negative_prompt_kernel_and_seed(monkeypatch, tmp_path):
    """eval.negative_prompt (or the trainer's) reaches the CFG branch; eval.seed and eval.kernel
    change the evaluation samples, so its reward, while training stays the same."""
    encoded = []
    original = GaussianAdapter.encode

    def spy(self, prompts, negative_prompt="", guidance_scale=None):
        encoded.append(negative_prompt)
        return original(self, prompts, negative_prompt, guidance_scale)

    monkeypatch.setattr(GaussianAdapter, "encode", spy)

    def before(out, *extra):
        module, config = configured("flow_grpo", out, "group_size=4", "ppo.kl_beta=0", "iterations=1",
                                    "rollout.guidance_scale=2.0", *extra)
        encoded.clear()
        return module.train(config, adapter=image_adapter())["reward_before"], list(encoded)

    base, negatives = before(tmp_path / "a", "negative_prompt=blurry")
    assert negatives[0] == "blurry" and negatives[1] == "blurry"  # evaluation, then training
    _, negatives = before(tmp_path / "b", "negative_prompt=blurry", "eval.negative_prompt=ugly")
    assert negatives[0] == "ugly" and negatives[1] == "blurry"
    assert before(tmp_path / "c", "negative_prompt=blurry")[0] == base  # same seed: same evaluation
    assert before(tmp_path / "d", "negative_prompt=blurry", "eval.seed=7")[0] != base
    assert before(tmp_path / "e", "negative_prompt=blurry", "eval.kernel=flow_grpo")[0] != base


def test_sample_and_score_keeps_gradients_through_chosen_steps(tmp_path):
    """Reward backprop's seam: with ``grad_steps`` the reward of the decoded samples has a gradient
    reaching the denoiser's weight (the analytic model's gain); without, sampling keeps no graph."""
    from align.training.run import Run
    from align.trainers.scoring import sample_and_score

    _, config = configured("flow_grpo", tmp_path, "group_size=2", "run.log_with=none")
    run = Run(config, model=config.model, lora=config.lora, optim=config.optim, run=config.run,
              adapter=image_adapter())
    reward = Brightness()
    _, _, scores, _ = sample_and_score(run, config, reward, ["0.5"], config.rollout, 0, grad_steps=[4, 5])
    scores.total.mean().backward()
    gain = run.adapter.denoiser.gain
    assert gain.grad is not None and gain.grad.abs() > 0
    _, _, plain, _ = sample_and_score(run, config, reward, ["0.5"], config.rollout, 0)
    assert not plain.total.requires_grad
