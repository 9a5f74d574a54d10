"""Rewards -> advantages through real trainer runs: a combination of a one-dimension and a
multi-dimension reward trains exactly its total (``sum_rewards``) or the weighted sum of its
top-level rewards' advantages (``sum_advantages``), or GDPO's (``gdpo``); unscored samples (the reward's valid flag)
are dropped from their groups and NaN never reaches advantages, losses or the summary."""

from __future__ import annotations

import json
import math

import pytest
import torch

from align.config import load_config
from align.trainers import ppo, trainer_module
from rewards.base import Reward, register_reward
from tests.conftest import GaussianAdapter, GaussianDDPMAdapter

#: every call of the test rewards, in order: (samples' brightness, output dict)
CALLS: list[dict] = []


#: rows of every scored batch of 8 that the partial reward cannot score (group 0 keeps one member)
UNSCORED = (0, 1, 2, 5)


@register_reward("test_adv_partial")
class Partial(Reward):
    """Brightness, but NaN (and flagged invalid) on rows UNSCORED of each batch of 8."""

    def score(self, samples, prompts, **context):
        score = samples.mean(dim=(1, 2, 3)).clone()
        valid = torch.ones(len(score), dtype=torch.bool)
        for row in range(len(score)):
            if row % 8 in UNSCORED:
                valid[row] = False
                score[row] = float("nan")
        CALLS.append({"reward": "partial", "score": score, "valid": valid})
        return {"score": score, "_valid": valid}


def run(trainer, tmp_path, rewards, *extra, spy_on="ppo_transition_loss", monkeypatch=None):
    """One iteration of 2 prompts x 4 samples on the analytic model; returns the advantages each
    trained row got (row -> advantage) and the metrics rows."""
    module = trainer_module(trainer)
    config = load_config(module.CONFIG, None, [
        f"rewards={rewards}", "prompts=['0.3','0.6']", "eval_prompts=['0.5']", "iterations=1", "group_size=4",
        "prompts_per_iteration=2", "lora.enabled=false", f"run.output_dir={tmp_path}", "run.log_with=none",
        "run.progress=false", "eval.per_prompt=8", "rollout.num_steps=4", *extra])
    seen: dict[int, float] = {}
    if spy_on == "ppo_transition_loss":
        original = ppo.ppo_transition_loss

        def spy(run_, part, batch, advantages, *args, **kwargs):
            for row, value in zip(part.rows.tolist(), advantages.tolist()):
                seen[row] = value
            return original(run_, part, batch, advantages, *args, **kwargs)
    else:  # diffusion_nft: the optimality weight is a function of the advantages
        original = module.optimality

        def spy(advantages, adv_clip):
            seen.update(enumerate(advantages.tolist()))
            return original(advantages, adv_clip)
    monkeypatch.setattr(ppo if spy_on == "ppo_transition_loss" else module, spy_on, spy)
    CALLS.clear()
    adapter = GaussianDDPMAdapter() if trainer == "ddpo" else GaussianAdapter(shape=(3, 4, 4))
    summary = module.train(config, adapter=adapter)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return seen, rows, summary


def training_scores(reward_name):
    """The test reward's outputs on the training batch (the call after the first evaluation)."""
    calls = [c for c in CALLS if c["reward"] == reward_name]
    return calls[1]




@register_reward("test_adv_table_a")
class TableA(Reward):
    """One dimension, a fixed value per row of a batch of 8 (training and evaluation batches alike)."""

    def score(self, samples, prompts, **context):
        return {"score": torch.tensor([0.0, 1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0])[:len(prompts)]}


@register_reward("test_adv_table_b")
class TableB(Reward):
    """Two dimensions whose total is +1, -1, +1, ... (mean 0, population std 1: batch normalisation keeps it)."""

    dimensions = ("red", "contrast")

    def score(self, samples, prompts, **context):
        red = torch.tensor([2.0, 0.0] * 4)[:len(prompts)]
        return {"red": red, "contrast": torch.full_like(red, -1.0)}


#: A = (0, 1, 2, 3 | 0, 0, 0, 0) with weight 2, B = (+1, -1, +1, -1 | +1, -1, +1, -1) with weight 0.5
TABLES = "[{name: test_adv_table_a, weight: 2.0}, {name: test_adv_table_b, weight: 0.5, normalize: batch}]"


@pytest.mark.parametrize("trainer, spy_on, options", [
    ("flow_grpo", "ppo_transition_loss", ["ppo.kl_beta=0", "adv_std=group"]),
    ("diffusion_nft", "optimality", ["adv_std=group"]),
])
def test_sum_rewards_trains_exactly_the_combinations_total(trainer, spy_on, options, tmp_path, monkeypatch):
    """The total 2 A + 0.5 B, then one group advantage (population std + 1e-4)."""
    seen, _, _ = run(trainer, tmp_path, TABLES, "multi_reward=sum_rewards", *options, spy_on=spy_on,
                     monkeypatch=monkeypatch)
    # group 0: totals 0.5, 1.5, 4.5, 5.5, mean 3, variance (6.25 + 2.25 + 2.25 + 6.25) / 4 = 4.25;
    # group 1: totals +-0.5, std 0.5, so +-0.5 / 0.5001
    expected = [-1.2126, -0.7276, 0.7276, 1.2126, 0.9998, -0.9998, 0.9998, -0.9998]
    torch.testing.assert_close(torch.tensor([seen[r] for r in range(8)]), torch.tensor(expected), rtol=0, atol=2e-4)


@pytest.mark.parametrize("trainer, spy_on", [("flow_grpo", "ppo_transition_loss"), ("diffusion_nft", "optimality")])
def test_sum_advantages_sums_the_top_level_rewards_with_their_weights(trainer, spy_on, tmp_path, monkeypatch):
    """2 A_group(A) + 0.5 A_group(B)."""
    seen, _, _ = run(trainer, tmp_path, TABLES, "multi_reward=sum_advantages", "adv_std=group",
                     *(["ppo.kl_beta=0"] if trainer == "flow_grpo" else []), spy_on=spy_on, monkeypatch=monkeypatch)
    # A's group 0 (0, 1, 2, 3): mean 1.5, variance 1.25, so 2 x (-1.5, -0.5, 0.5, 1.5) / 1.1181; its
    # group 1 has no signal (0); B's advantages are +-1 / 1.0001 in both groups
    expected = [-2.1831, -1.3943, 1.3943, 2.1831, 0.5, -0.5, 0.5, -0.5]
    torch.testing.assert_close(torch.tensor([seen[r] for r in range(8)]), torch.tensor(expected), rtol=0, atol=2e-4)


@pytest.mark.parametrize("trainer, spy_on", [("flow_grpo", "ppo_transition_loss"), ("diffusion_nft", "optimality")])
def test_gdpo_normalises_each_top_level_reward_in_its_group_then_the_sum(trainer, spy_on, tmp_path, monkeypatch):
    """multi_reward: gdpo -- each top-level reward's group advantage, their weighted sum, then that sum
    normalised over the batch."""
    seen, _, _ = run(trainer, tmp_path, TABLES, "multi_reward=gdpo",
                     *(["ppo.kl_beta=0"] if trainer == "flow_grpo" else []), spy_on=spy_on, monkeypatch=monkeypatch)
    # the sum above, mean 0, population variance (2 x 2.1831^2 + 2 x 1.3943^2 + 4 x 0.25) / 8 = 1.8025
    expected = [-1.6259, -1.0385, 1.0385, 1.6259, 0.3724, -0.3724, 0.3724, -0.3724]
    torch.testing.assert_close(torch.tensor([seen[r] for r in range(8)]), torch.tensor(expected), rtol=0, atol=2e-4)


def test_unscored_rows_are_dropped_from_their_groups(tmp_path, monkeypatch):
    """With the global std (where one NaN used to make every advantage NaN): group 0 keeps one
    scored member and is dropped; group 1 is normalised over its three scored members; unscored
    rows are never trained; the metrics count them."""
    seen, rows, summary = run("flow_grpo", tmp_path, "[test_adv_partial]", "adv_std=global", "ppo.kl_beta=0",
                              monkeypatch=monkeypatch)
    scores = training_scores("partial")
    assert sorted(seen) == [4, 6, 7]  # the trained rows: group 1's scored members
    values = scores["score"][torch.tensor([4, 6, 7])]
    global_std = scores["score"][torch.tensor([3, 4, 6, 7])].std(unbiased=False)  # over every scored row
    expected = (values - values.mean()) / (global_std + 1e-4)
    torch.testing.assert_close(torch.tensor([seen[r] for r in (4, 6, 7)]), expected, rtol=1e-5, atol=1e-5)
    trained = next(m for m in rows if "train/loss" in m)
    assert trained["reward/unscored"] == 4.0 and trained["advantage/kept_fraction"] == 3 / 8
    assert all(math.isfinite(v) for m in rows for v in m.values())
    assert math.isfinite(summary["reward_before"]) and math.isfinite(summary["reward_after"])


@pytest.mark.parametrize("trainer, options", [
    ("flow_grpo", ["adv_std=global"]), ("diffusion_nft", []), ("dense_grpo", []),
    ("tempflow_grpo", ["group_size=1", "branches_per_step=4", "steps_per_iteration=2"]),
    ("branch_grpo", ["group_size=0", "rollout.split_steps=[0,1,2]", "trees_per_prompt=1"]),
    ("ddpo", ["per_prompt_stats=false"]),
])
def test_no_nan_reaches_training_or_the_summary(trainer, options, tmp_path, monkeypatch):
    """Every trainer with a reward that cannot score half its samples: every logged value (losses,
    advantages, rewards) and the summary are finite, and the unscored samples are counted."""
    module = trainer_module(trainer)
    config = load_config(module.CONFIG, None, [
        "rewards=[test_adv_partial]", "prompts=['0.3','0.6']", "eval_prompts=['0.5']", "iterations=2",
        "group_size=4", "prompts_per_iteration=2", "lora.enabled=false", f"run.output_dir={tmp_path}",
        "run.log_with=none", "run.progress=false", "eval.per_prompt=8", "rollout.num_steps=4", *options])
    adapter = GaussianDDPMAdapter() if trainer == "ddpo" else GaussianAdapter(shape=(3, 4, 4))
    summary = module.train(config, adapter=adapter)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    trained = [m for m in rows if "train/loss" in m]
    assert len(trained) == 2 and all(m["reward/unscored"] > 0 for m in trained)
    bad = [(k, v) for m in rows for k, v in m.items() if not math.isfinite(v)]
    assert not bad, bad
    assert math.isfinite(summary["reward_before"]) and math.isfinite(summary["reward_after"])
    assert torch.isfinite(adapter.denoiser.gain).all()


def test_logp_fusion_ignores_unscored_leaves_even_when_they_are_the_most_likely():
    """An unscored leaf with the highest log-prob must not set the softmax's maximum: the node's
    reward comes from its scored leaves (here 3, the likelier of the two)."""
    from align.advantages import fuse_leaf_rewards

    rewards = torch.tensor([1.0, float("nan"), 3.0])
    node = fuse_leaf_rewards(rewards, torch.zeros(3, dtype=torch.long), 1, mode="logp",
                             leaf_log_probs=torch.tensor([-200.0, -1.0, -100.0]),
                             valid=torch.tensor([True, False, True]))
    torch.testing.assert_close(node, torch.tensor([3.0]))
