"""BranchGRPO / TreeGRPO: node rewards and advantages on a hand-checkable tree, pruning, exact
re-scoring of the edges, the on-policy first step (the toy-model reward rise: test_toy_reward_rise.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.config import ConfigError, load_config
from align.sampling.rescore import rescore
from align.sampling.rollout import RolloutConfig, rollout
from align.trees import node_targets, width_kept_leaves
from align.trainers import branch_grpo as bg
from pipelines.toy import TOY_WEIGHTS_DIR

pytestmark = pytest.mark.usefixtures("one_thread")

needs_toy = pytest.mark.skipif(not (TOY_WEIGHTS_DIR / "config.json").exists(),
                               reason="toy model weights not built (scripts/train_toy.py)")


def small_tree(adapter, trees=1, seed=0):
    """3 steps, splits at 0 and 1, factor 2: per tree 2 nodes at depth 1 and 4 leaves at depth 2."""
    cond = adapter.encode(["1"] * trees)
    config = RolloutConfig(num_steps=3, split_steps=[0, 1], branch_factor=2)
    return rollout(adapter, cond, config, generator=torch.Generator().manual_seed(seed)), cond, config


def test_node_rewards_and_depth_advantages_on_a_hand_checkable_tree(gaussian_adapter):
    result, _, _ = small_tree(gaussian_adapter)
    # leaves 0, 1 descend from node 0 of depth 1, leaves 2, 3 from node 1
    assert torch.equal(result.ancestor(1), torch.tensor([0, 0, 1, 1]))
    assert torch.equal(result.ancestor(2), torch.arange(4))
    assert [(t.step, len(t.rows)) for t in result.transitions] == [(0, 2), (1, 4), (2, 4)]
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0])
    targets = node_targets(result, rewards)
    # depth 1 (edges of step 0): node rewards 1.5 and 4.5, mean 3, std 1.5
    torch.testing.assert_close(targets[0].reward, torch.tensor([1.5, 4.5]))
    torch.testing.assert_close(targets[0].advantage, torch.tensor([-1.5, 1.5]) / (1.5 + 1e-4))
    # depth 2 (edges of steps 1 and 2, their children are the leaves): mean 3, std sqrt(3.5)
    leaf_adv = (rewards - 3) / (math.sqrt(3.5) + 1e-4)
    for step in (1, 2):
        torch.testing.assert_close(targets[step].reward, rewards)
        torch.testing.assert_close(targets[step].advantage, leaf_adv)
        assert targets[step].keep.all()

    # TreeGRPO: leaves normalised once, a node's advantage is the mean of its leaves'
    tree = node_targets(result, rewards, variant="tree_grpo")
    torch.testing.assert_close(tree[0].advantage, torch.stack([leaf_adv[:2].mean(), leaf_adv[2:].mean()]))
    torch.testing.assert_close(tree[1].advantage, leaf_adv)

    # log-prob fusion: node 0's reward weights leaves 0, 1 by their path probabilities below it; for two
    # leaves that is r0 + (r1 - r0) sigmoid((l1 - l0) / temperature)
    below = result.transitions[1].log_prob + result.transitions[2].log_prob
    fused = node_targets(result, rewards, fusion="logp")
    torch.testing.assert_close(fused[0].reward[0], 1.0 + (2.0 - 1.0) * torch.sigmoid(below[1] - below[0]))
    hot = node_targets(result, rewards, fusion="logp", temperature=0.5)
    torch.testing.assert_close(hot[0].reward[1], 3.0 + (6.0 - 3.0) * torch.sigmoid((below[3] - below[2]) / 0.5))
    torch.testing.assert_close(fused[2].reward, rewards)  # a leaf's own reward


def test_each_tree_is_normalised_alone_or_with_the_trees_of_its_prompt(gaussian_adapter):
    result, _, _ = small_tree(gaussian_adapter, trees=2)
    assert torch.equal(result.prompt_index, torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 0.0, 0.0, 0.0])
    per_tree = node_targets(result, rewards)
    # the second tree's leaves are all equal: no signal, advantage 0 and not kept
    assert torch.equal(per_tree[1].keep, torch.tensor([True] * 4 + [False] * 4))
    assert torch.equal(per_tree[1].advantage[4:], torch.zeros(4))
    pooled = node_targets(result, rewards, group_of_tree=torch.tensor([0, 0]))
    # the 8 leaves pooled: mean 1.5, population variance (0.25 + 0.25 + 2.25 + 20.25 + 4 x 2.25) / 8 = 4
    torch.testing.assert_close(pooled[1].advantage, torch.tensor([-0.5, 0.5, 1.5, 4.5] + [-1.5] * 4) / (2 + 1e-4))
    # the 4 nodes of depth 1 (1.5, 4.5, 0, 0) pooled: mean 1.5, population variance (9 + 2.25 + 2.25) / 4 = 3.375
    torch.testing.assert_close(pooled[0].advantage, torch.tensor([0.0, 3.0, -1.5, -1.5]) / (math.sqrt(3.375) + 1e-4))
    # "global" std: each tree's own mean (3 and 0), the spread of the whole depth (2); the second tree,
    # without signal, stays at 0
    spread = node_targets(result, rewards, std="global")
    torch.testing.assert_close(spread[1].advantage, torch.tensor([-2.0, -1.0, 0.0, 3.0] + [0.0] * 4) / (2 + 1e-4))


def test_width_pruning_keeps_the_best_and_worst_leaves_of_each_tree():
    rewards = torch.tensor([0.5, 0.9, 0.1, 0.7, 0.2, 0.3, 0.8, 0.4])
    trees = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    keep = width_kept_leaves(rewards, trees, 0.5)
    assert keep.tolist() == [False, True, True, False, True, False, True, False]
    best = width_kept_leaves(rewards, trees, 0.5, "best")
    assert best.tolist() == [False, True, False, True, False, False, True, True]
    assert width_kept_leaves(rewards, trees, 1.0).all()
    assert width_kept_leaves(rewards, trees, 0.1).sum() == 2  # at least one per tree


def test_depths_depth_noise_and_depth_pruning():
    splits = [0, 3, 6, 9]
    assert [bg.depth_of_step(splits, s) for s in range(12)] == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
    assert bg.depth_of_step([2], 0) == 0
    assert bg.per_step_noise_scale([2, 4], 6, [1.5, 0.5]) == [1.0, 1.0, 1.5, 1.5, 0.5, 0.5]
    config = bg.BranchGRPOConfig(rollout=RolloutConfig(num_steps=20, split_steps=splits), prune_depths=[1],
                                 prune_steps=[12], prune_window=2, prune_window_slide_every=5)

    def trained(iteration):
        return [s for s in range(20) if bg.trainable_step(config, s, bg.depth_of_step(splits, s), iteration)]

    # window on depths 1-2 (steps 0-5), then 2-3 (steps 3-8); step 12 and the last step never
    assert trained(0) == [6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18]
    assert trained(5) == [9, 10, 11, 13, 14, 15, 16, 17, 18]
    assert trained(10) == [3, 4, 5]  # window on depths 3-4; depth 1 is always pruned


@pytest.mark.parametrize("change,match", [
    ({"rollout": RolloutConfig(num_steps=10)}, "needs rollout.split_steps"),
    ({"rollout": RolloutConfig(num_steps=10, split_steps=[0], kernel="ode")}, "ode"),
    ({"rollout": RolloutConfig(num_steps=10, split_steps=[0, 4], sde_steps=[0, 1])}, "split step 4"),
    ({"group_size": 16}, "8 leaves"),
    ({"variant": "branchgrpo"}, "variant"),
    ({"depth_noise_scale": [1.0, 2.0]}, "one multiplier per split"),
    ({"width_keep_fraction": 0.0}, "width_keep_fraction"),
    ({"prune_depths": [1, 2, 3]}, "no step is left"),
])
def test_bad_config_is_a_clear_error(change, match):
    with pytest.raises(ConfigError, match=match):
        bg.check_config(bg.BranchGRPOConfig(**change))


def test_depth_noise_scales_each_depths_steps_in_the_rollout(gaussian_adapter):
    config = bg.BranchGRPOConfig(rollout=RolloutConfig(num_steps=4, split_steps=[0, 2]), depth_noise_scale=[1.0, 0.5])
    rollout_config = bg.rollout_config_with_noise(config)
    assert rollout_config.step_noise_scales == [1.0, 1.0, 0.5, 0.5]
    cond = gaussian_adapter.encode(["1"])
    scaled = rollout(gaussian_adapter, cond, rollout_config, generator=torch.Generator().manual_seed(0))
    plain = rollout(gaussian_adapter, cond, config.rollout, generator=torch.Generator().manual_seed(0))
    for a, b, s in zip(scaled.transitions, plain.transitions, [1.0, 1.0, 0.5, 0.5]):
        torch.testing.assert_close(a.std, b.std[:1].expand_as(a.std) * s)


def test_edges_rescore_exactly_with_one_model_call_per_parent(gaussian_adapter):
    result, cond, config = small_tree(gaussian_adapter, trees=2, seed=3)
    split = result.transitions[1]  # 8 children of 4 parents
    before = gaussian_adapter.nfe
    out = rescore(gaussian_adapter, split, cond, result.schedule, config, share_parents=True)
    assert gaussian_adapter.nfe - before == 4
    assert torch.equal(out.log_prob, split.log_prob) and torch.equal(out.mean, split.mean)
    some = torch.tensor([5, 2, 3])  # any subset, any order: same values row by row
    part = rescore(gaussian_adapter, split.subset(some), cond, result.schedule, config, share_parents=True)
    torch.testing.assert_close(part.log_prob, split.log_prob[some])


# --- training on the toy model --------------------------------------------------------------------

def toy_config(tmp_path, *overrides):
    return load_config(bg.CONFIG, None, [
        "model.device=cpu", f"run.output_dir={tmp_path}", "run.log_with=none", "run.resume=null",
        "run.checkpoint_every=0", "run.progress=false", *overrides])


def metrics(tmp_path):
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


@needs_toy
def test_first_on_policy_step_has_ratio_one_and_no_clipping(tmp_path):
    """Guidance on (CFG batch), LoRA attached: the edges re-scored in the rollout's batches give
    log-probs equal to the recorded ones, so every ratio is exactly 1."""
    config = toy_config(tmp_path, "iterations=1", "prompts_per_iteration=2", "rollout.num_steps=6",
                        "rollout.split_steps=[0,2,4]", "rollout.guidance_scale=3.0",
                        "eval_prompts=['a red digit 3']", "eval.per_prompt=1", "eval.num_steps=2")
    bg.train(config)
    first = next(m for m in metrics(tmp_path) if "train/ratio_mean" in m)
    assert first["train/ratio_mean"] == 1.0
    assert first["train/clip_fraction"] == 0.0 and first["train/approx_kl"] == 0.0
    # 4 trees x (2 + 2 + 4 + 4 + 8) edges of steps 0..4 (the last step is not trained); per tree
    # 1 + 2 + 2 + 4 + 4 + 8 = 21 model evaluations for 8 leaves
    assert first["tree/edges_trained"] == 4 * 20 and first["tree/nfe_per_leaf"] == 21 / 8


@needs_toy
def test_tree_grpo_with_pruning_kl_and_minibatches_runs(tmp_path):
    config = toy_config(tmp_path, "iterations=1", "prompts_per_iteration=1", "variant=tree_grpo", "fusion=logp",
                        "width_keep_fraction=0.5", "prune_depths=[1]", "ppo.kl_beta=0.01", "trees_per_update=1",
                        "rollout.guidance_scale=1.0", "eval_prompts=['a red digit 3']", "eval.per_prompt=1",
                        "eval.num_steps=2")
    bg.train(config)
    first = next(m for m in metrics(tmp_path) if "train/ratio_mean" in m)
    # depth 1 (steps 0-2) pruned; depth 2 (steps 3-5) 4 edges each; leaf depth (steps 6-8) 4 of 8 leaves
    assert first["tree/edges_trained"] == 2 * (3 * 4 + 3 * 4)
    assert first["train/kl"] >= 0.0 and (tmp_path / "lora").is_dir()
