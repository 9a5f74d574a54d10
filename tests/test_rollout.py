"""Rollout topologies on an analytic Gaussian flow model: counts, validity, lineage, re-scoring."""

import pytest
import torch

from align.config import ConfigError
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig, rollout


def encode(adapter, prompts=("1",), guidance=1.0):
    return adapter.encode(list(prompts), guidance_scale=guidance)


def test_tree_of_16_leaves_costs_203_forward_passes_vs_320(gaussian_adapter):
    cond = encode(gaussian_adapter)
    tree = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=20, split_steps=[0, 3, 6, 9], branch_factor=2),
                   generator=torch.Generator().manual_seed(0))
    assert tree.samples.shape == (16, 2, 4, 4)
    assert tree.nfe == 203
    independent = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=20), group_size=16,
                          generator=torch.Generator().manual_seed(0))
    assert independent.nfe == 320
    # every leaf is a distinct trajectory that shares the root
    assert len(torch.unique(tree.samples.flatten(1), dim=0)) == 16
    assert torch.equal(tree.ancestor(0), torch.zeros(16, dtype=torch.long))
    # leaves 0..7 share the first split's child 0, leaves 8..15 child 1
    assert torch.equal(tree.ancestor(1), torch.arange(16) // 8)
    assert torch.equal(tree.ancestor(10), torch.arange(16))


def test_tree_leaves_are_valid_samples_of_the_data_distribution(gaussian_adapter):
    """Data ~ N(mu=1, 0.5^2): the leaves of many trees have that mean and spread."""
    cond = encode(gaussian_adapter, ["1"] * 16)
    out = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=20, split_steps=[0, 3, 6, 9]),
                  generator=torch.Generator().manual_seed(1))
    assert out.samples.shape[0] == 256
    leaves = out.samples.flatten()
    assert abs(leaves.mean().item() - 1.0) < 0.05
    assert abs(leaves.std().item() - 0.5) < 0.07


def test_transitions_record_every_stochastic_step_and_rescore_to_ratio_one(gaussian_adapter):
    config = RolloutConfig(num_steps=6)
    cond = encode(gaussian_adapter, ["0", "2"], guidance=3.0)
    out = rollout(gaussian_adapter, cond, config, group_size=3, generator=torch.Generator().manual_seed(2))
    assert [t.step for t in out.transitions] == list(range(6))
    assert out.nfe == 36 and out.transformer_rows == 72  # CFG is one doubled batch
    stacked = out.stacked(range(5))
    assert stacked["latents"].shape == (6, 5, 2, 4, 4) and stacked["log_probs"].shape == (6, 5)
    for t in out.transitions:
        again = rescore(gaussian_adapter, t, cond, out.schedule, config)
        assert torch.equal(torch.exp(again.log_prob - t.log_prob), torch.ones(6))
    assert torch.equal(out.prompt_index, torch.tensor([0, 0, 0, 1, 1, 1]))


def test_sde_window_inside_ode(gaussian_adapter):
    out = rollout(gaussian_adapter, encode(gaussian_adapter), RolloutConfig(num_steps=8, sde_steps=[2, 3]),
                  group_size=4, generator=torch.Generator().manual_seed(0))
    assert [t.step for t in out.transitions] == [2, 3]
    assert out.nfe == 32
    # with an empty window the run is the ODE
    ode = rollout(gaussian_adapter, encode(gaussian_adapter), RolloutConfig(num_steps=8, kernel="ode"),
                  group_size=4, initial_noise=out.initial_noise)
    assert ode.transitions == []
    # the window's first recorded latents are the ODE's latents at step 2
    two = rollout(gaussian_adapter, encode(gaussian_adapter), RolloutConfig(num_steps=8, sde_steps=[2]),
                  group_size=4, initial_noise=out.initial_noise, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(two.transitions[0].latents, out.transitions[0].latents)
    same = rollout(gaussian_adapter, encode(gaussian_adapter), RolloutConfig(num_steps=8, sde_steps=[]),
                   group_size=4, initial_noise=out.initial_noise)
    torch.testing.assert_close(same.samples, ode.samples)


def test_same_noise_per_group(gaussian_adapter):
    out = rollout(gaussian_adapter, encode(gaussian_adapter, ["0", "1"]),
                  RolloutConfig(num_steps=4, same_noise_per_group=True), group_size=3,
                  generator=torch.Generator().manual_seed(0))
    noise = out.initial_noise
    assert torch.equal(noise[0], noise[2]) and torch.equal(noise[3], noise[5])
    assert not torch.equal(noise[0], noise[3])
    assert not torch.equal(out.samples[0], out.samples[1])  # the SDE still separates them


def test_dense_branches_complete_every_step_by_ode(gaussian_adapter):
    steps = 6
    config = RolloutConfig(num_steps=steps, kernel="ode", branch_steps=list(range(steps)))
    out = rollout(gaussian_adapter, encode(gaussian_adapter), config, group_size=2,
                  generator=torch.Generator().manual_seed(0))
    # a branch shares its main row's evaluation: 6 main evals + sum_{t}(steps - t - 1) completion evals
    assert out.nfe == 2 * (steps + steps * (steps - 1) // 2)
    assert out.branch_samples.shape == (2 * steps, 2, 4, 4)
    assert torch.equal(out.branch_origin, torch.arange(steps).repeat_interleave(2))
    # completing an ODE path by ODE from any point lands where the path ends
    for b in range(2 * steps):
        torch.testing.assert_close(out.branch_samples[b], out.samples[out.branch_parent[b]], rtol=1e-5, atol=1e-5)


def test_dense_branches_from_an_sde_run_differ_from_the_main_sample(gaussian_adapter):
    config = RolloutConfig(num_steps=5, branch_steps=list(range(5)))
    out = rollout(gaussian_adapter, encode(gaussian_adapter), config, group_size=2,
                  generator=torch.Generator().manual_seed(0))
    first = out.branch_samples[out.branch_origin == 0]
    assert not torch.allclose(first, out.samples)
    assert len(out.transitions) == 5 and not any(t.branch for t in out.transitions)


def test_tempflow_sde_children_of_an_ode_trajectory(gaussian_adapter):
    config = RolloutConfig(num_steps=5, sde_steps=[], branch_steps=[0, 2], branch_kernel="sde",
                           branches_per_step=3)
    cond = encode(gaussian_adapter)
    out = rollout(gaussian_adapter, cond, config, generator=torch.Generator().manual_seed(0))
    branch_transitions = [t for t in out.transitions if t.branch]
    assert [t.step for t in branch_transitions] == [0, 2]
    assert out.branch_samples.shape[0] == 6
    assert torch.equal(branch_transitions[1].rows, torch.arange(3, 6))
    for t in branch_transitions:
        again = rescore(gaussian_adapter, t, cond, out.schedule, config)
        assert torch.equal(again.log_prob, t.log_prob)


def test_split_noise_scale_is_used_and_rescored(gaussian_adapter):
    config = RolloutConfig(num_steps=4, split_steps=[1], split_noise_scale=0.5)
    cond = encode(gaussian_adapter)
    out = rollout(gaussian_adapter, cond, config, generator=torch.Generator().manual_seed(0))
    split = out.transitions[1]
    assert split.noise_scale == 0.5
    base = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, split_steps=[1]),
                   generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(split.std, base.transitions[1].std * 0.5)
    assert torch.equal(rescore(gaussian_adapter, split, cond, out.schedule, config).log_prob, split.log_prob)


def test_gradients_reach_the_model_only_through_grad_steps(gaussian_adapter):
    cond = encode(gaussian_adapter)
    param = gaussian_adapter.denoiser.gain
    out = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, kernel="ode"), grad_steps=[3],
                  initial_noise=torch.randn(1, 2, 4, 4))
    out.samples.sum().backward()
    assert param.grad is not None and param.grad.abs() > 0
    param.grad = None
    out = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, kernel="ode"),
                  initial_noise=torch.randn(1, 2, 4, 4))
    assert not out.samples.requires_grad
    ckpt = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, kernel="ode"), grad_steps=[2, 3],
                   checkpoint_grad_steps=True, initial_noise=out.initial_noise)
    plain = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, kernel="ode"), grad_steps=[2, 3],
                    initial_noise=out.initial_noise)
    g1 = torch.autograd.grad(ckpt.samples.sum(), param)[0]
    g2 = torch.autograd.grad(plain.samples.sum(), param)[0]
    torch.testing.assert_close(g1, g2)


def test_max_batch_chunks_give_the_same_result(gaussian_adapter):
    cond = encode(gaussian_adapter, ["0", "1", "2"])
    a = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=3), generator=torch.Generator().manual_seed(0))
    b = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=3, max_batch=2),
                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a.samples, b.samples)


def test_video_latents_roll_out_unchanged():
    from tests.conftest import GaussianAdapter

    adapter = GaussianAdapter(shape=(2, 3, 4, 4))  # (C, F, H, W)
    out = rollout(adapter, adapter.encode(["1"]), RolloutConfig(num_steps=3), group_size=2,
                  generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (2, 2, 3, 4, 4) and out.transitions[0].log_prob.shape == (2,)


@pytest.mark.parametrize("bad,match", [
    ({"split_steps": [25]}, "split_steps has step 25"),
    ({"branch_kernel": "sdee"}, "branch_kernel"),
    ({"kernel": "dance"}, "did you mean 'dance_grpo'"),
])
def test_bad_rollout_config_is_a_clear_error(gaussian_adapter, bad, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        rollout(gaussian_adapter, encode(gaussian_adapter), RolloutConfig(num_steps=10, **bad))


def test_step_noise_scales_scale_each_steps_std_and_rescore(gaussian_adapter):
    cond = encode(gaussian_adapter)
    scales = [1.0, 0.5, 2.0, 1.0]
    base = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4), generator=torch.Generator().manual_seed(0))
    config = RolloutConfig(num_steps=4, step_noise_scales=scales)
    out = rollout(gaussian_adapter, cond, config, generator=torch.Generator().manual_seed(0))
    for t, b, s in zip(out.transitions, base.transitions, scales):
        torch.testing.assert_close(t.std, b.std * s)
        assert torch.equal(rescore(gaussian_adapter, t, cond, out.schedule, config).log_prob, t.log_prob)
    with pytest.raises(ConfigError, match="step_noise_scales has 2 entries"):
        rollout(gaussian_adapter, cond, RolloutConfig(num_steps=4, step_noise_scales=[1.0, 1.0]))


# --- hooks and recorded kernel specs ---------------------------------------------------------------


def test_euler_drift_moves_the_sample_and_reports_the_unguided_mean():
    from align.sampling.kernels import euler_step

    x, v, d = torch.randn(2, 3), torch.randn(2, 3), torch.full((2, 3), 0.25)
    plain = euler_step(x, v, 0.6, 0.4)
    guided = euler_step(x, v, 0.6, 0.4, mean_shift=d)
    torch.testing.assert_close(guided.prev_sample, plain.prev_sample + d)
    torch.testing.assert_close(guided.mean, plain.mean)  # as every stochastic kernel reports it


def test_drift_hook_shifts_samples_while_transitions_keep_the_unguided_log_prob(gaussian_adapter):
    """A drift of +d on the last ODE step moves every final sample by exactly d; a drift on every
    SDE step raises the samples' mean, and each recorded transition still re-scores to its own
    log-prob (the unguided mean's), so training on it distils the guidance."""
    cond = encode(gaussian_adapter, ["1"])
    seen = []

    def last_step_drift(view):
        seen.append((view.step, view.x0_hat.shape))
        return torch.full_like(view.x, 0.3) if view.step == 3 else None

    ode = RolloutConfig(num_steps=4, kernel="ode")
    plain = rollout(gaussian_adapter, cond, ode, group_size=4, generator=torch.Generator().manual_seed(0))
    moved = rollout(gaussian_adapter, cond, ode, group_size=4, generator=torch.Generator().manual_seed(0),
                    drift=last_step_drift)
    torch.testing.assert_close(moved.samples, plain.samples + 0.3)
    assert [s for s, _ in seen] == [0, 1, 2, 3] and seen[0][1] == (4, 2, 4, 4)

    sde = RolloutConfig(num_steps=6)
    base = rollout(gaussian_adapter, cond, sde, group_size=64, generator=torch.Generator().manual_seed(1))
    up = rollout(gaussian_adapter, cond, sde, group_size=64, generator=torch.Generator().manual_seed(1),
                 drift=lambda view: torch.full_like(view.x, 0.05))
    assert up.samples.mean() > base.samples.mean() + 0.1
    for t in up.transitions:
        assert torch.equal(rescore(gaussian_adapter, t, cond, up.schedule).log_prob, t.log_prob)
        assert t.kernel == "flow_grpo" and t.params["noise_level"] == 0.7 and t.params["reduce"] == "mean"


def test_select_hook_prunes_and_copies_rows_seeing_x0_hat(gaussian_adapter):
    """Test-time pruning: after step 1 keep the 4 rows of 8 whose x0_hat is largest; after step 3
    copy every kept row twice. The final rows, their prompts, the lineage and the NFE follow."""
    cond = encode(gaussian_adapter, ["0", "2"])

    def select(view):
        if view.step == 1:
            score = view.x0_hat.flatten(1).mean(1)
            return torch.argsort(score, descending=True)[:4]
        if view.step == 3:
            return torch.arange(len(view.next_x)).repeat_interleave(2)
        return None

    out = rollout(gaussian_adapter, cond, RolloutConfig(num_steps=5), group_size=4,
                  generator=torch.Generator().manual_seed(0), select=select)
    assert out.samples.shape[0] == 8 and out.nfe == 2 * 8 + 2 * 4 + 8
    # the prompt with data at mu = 2 has the larger x0_hat: its 4 rows survive the pruning
    assert torch.equal(out.prompt_index, torch.ones(8, dtype=torch.long))
    assert torch.equal(out.ancestor(3), torch.arange(4).repeat_interleave(2))  # rows before step 3
    step1 = out.main_transitions([1])[0]
    assert len(step1.rows) == 4 and torch.equal(step1.prompt_index, torch.ones(4, dtype=torch.long))
    for t in out.main_transitions():
        assert torch.equal(rescore(gaussian_adapter, t, cond, out.schedule).log_prob, t.log_prob)


def test_rescoring_uses_the_recorded_kernel_not_the_current_config(gaussian_adapter):
    """A transition sampled with DanceGRPO's kernel re-scores with it even when the config passed at
    re-scoring time names another kernel."""
    cond = encode(gaussian_adapter)
    config = RolloutConfig(num_steps=4, kernel="dance_grpo", kernel_params={"eta": 0.5})
    out = rollout(gaussian_adapter, cond, config, group_size=2, generator=torch.Generator().manual_seed(0))
    other = RolloutConfig(num_steps=4, kernel="flow_grpo")
    for t in out.transitions:
        assert t.kernel == "dance_grpo" and t.params["eta"] == 0.5
        assert torch.equal(rescore(gaussian_adapter, t, cond, out.schedule, other).log_prob, t.log_prob)
