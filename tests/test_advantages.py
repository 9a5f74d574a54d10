"""Advantage and loss formulas against hand-computed values."""

import math

import pytest
import torch

from align.advantages import (RunningPromptStats, dense_step_gains, depth_advantages, fuse_leaf_rewards,
                              group_advantages, mixed_advantages, per_step_advantages)
from align.losses import flow_matching_target, mean_kl, nft_loss, normalize_log_ratio, ppo_clip_loss


def test_group_advantages_closed_form_and_zero_std_groups_dropped():
    rewards = torch.tensor([1.0, 3.0, 5.0, 5.0, 2.0, 4.0])
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv, keep = group_advantages(rewards, groups, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0, -1.0, 1.0]))
    assert keep.tolist() == [True, True, False, False, True, True]
    glob, _ = group_advantages(rewards, groups, std="global", eps=0.0)
    # "global": each group's own mean, the batch's spread: mean 10/3, population variance 80/6 - 100/9 = 20/9
    torch.testing.assert_close(glob[:2], torch.tensor([-3.0, 3.0]) / math.sqrt(20))


def test_group_advantages_are_clipped():
    rewards = torch.tensor([0.0] * 99 + [1.0])
    adv, _ = group_advantages(rewards, torch.zeros(100, dtype=torch.long), clip=5.0)
    assert adv.max().item() == 5.0


def test_mixed_advantages_sum_of_advantages_vs_sum_of_rewards():
    groups = torch.tensor([0, 0])
    r = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([0.0, 100.0])}
    sum_adv, _ = mixed_advantages(r, {"a": 1.0, "b": 1.0}, groups, mode="sum_advantages", eps=0.0)
    torch.testing.assert_close(sum_adv, torch.tensor([-2.0, 2.0]))
    sum_r, _ = mixed_advantages(r, {"a": 1.0, "b": 0.0}, groups, mode="sum_rewards", eps=0.0)
    torch.testing.assert_close(sum_r, torch.tensor([-1.0, 1.0]))


def test_gdpo_normalises_each_reward_in_its_group_then_the_sum_over_the_batch():
    """Two groups; reward b has a hundred times a's spread. In group 1 both prefer the second sample,
    in group 2 they disagree. sum_rewards follows b alone (its spread drowns a); GDPO puts both on one
    scale: group 1's advantages are a's +-1 plus b's +-1, group 2's cancel to 0, and the sum is divided
    by its batch std sqrt((4 + 4 + 0 + 0) / 4) = sqrt(2)."""
    groups = torch.tensor([0, 0, 1, 1])
    r = {"a": torch.tensor([0.0, 1.0, 0.0, 1.0]), "b": torch.tensor([0.0, 100.0, 100.0, 0.0])}
    weights = {"a": 1.0, "b": 1.0}
    sum_r, _ = mixed_advantages(r, weights, groups, mode="sum_rewards", eps=0.0, clip=None)
    torch.testing.assert_close(sum_r, torch.tensor([-1.0, 1.0, 1.0, -1.0]))
    sum_adv, _ = mixed_advantages(r, weights, groups, mode="sum_advantages", eps=0.0, clip=None)
    torch.testing.assert_close(sum_adv, torch.tensor([-2.0, 2.0, 0.0, 0.0]))
    gdpo, keep = mixed_advantages(r, weights, groups, mode="gdpo", eps=0.0, clip=None)
    root2 = math.sqrt(2.0)
    torch.testing.assert_close(gdpo, torch.tensor([-root2, root2, 0.0, 0.0]))
    assert keep.all()
    # a reward constant in a group adds nothing there; a group where every reward is constant has no signal
    flat = {"a": torch.tensor([0.0, 1.0, 5.0, 5.0]), "b": torch.tensor([3.0, 3.0, 7.0, 7.0])}
    adv, keep = mixed_advantages(flat, weights, groups, mode="gdpo", eps=0.0, clip=None)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0, 0.0, 0.0]))
    assert keep.tolist() == [True, True, False, False]


def test_tree_fusion_mean_and_logp_weighting():
    leaves = torch.tensor([1.0, 3.0, 10.0, 20.0])
    node = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(fuse_leaf_rewards(leaves, node, 2), torch.tensor([2.0, 15.0]))
    lp = torch.tensor([0.0, math.log(3.0), 0.0, 0.0])
    fused = fuse_leaf_rewards(leaves, node, 2, mode="logp", leaf_log_probs=lp)
    torch.testing.assert_close(fused, torch.tensor([(1 * 1 + 3 * 3) / 4, 15.0]))


def test_depth_advantages_normalise_within_each_tree():
    rewards = torch.tensor([1.0, 2.0, 10.0, 30.0])
    trees = torch.tensor([0, 0, 1, 1])
    torch.testing.assert_close(depth_advantages(rewards, trees, eps=0.0), torch.tensor([-1.0, 1.0, -1.0, 1.0]))


def test_dense_gains_telescope_to_the_total_improvement():
    completions = torch.tensor([[0.1, 0.3, 0.2, 0.9], [0.5, 0.5, 0.6, 0.4]])
    gains = dense_step_gains(completions)
    torch.testing.assert_close(gains, torch.tensor([[0.2, -0.1, 0.7], [0.0, 0.1, -0.2]]))
    torch.testing.assert_close(gains.sum(1), completions[:, -1] - completions[:, 0])
    adv, keep = per_step_advantages(gains, eps=0.0)
    assert keep.all()
    torch.testing.assert_close(adv[:, 0], torch.tensor([1.0, -1.0]))


def test_ppo_loss_at_ratio_one_is_minus_mean_advantage():
    adv = torch.tensor([1.0, -2.0, 0.5])
    lp = torch.tensor([-1.0, -2.0, -3.0], requires_grad=True)
    loss, stats = ppo_clip_loss(lp, lp.detach(), adv, clip_range=1e-4)
    torch.testing.assert_close(loss, -adv.mean())
    assert stats["clip_fraction"] == 0 and stats["ratio_mean"] == 1 and stats["approx_kl"] == 0
    loss.backward()
    torch.testing.assert_close(lp.grad, -adv / 3)  # d/dlogp of -A exp(logp - old) at rho = 1


def test_ppo_clip_cuts_the_gradient_outside_the_range():
    adv = torch.tensor([1.0])
    lp = torch.tensor([0.5], requires_grad=True)
    loss, stats = ppo_clip_loss(lp, torch.tensor([0.0]), adv, clip_range=0.2)
    loss.backward()
    assert lp.grad.item() == 0.0 and stats["clip_fraction"] == 1.0
    torch.testing.assert_close(loss, torch.tensor(-1.2))


def test_mean_kl_closed_form():
    mean, ref = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    torch.testing.assert_close(mean_kl(mean, ref, torch.tensor([1.0, 0.5])), torch.tensor([0.5, 2.0]))


def test_normalize_log_ratio_centres_and_rescales():
    d = torch.tensor([-3.0, -2.0, -1.0], requires_grad=True)
    out = normalize_log_ratio(d, target_std=0.1)
    torch.testing.assert_close(out.mean(), torch.tensor(0.0), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.std(unbiased=False), torch.tensor(0.1), rtol=1e-4, atol=1e-6)


def test_nft_loss_is_plain_flow_matching_at_r_one_and_reverse_at_r_zero():
    v_old, v_theta, target = torch.zeros(1, 4), torch.ones(1, 4), torch.full((1, 4), 2.0)
    beta = 0.5
    # r = 1: ||(1 - b) v_old + b v_theta - v||^2 = (0.5 - 2)^2
    torch.testing.assert_close(nft_loss(v_theta, v_old, target, torch.tensor([1.0]), beta), torch.tensor(2.25))
    # r = 0: ||(1 + b) v_old - b v_theta - v||^2 = (-0.5 - 2)^2
    torch.testing.assert_close(nft_loss(v_theta, v_old, target, torch.tensor([0.0]), beta), torch.tensor(6.25))


def test_flow_matching_target():
    x0, eps = torch.ones(2, 3), torch.zeros(2, 3)
    xt, v = flow_matching_target(x0, eps, torch.tensor([0.25, 1.0]))
    torch.testing.assert_close(xt, torch.tensor([[0.75] * 3, [0.0] * 3]))
    torch.testing.assert_close(v, -x0)


def test_running_prompt_stats_switch_from_batch_to_prompt_statistics():
    stats = RunningPromptStats(buffer_size=4, min_count=4)
    first = stats.advantages(["a", "a", "b", "b"], torch.tensor([1.0, 3.0, 10.0, 30.0]))
    # too few rewards per prompt yet: the batch's statistics, mean 11, population variance 526 / 4
    torch.testing.assert_close(first, torch.tensor([-10.0, -8.0, -1.0, 19.0]) / (math.sqrt(131.5) + 1e-6))
    second = stats.advantages(["a", "a"], torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(second, torch.tensor([-1.0, 1.0]), rtol=1e-5, atol=1e-5)
    copy = RunningPromptStats(4, 4)
    copy.load_state_dict(stats.state_dict())
    assert copy.history == stats.history


def test_normalize_log_ratio_keeps_the_gradient_on_policy():
    d = torch.zeros(4, requires_grad=True)  # first on-policy pass: every log-ratio is 0
    out = normalize_log_ratio(d, target_std=0.0)
    out.sum().backward()
    torch.testing.assert_close(d.grad, torch.ones(4))  # statistics are detached: identity gradient
    d2 = torch.zeros(4, requires_grad=True)
    (normalize_log_ratio(d2, target_std=0.0) * torch.tensor([1.0, -1.0, 2.0, 0.0])).sum().backward()
    torch.testing.assert_close(d2.grad, torch.tensor([1.0, -1.0, 2.0, 0.0]))


def test_summary_line_shows_watched_metrics_and_warns_when_they_fall_as_the_reward_rises():
    from align.trainers.common import summary_lines

    before = {"eval/heldout/jpeg_compressibility": -0.80, "eval/diversity": 0.30}
    fell = {"eval/reward": 0.9, "eval/heldout/jpeg_compressibility": -0.85, "eval/diversity": 0.31}
    lines = summary_lines(0.8, 0.9, before, fell)
    assert lines == ["watch: jpeg_compressibility fell while the trained reward rose: look at the after grid "
                     "for reward hacking",
                     "reward before=0.8000 after=0.9000 jpeg_compressibility=-0.8000->-0.8500 "
                     "diversity=0.3000->0.3100"]
    rose = {**fell, "eval/heldout/jpeg_compressibility": -0.75}
    assert summary_lines(0.8, 0.9, before, rose) == [
        "reward before=0.8000 after=0.9000 jpeg_compressibility=-0.8000->-0.7500 diversity=0.3000->0.3100"]
    assert len(summary_lines(0.9, 0.8, before, fell)) == 1  # the reward fell too: nothing to flag
    noise = {**fell, "eval/heldout/jpeg_compressibility": -0.83}  # 3.75% lower: within the tolerance
    assert len(summary_lines(0.8, 0.9, before, noise)) == 1


def test_summary_line_names_each_dimension_of_the_trained_reward():
    """A reward of several dimensions: the evaluation reports each one's mean over the scored rows
    (a parent total such as ``motion`` left out, an unscored row ignored), and the summary line
    names each before -> after ahead of the held-out rewards."""
    import torch

    from align.evaluation import dimension_means
    from align.trainers.common import summary_lines
    from rewards.base import RewardOutput

    out = RewardOutput(scores={"motion": torch.tensor([1.0, 2.0, 9.0]), "motion.direction": torch.tensor([0.5, 1.0, 9.0]),
                               "motion.smoothness": torch.tensor([0.5, 1.0, 9.0]), "frame_digit": torch.tensor([0.2, 0.4, 9.0])},
                       total=torch.tensor([1.2, 2.4, 27.0]), valid=torch.tensor([True, True, False]))
    assert dimension_means(out) == pytest.approx({"motion.direction": 0.75, "motion.smoothness": 0.75, "frame_digit": 0.3})
    single = RewardOutput(scores={"score": torch.tensor([0.5, 0.7])}, total=torch.tensor([0.5, 0.7]))
    assert dimension_means(single) == {}
    before = {"eval/reward/motion.direction": 0.5, "eval/reward/frame_digit": 0.25, "eval/heldout/frame_judge": 0.9}
    after = {"eval/reward": 1.1, "eval/reward/motion.direction": 0.75, "eval/reward/frame_digit": 0.3,
             "eval/heldout/frame_judge": 0.92}
    assert summary_lines(0.75, 1.05, before, after) == [
        "reward before=0.7500 after=1.0500 motion.direction=0.5000->0.7500 frame_digit=0.2500->0.3000 "
        "frame_judge=0.9000->0.9200"]


def test_grpo_guard_on_two_steps_makes_the_clip_two_sided_and_weights_the_steps():
    """Two steps, advantages (1, -1), clip 0.2. The low-noise step's log-ratios drift below 0 (-0.3,
    -0.1); the other's are (-0.02, 0.02). Guard centres each and scales it to the pooled spread 0.05:
    both become (-0.05, 0.05), and each PPO term is (e^0.05 - e^-0.05) / 2 = sinh 0.05. Without it the
    drifted step's term is (e^-0.1 - e^-0.3) / 2 = 0.08201: its first ratio e^-0.3 = 0.74 is outside
    [0.8, 1.2], yet with A = 1 the pessimistic bound keeps the unclipped term, so it trains on at full
    gradient -e^-0.3 / 2 (the clip is one-sided once the ratios drift below 1). Step weights
    std^2 / mean(std^2) for stds (1, 3): 0.2 and 1.8."""
    from align.losses import guard_step_weights

    adv = torch.tensor([1.0, -1.0])
    drifted, centred = torch.tensor([-0.3, -0.1]), torch.tensor([-0.02, 0.02])
    for d in (drifted, centred):
        normalised = normalize_log_ratio(d, target_std=0.05)
        torch.testing.assert_close(normalised, torch.tensor([-0.05, 0.05]))
        loss, stats = ppo_clip_loss(normalised, torch.zeros(2), adv, clip_range=0.2)
        torch.testing.assert_close(loss, torch.tensor(math.sinh(0.05)))
        assert stats["clip_fraction"] == 0.0
    plain = drifted.clone().requires_grad_(True)
    loss, stats = ppo_clip_loss(plain, torch.zeros(2), adv, clip_range=0.2)
    torch.testing.assert_close(loss, torch.tensor(0.0820095), rtol=0, atol=1e-6)
    loss.backward()
    assert stats["clip_fraction"] == 0.5  # the first ratio is out of range, and nothing holds it back
    torch.testing.assert_close(plain.grad, torch.tensor([-math.exp(-0.3) / 2, math.exp(-0.1) / 2]))
    weights = guard_step_weights(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(weights, torch.tensor([0.2, 1.8]))


def test_prdp_proximal_clip_binds_and_cuts_the_gradient_of_that_step():
    """l = log pi_old + clip(log pi - log pi_old, +-c) - log pi_ref with c = 0.01. A step moved by 0.05
    from the snapshot is held at +0.01 (l = 0.01 - ref) and passes no gradient; one moved by 0.005
    passes it whole. PRDP's pair loss (rhat_a - rhat_b - dr / beta)^2 over those two steps then gets
    gradient only through the unclipped step: 2 x residual."""
    from align.losses import proximal_log_ratio

    old, ref = torch.tensor([-1.0, -1.0]), torch.tensor([-1.2, -1.2])
    new = torch.tensor([-0.95, -0.995], requires_grad=True)  # step 0 moved 0.05, step 1 moved 0.005
    l = proximal_log_ratio(new, old, ref, clip_range=0.01)
    torch.testing.assert_close(l, torch.tensor([0.21, 0.205]))
    # trajectory a's steps are these two, trajectory b's have l = 0; reward difference 0.1, beta 1
    rhat_a = l.sum()
    loss = (rhat_a - 0.0 - 0.1) ** 2
    loss.backward()
    residual = 0.415 - 0.1
    torch.testing.assert_close(new.grad, torch.tensor([0.0, 2 * residual]))
    unclipped = new.detach().clone().requires_grad_(True)
    ((proximal_log_ratio(unclipped, old, ref, clip_range=1.0).sum() - 0.1) ** 2).backward()
    torch.testing.assert_close(unclipped.grad, torch.full((2,), 2 * (0.455 - 0.1)))
