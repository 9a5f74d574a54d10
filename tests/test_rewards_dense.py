"""Dense step-level rewards: ODE completion, the self-distilled noise-aware reward, the latent PRM.

The generator is an analytic flow model whose exact velocity is known: prompt "a red digit 7" means
data x0 ~ N(template(7, red), s0^2 I) in [-1, 1] pixel space, so x0_hat and ODE completions are exact
and trajectories cost nothing.
"""

from __future__ import annotations

import pytest
import torch

from align.config import ConfigError
from align.sampling.rollout import RolloutConfig, rollout
from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.toy import COLOURS, colour_digits, digit_split, toy_prompt
from rewards import build_reward
from rewards.base import RewardError
from rewards.dense import (dense_step_rewards, ode_complete, pairwise_bt_loss, predict_x0, prm_rows_from_rollout)
from rewards.digit_classifier import load_digit_classifier, parse_prompt


pytestmark = pytest.mark.usefixtures("one_thread")


class DigitGaussianAdapter(ModelAdapter):
    """Exact velocity of x0 ~ N(mu, s0^2 I) with mu the coloured template of the prompt's digit:
    var = (1 - s)^2 s0^2 + s^2, r = x - (1 - s) mu, v = s r / var - (mu + (1 - s) s0^2 r / var)."""

    name = "digit_gaussian"
    default_steps = 8
    default_guidance = 1.0

    def __init__(self, s0: float = 0.8) -> None:
        super().__init__()
        _, _, images, labels = digit_split()
        first = [int((labels == d).nonzero()[0]) for d in range(10)]
        self.templates = {(d, c): colour_digits(images[first[d]][None], torch.tensor([k]), size=16)[0] * 2 - 1
                          for d in range(10) for k, c in enumerate(COLOURS)}
        self.s0 = s0
        self.denoiser = torch.nn.Linear(1, 1)  # gives the adapter a device and dtype

    def encode(self, prompts, negative_prompt="", guidance_scale=None):
        mus = []
        for p in prompts:
            d, c = parse_prompt(p)
            mus.append(self.templates[(0 if d is None else d, c or "white")])
        return Conditioning({"mu": torch.stack(mus)}, None, 1.0)

    def posterior_mean(self, x, sigma, mu):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        var = (1 - s) ** 2 * self.s0 ** 2 + s ** 2
        return mu + (1 - s) * self.s0 ** 2 * (x - (1 - s) * mu) / var

    def forward(self, x, t, tensors, extra):
        s = (t / 1000).reshape(-1, 1, 1, 1)
        mu = tensors["mu"]
        var = (1 - s) ** 2 * self.s0 ** 2 + s ** 2
        r = x - (1 - s) * mu
        return s * r / var - (mu + (1 - s) * self.s0 ** 2 * r / var)

    def decode(self, latents):
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def schedule(self, num_steps, *, latent_shape=None):
        sigmas = torch.linspace(1, 0, num_steps + 1)
        return Schedule(sigmas[:-1] * 1000, sigmas, "flow")

    def latent_shape(self, height=None, width=None, num_frames=None):
        return (3, 16, 16)


@pytest.fixture(scope="module")
def adapter():
    return DigitGaussianAdapter()


def prompts_for(n, offset=0):
    return [toy_prompt((i + offset) % 10, COLOURS[(i + 2 * offset) % len(COLOURS)]) for i in range(n)]


def test_predict_x0_and_ode_completion(adapter):
    prompts = prompts_for(4)
    cond = adapter.encode(prompts)
    schedule = adapter.schedule(8)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sigma = schedule.levels[3]
    v = adapter.predict(x, schedule.timesteps[3], cond)
    torch.testing.assert_close(predict_x0(x, v, sigma), adapter.posterior_mean(x, sigma, cond.tensors["mu"]),
                               atol=1e-5, rtol=1e-5)
    # completion from step 3 = the remaining Euler steps; from the end it is the identity
    manual = x.clone()
    for i in range(3, 8):
        out = adapter.predict(manual, schedule.timesteps[i], cond)
        manual = manual + out * (schedule.levels[i + 1] - schedule.levels[i])
    torch.testing.assert_close(ode_complete(adapter, x, 3, cond, schedule), manual)
    torch.testing.assert_close(ode_complete(adapter, x, 3, cond, schedule, max_batch=3), manual)
    torch.testing.assert_close(ode_complete(adapter, x, 8, cond, schedule), x)
    with pytest.raises(RewardError, match="outside"):
        ode_complete(adapter, x, 9, cond, schedule)


def test_dense_step_rewards_closed_form():
    values = torch.tensor([[0.1, 0.4, 0.5], [0.3, 0.2, 0.9]])
    torch.testing.assert_close(dense_step_rewards(values, normalize=False), torch.tensor([[0.3, 0.1], [-0.1, 0.7]]))
    norm = dense_step_rewards(values, eps=0.0)
    torch.testing.assert_close(norm, torch.tensor([[1.0, -1.0], [-1.0, 1.0]]))
    with pytest.raises(ValueError):
        dense_step_rewards(torch.zeros(3))


def test_ode_completion_reward_matches_completion_then_scoring(adapter):
    prompts = prompts_for(4)
    cond = adapter.encode(prompts)
    schedule = adapter.schedule(8)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    reward = build_reward({"name": "ode_completion", "reward": "digit"})
    pixels = torch.zeros(4, 3, 16, 16)
    out = reward(pixels, prompts, latents=x, step=5, adapter=adapter, cond=cond, schedule=schedule)
    expected = build_reward("digit")(adapter.decode(ode_complete(adapter, x, 5, cond, schedule)), prompts).total
    torch.testing.assert_close(out.total, expected)
    torch.testing.assert_close(reward(pixels, prompts).total, build_reward("digit")(pixels, prompts).total)
    with pytest.raises(RewardError, match="needs adapter"):
        reward(pixels, prompts, latents=x)
    # dense rewards of one trajectory from the values of its states
    values = []
    state = x
    for i in range(9):
        values.append(reward(pixels, prompts, latents=state, step=i, adapter=adapter, cond=cond,
                             schedule=schedule).total)
        if i < 8:
            out = adapter.predict(state, schedule.timesteps[i], cond)
            state = state + out * (schedule.levels[i + 1] - schedule.levels[i])
    # an ODE trajectory: every completion ends at the same sample, so no step adds reward
    torch.testing.assert_close(dense_step_rewards(torch.stack(values, 1), normalize=False), torch.zeros(4, 8),
                               atol=1e-5, rtol=0)


def _errors(reward, data, steps, batch, use_student=True):
    out = []
    with torch.no_grad():
        for i in range(steps):
            rows = slice(i * batch, (i + 1) * batch)
            x, p, s = data["x0_hat"][rows], data["prompts"][rows], data["sigmas"][rows]
            pred = reward(x, p, sigma=s).total if use_student else reward.teacher(x, p).total
            out.append(((pred - data["targets"][rows]) ** 2).mean().item())
    return torch.tensor(out)


def test_noise_aware_distillation(adapter, tmp_path):
    shared = load_digit_classifier()
    before = {k: v.clone() for k, v in shared.state_dict().items()}
    reward = build_reward({"name": "noise_aware", "teacher": "digit", "lr": 1e-3, "curriculum_start": 0.2,
                           "curriculum_steps": 40})
    assert reward.differentiable and reward.max_sigma(0) == pytest.approx(0.2)
    assert reward.max_sigma(20) == pytest.approx(0.6) and reward.max_sigma(1000) == 1.0
    test = reward.collect(adapter, prompts_for(16, offset=3), num_steps=8, generator=torch.Generator().manual_seed(1))
    assert test["x0_hat"].shape == (128, 3, 16, 16) and test["sigmas"][:16].eq(1.0).all()
    # at the start the student is the teacher (identity calibration)
    torch.testing.assert_close(_errors(reward, test, 8, 16), _errors(reward, test, 8, 16, use_student=False))
    teacher_err = _errors(reward, test, 8, 16, use_student=False)
    history = reward.distill(adapter, prompts_for(16), updates=80, batch_size=32, num_steps=8)
    assert history[0]["max_sigma"] == pytest.approx(0.2) and history[-1]["max_sigma"] == 1.0
    # x0_hat at high noise looks like a clean template, so the teacher overrates it; the student learns
    # what the trajectory will actually reach (held-out prompts)
    student_err = _errors(reward, test, 8, 16)
    assert student_err[:3].mean() < 0.6 * teacher_err[:3].mean()
    assert student_err.mean() < teacher_err.mean()
    # the shared clean classifier is untouched; the student trains its own copy
    for k, v in load_digit_classifier().state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert not any(p.requires_grad for p in shared.parameters())
    # save / load
    path = reward.save(tmp_path / "student.safetensors")
    again = build_reward({"name": "noise_aware", "teacher": "digit", "checkpoint": str(path)})
    x, p, s = test["x0_hat"][:8], test["prompts"][:8], test["sigmas"][:8]
    torch.testing.assert_close(again(x, p, sigma=s).total, reward(x, p, sigma=s).total)
    with pytest.raises(ConfigError, match="no torch modules"):
        build_reward({"name": "noise_aware", "teacher": "stroke_thickness"})


def test_latent_prm_learns_from_rollouts(adapter, tmp_path):
    prompts = prompts_for(8)
    cond = adapter.encode(prompts)
    config = RolloutConfig(num_steps=6, kernel="flow_grpo", kernel_params={"noise_level": 0.7})
    result = rollout(adapter, cond, config, group_size=2, generator=torch.Generator().manual_seed(0))
    final = build_reward("digit")(adapter.decode(result.samples), [prompts[int(i)] for i in result.prompt_index]).total
    rows = prm_rows_from_rollout(result, final, prompts)
    assert rows["latents"].shape == (16 * 6, 3, 16, 16) and len(rows["prompts"]) == 96
    reward = build_reward({"name": "latent_prm", "in_channels": 3, "width": 16, "lr": 3e-3})
    torch.manual_seed(0)
    losses = [reward.fit_step(rows["latents"], rows["sigmas"], rows["prompts"], rows["targets"]) for _ in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    out = reward(torch.zeros(4, 3, 16, 16), rows["prompts"][:4], latents=rows["latents"][:4], sigma=rows["sigmas"][:4])
    assert out.total.shape == (4,)
    # differentiable in the latents (guidance), batch-independent
    lat = rows["latents"][:4].clone().requires_grad_(True)
    reward.model(lat, rows["sigmas"][:4], rows["prompts"][:4]).sum().backward()
    assert torch.isfinite(lat.grad).all() and lat.grad.abs().sum() > 0
    single = reward.model(rows["latents"][1:2], rows["sigmas"][1:2], rows["prompts"][1:2])
    torch.testing.assert_close(single, out.total[1:2], atol=1e-5, rtol=1e-5)
    # video latents (B, C, F, H, W)
    video = torch.randn(2, 3, 4, 16, 16)
    assert reward.model(video, torch.tensor([0.5, 0.2]), prompts[:2]).shape == (2,)
    path = reward.save(tmp_path / "prm.safetensors")
    again = build_reward({"name": "latent_prm", "in_channels": 3, "width": 16, "checkpoint": str(path)})
    torch.testing.assert_close(again.model(video, torch.tensor([0.5, 0.2]), prompts[:2]),
                               reward.model(video, torch.tensor([0.5, 0.2]), prompts[:2]))
    with pytest.raises(RewardError, match="pass latents"):
        reward(torch.zeros(1, 3, 8, 8), ["a"])
    with pytest.raises(ConfigError, match="loss"):
        build_reward({"name": "latent_prm", "loss": "hinge"})
    bt = build_reward({"name": "latent_prm", "in_channels": 3, "width": 16, "loss": "bt"})
    assert bt.fit_step(rows["latents"][:12], rows["sigmas"][:12], rows["prompts"][:12], rows["targets"][:12]) > 0


def test_pairwise_bt_loss():
    s = torch.tensor([2.0, 0.0, 1.0])
    t = torch.tensor([1.0, 0.0, 5.0])
    # pairs with t_i > t_j: (0,1), (2,0), (2,1)
    expected = torch.stack([torch.nn.functional.softplus(-(s[0] - s[1])), torch.nn.functional.softplus(-(s[2] - s[0])),
                            torch.nn.functional.softplus(-(s[2] - s[1]))]).mean()
    torch.testing.assert_close(pairwise_bt_loss(s, t), expected)
    # groups restrict the pairs to one prompt
    torch.testing.assert_close(pairwise_bt_loss(s, t, ["a", "a", "b"]), torch.nn.functional.softplus(-(s[0] - s[1])))
