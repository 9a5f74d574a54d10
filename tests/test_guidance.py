"""Reward guidance (align/guidance.py): the drift against closed forms (autograd and SPSA on a known
quadratic reward), Flow-NRG on the embedded default (weights raise the guided reward monotonically;
weight 0 is unguided sampling bit for bit), and guided SDE rollouts beating unguided ones at equal NFE."""

from __future__ import annotations

import pytest
import torch

from align.guidance import GuidanceConfig, RewardGuidance, build_guidance, guidance_shift, spsa_gradient
from align.sampling.records import StepView
from align.sampling.rollout import RolloutConfig, rollout
from rewards.base import Reward

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy_adapter():
    from pipelines.toy import load_toy_adapter

    return load_toy_adapter()

TARGET = 0.3


class Quadratic(Reward):
    """R(y) = -sum (y - 0.3)^2 over the elements of each sample: gradient -2 (y - 0.3)."""

    name = "quadratic"
    differentiable = True

    def score(self, samples, prompts, **context):
        return {"score": -((samples - TARGET) ** 2).flatten(1).sum(1)}


class Identity:
    """The adapter part the hook uses: decode is the identity (latents are pixels in [0, 1])."""

    device = torch.device("cpu")

    @staticmethod
    def decode(latents):
        return latents


def _view(y, step=2, level=0.6, level_next=0.5):
    return StepView(step, x=y + 0.1, timestep=torch.tensor(level * 1000), level=torch.tensor(level),
                    level_next=torch.tensor(level_next), model_out=torch.zeros_like(y), x0_hat=y,
                    prompt_index=torch.zeros(y.shape[0], dtype=torch.long))


def test_spsa_is_the_average_of_directional_differences_and_converges_to_the_gradient():
    """For a quadratic the central difference along d is exactly d . grad R, so SPSA with directions
    D (n x dim) is (1/n) D^T D grad R; with many probes it approaches grad R itself."""
    y = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    reward = Quadratic()
    fn = lambda z: reward(z, ["p"] * len(z)).total  # noqa: E731
    exact = -2 * (y - TARGET)
    g, value = spsa_gradient(fn, y, probes=5, scale=0.01, generator=torch.Generator().manual_seed(7))
    gen = torch.Generator().manual_seed(7)
    dirs = [(torch.randint(0, 2, y.shape, generator=gen) * 2 - 1).float() for _ in range(5)]
    expected = sum((d * exact).flatten(1).sum(1).reshape(-1, 1, 1, 1) * d for d in dirs) / 5
    torch.testing.assert_close(g, expected, rtol=1e-3, atol=1e-4)
    # the probe mean of R(y +- c d) is R(y) + c^2 ||d||^2 (times -1): an O(c^2) bias
    torch.testing.assert_close(value, fn(y) - 0.01**2 * y[0].numel(), rtol=1e-4, atol=1e-6)
    many, _ = spsa_gradient(fn, y, probes=4000, scale=0.01, generator=torch.Generator().manual_seed(1))
    cosine = torch.nn.functional.cosine_similarity(many.flatten(1), exact.flatten(1))
    assert bool((cosine > 0.97).all()), cosine


def test_shift_forms_are_the_formulas():
    g = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    eu = guidance_shift(g, "normalized", eta=torch.tensor([0.5, 0.5]), beta=0.25)
    torch.testing.assert_close(eu, torch.tensor([[0.3, 0.4], [0.0, 0.0]]))  # 0.25/0.5 * g/5; zero stays 0
    torch.testing.assert_close(guidance_shift(g, "velocity", dt=-0.1), 0.1 * g)


@pytest.mark.parametrize("gradient", ["autograd", "spsa"])
def test_hook_drift_equals_eta2_over_2beta_times_the_normalised_gradient(gradient):
    """The Euphonium drift at x0_hat of a known quadratic reward: autograd gives the exact gradient;
    SPSA's estimate with 3000 probes points the same way (cosine > 0.97) with the same length."""
    y = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    config = GuidanceConfig(rewards=["x"], form="normalized", beta=0.2, eta=0.4, gradient=gradient,
                            spsa_probes=3000, spsa_scale=0.01)
    hook = RewardGuidance(config, Quadratic(), Identity(), ["p"], num_steps=5)
    shift = hook(_view(y))
    g = -2 * (y - TARGET)
    expected = 0.4**2 / (2 * 0.2) * g / g.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1)
    if gradient == "autograd":
        torch.testing.assert_close(shift, expected)
        assert hook.cost == {"reward_calls": 3, "reward_backward": 3, "model_calls": 0}
    else:
        cosine = torch.nn.functional.cosine_similarity(shift.flatten(1), expected.flatten(1))
        assert bool((cosine > 0.97).all()), cosine
        torch.testing.assert_close(shift.flatten(1).norm(dim=1), torch.full((3,), 0.4**2 / 0.4))
        assert hook.cost["reward_calls"] == 2 * 3000 * 3
    torch.testing.assert_close(hook.values[2], Quadratic()(y, ["p"] * 3).total, rtol=1e-2, atol=1e-2)
    assert hook(_view(y, step=4)) is None  # the last step is not guided by default


def test_eta_null_takes_the_steps_noise_std():
    """With eta null the shift's length is std^2 / (2 beta), std the flow_grpo kernel's step std."""
    from align.sampling.kernels import flow_grpo_sde_step
    from tests.conftest import GaussianAdapter

    gaussian_adapter = GaussianAdapter(shape=(3, 4, 4))

    config = GuidanceConfig(rewards=["x"], form="normalized", beta=0.5)
    rc = RolloutConfig(num_steps=5, kernel="flow_grpo")
    hook = build_guidance(config, gaussian_adapter, ["0.5"], rc, reward=Quadratic())
    y = torch.rand(2, 3, 4, 4)
    view = _view(y, level=0.6, level_next=0.4)
    std = flow_grpo_sde_step(view.x, view.model_out, 0.6, 0.4, noise=torch.zeros_like(y), noise_level=0.7).std
    torch.testing.assert_close(hook(view).flatten(1).norm(dim=1), std**2 / (2 * 0.5))


def _toy_samples(adapter, weight, reward="stroke_thickness"):
    from align.config import load_config
    from align.commands.sample import SampleConfig, generate

    config = load_config(SampleConfig, overrides=[
        f"guidance.rewards=[{{name: {reward}, weight: {weight}}}]", "num_per_prompt=8",
        "prompts=[a red digit 7,a blue digit 3]", "seed=0"])
    return generate(adapter, config)


def test_flow_nrg_weight_raises_the_guided_reward_monotonically_and_zero_is_unguided(toy_adapter):
    """Embedded default, fixed seeds, stroke-thickness guidance at weights 0, 100, 300, 1000: mean
    ink measured 0.293, 0.345, 0.450, 0.738 (the samples' own spread is about 0.05); weight 0 gives
    the unguided samples exactly."""
    from align.config import load_config
    from align.commands.sample import SampleConfig, generate
    from rewards import build_reward

    plain, prompts, _ = generate(toy_adapter, load_config(SampleConfig, overrides=[
        "num_per_prompt=8", "prompts=[a red digit 7,a blue digit 3]", "seed=0"]))
    ink = build_reward("stroke_thickness")
    means = []
    for weight in (0, 100, 300, 1000):
        pixels, _, result = _toy_samples(toy_adapter, weight)
        if weight == 0:
            assert torch.equal(pixels, plain)
            assert result.guidance_cost["reward_calls"] == 0
        means.append(ink(pixels, prompts).mean())
    assert all(b > a + 0.02 for a, b in zip(means, means[1:])), means


def test_guided_sde_rollouts_beat_unguided_at_equal_nfe(toy_adapter):
    """Embedded default, flow_grpo kernel, digit reward through x0_hat, beta 0.1: mean reward over
    seeds 0-2 measured 0.876 / 0.866 / 0.906 unguided and 0.973 / 0.961 / 0.974 guided, with the same
    model evaluations (the guidance reuses each step's model output)."""
    from rewards import build_reward

    prompts = [f"a {c} digit {d}" for d in (3, 5, 8, 9) for c in ("red", "blue")]
    cond = toy_adapter.encode(prompts, "", 1.0)
    reward = build_reward("digit")
    rc = RolloutConfig(num_steps=10, kernel="flow_grpo", guidance_scale=1.0)
    plain, guided = [], []
    for seed in range(3):
        for out_list, beta in ((plain, None), (guided, 0.1)):
            hook = None if beta is None else build_guidance(
                GuidanceConfig(rewards=["digit"], form="normalized", beta=beta), toy_adapter, prompts, rc)
            out = rollout(toy_adapter, cond, rc, group_size=4, generator=torch.Generator().manual_seed(seed),
                          drift=hook)
            out_list.append((reward(toy_adapter.decode(out.samples), [prompts[i] for i in out.prompt_index]).mean(),
                             out.nfe))
    assert {n for _, n in plain} == {n for _, n in guided}
    assert min(r for r, _ in guided) > max(r for r, _ in plain) + 0.03, (plain, guided)


def test_bad_guidance_configs_are_one_line_errors():
    from align.errors import ConfigError

    with pytest.raises(ConfigError, match=r"guidance.rewards\[0\]"):
        GuidanceConfig(rewards=["stroke_thicknes"]).validate()
    with pytest.raises(ConfigError, match="guidance.form"):
        GuidanceConfig(rewards=["digit"], form="normalised").validate()
    with pytest.raises(ConfigError, match="guidance.steps has step 12"):
        GuidanceConfig(rewards=["digit"], steps=[12]).validate(10)


def test_align_sample_guide_flag(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "align", "sample", "--prompt", "a red digit 7", "--num", "2", "--out",
           str(tmp_path / "s")]
    done = subprocess.run(cmd + ["--guide", "stroke_thickness=300"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "guidance reward_calls=18" in done.stdout  # 2 samples x 9 guided steps (all but the last)
    bad = subprocess.run(cmd + ["--guide", "stroke_thickness=heavy"], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "--guide 'stroke_thickness=heavy'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_guide_flags_weigh_rewards_or_single_dimensions():
    """``--guide NAME.DIM=W`` guides by that dimension only: the spec weighs every other dimension 0
    (the ``"*"`` key of a reward's weights); several of one reward merge."""
    from align.commands.cli import guide_specs

    assert guide_specs(["stroke_thickness=300", "video_frames.motion_smoothness=2",
                        "video_frames.temporal_consistency=0.5"]) == [
        {"name": "stroke_thickness", "weight": 300.0},
        {"name": "video_frames", "key": "video_frames",
         "weights": {"*": 0.0, "motion_smoothness": 2.0, "temporal_consistency": 0.5}}]

    from rewards import build_rewards

    built = build_rewards(guide_specs(["motion.direction=5"]))  # one reward, one dimension: builds as such
    assert built.weights == {"direction": 5.0, "smoothness": 0.0}

    class ThreeDims(Reward):
        dimensions = ("a", "b", "c")

        def score(self, samples, prompts, **context):
            return {d: torch.full((len(prompts),), float(i + 1)) for i, d in enumerate(self.dimensions)}

    only_b = ThreeDims(weights={"*": 0.0, "b": 2.0})
    assert only_b.weights == {"a": 0.0, "b": 2.0, "c": 0.0}
    assert float(only_b(torch.zeros(1, 3, 2, 2), ["p"]).total) == 4.0
    assert ThreeDims(weights={"c": 3.0}).weights == {"a": 1.0, "b": 1.0, "c": 3.0}


def test_dual_advantages_add_the_group_normalised_process_reward():
    """A_s = w_o A_outcome + w_p (p_s - mean_group) / (std_group + 1e-4), per guided step s."""
    from align.advantages import dual_advantages

    outcome = torch.tensor([1.0, -1.0, 0.5, -0.5])
    groups = torch.tensor([0, 0, 1, 1])
    process = {2: torch.tensor([1.0, 2.0, 5.0, 3.0])}
    out = dual_advantages(outcome, process, groups, outcome_weight=2.0, process_weight=0.5)
    # each group's two values sit one std from their mean: std 0.5 in group 0, 1 in group 1, so the
    # process terms are -+0.5 x 0.5 / 0.5001 = -+0.49990 and +-0.5 x 1 / 1.0001 = +-0.49995
    torch.testing.assert_close(out[2], torch.tensor([1.50010, -1.50010, 1.49995, -1.49995]), rtol=0, atol=1e-5)
