"""B²-DiffuRL: the split step moves from the end back to the start over the run, the prefix
before it is deterministic, and PPO trains only the steps after it, on the copies kept."""

from __future__ import annotations

import json

from align.trainers.b2_diffurl import B2DiffuRLConfig, split_step
from align.sampling.rollout import RolloutConfig
from tests.conftest import GaussianAdapter, gaussian_trainer
from tests.test_reward_backprop import CallLog


def test_the_split_moves_back_linearly_from_split_start_to_split_end():
    config = B2DiffuRLConfig(rollout=RolloutConfig(num_steps=10), iterations=9)
    assert [split_step(config, i) for i in range(9)] == [8, 7, 6, 5, 4, 3, 2, 1, 0]
    slow = B2DiffuRLConfig(rollout=RolloutConfig(num_steps=10), iterations=100, split_start=6, split_end=2,
                           split_span=5)
    assert [split_step(slow, i) for i in (0, 1, 2, 3, 4, 50)] == [6, 5, 4, 3, 2, 2]


def test_only_the_steps_after_the_split_are_stochastic_and_trained(tmp_path):
    module, config = gaussian_trainer("b2_diffurl", tmp_path, "iterations=1", "group_size=2", "branch_factor=4",
                                      "split_start=3", "keep_threshold=0", "run.checkpoint_every=0")
    adapter = GaussianAdapter(shape=(3, 4, 4))
    log = CallLog(adapter)
    module.train(config, adapter=adapter)
    timesteps = [round(t, 3) for t in adapter.schedule(6).timesteps.tolist()]
    assert log.grad_timesteps() == sorted(timesteps[3:5])  # steps 3 and 4 (not the last, not the prefix)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "train/loss" in r)
    assert first["train/split_step"] == 3.0 and first["advantage/kept_fraction"] > 0


def test_copies_near_their_trajectory_mean_are_dropped(tmp_path):
    def kept(threshold):
        module, config = gaussian_trainer("b2_diffurl", tmp_path / str(threshold), "iterations=1", "group_size=2",
                                          "branch_factor=4", "split_start=2", f"keep_threshold={threshold}",
                                          "run.checkpoint_every=0")
        module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
        rows = [json.loads(line) for line in (tmp_path / str(threshold) / "metrics.jsonl").read_text().splitlines()]
        return next(r for r in rows if "advantage/kept_fraction" in r)["advantage/kept_fraction"]

    assert kept(0.0) == 1.0
    # advantages are in each trajectory's std: a threshold of 0.9 drops the copies closest to the mean
    assert kept(0.9) < 1.0
    assert kept(5.0) == 0.0  # |A| <= sqrt(3) among 4 copies
