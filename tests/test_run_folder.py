"""Runs never silently do the wrong thing in a run folder (align/training/run_folder.py): a fresh folder per
run by default, a changed setting or a finished run refused in one line before anything loads, a
start-over that leaves nothing of the old run, too many unscored samples stop the run, and no
trainer opens a run without the validation pass."""

from __future__ import annotations

import json

import pytest
import torch

from align.errors import ConfigError
from rewards.base import RewardError
from tests.conftest import GaussianAdapter, gaussian_trainer


def train(out, *extra):
    module, config = gaussian_trainer("flow_grpo", out, "group_size=4", "run.checkpoint_every=1", *extra)
    adapter = GaussianAdapter(shape=(3, 4, 4))
    module.train(config, adapter=adapter)
    return config, adapter


def trained_iterations(folder):
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r["iteration"] for r in rows if "train/loss" in r]


def test_a_run_without_output_dir_gets_a_fresh_folder_and_latest_continues_the_newest(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    first, _ = train(None, "run.output_dir=null", "iterations=1")
    second, _ = train(None, "run.output_dir=null", "iterations=1")
    folders = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.startswith("flow_grpo-") for f in folders)
    assert first.run.output_dir != second.run.output_dir
    assert json.loads((tmp_path / second.run.output_dir / "run.json").read_text())["trainer"] == "flow_grpo"
    # run.resume=latest with no folder named: the newest run of this trainer, continued
    third, _ = train(None, "run.output_dir=null", "run.resume=latest", "iterations=3")
    assert third.run.output_dir == second.run.output_dir
    assert trained_iterations(tmp_path / third.run.output_dir) == [1, 2, 3]
    assert "resuming" in (tmp_path / third.run.output_dir / "log.txt").read_text()


def test_a_changed_setting_is_refused_and_a_longer_run_continues(tmp_path):
    train(tmp_path, "iterations=2")
    saved = (tmp_path / "config.yaml").read_text()
    with pytest.raises(ConfigError) as err:
        train(tmp_path, "iterations=3", "optim.lr=0.01")
    message = str(err.value)
    assert "\n" not in message and "holds a run with optim.lr=0.05, this config has optim.lr=0.01" in message
    assert "run.resume=" in message and (tmp_path / "config.yaml").read_text() == saved
    assert trained_iterations(tmp_path) == [1, 2]  # nothing ran
    # iterations (and evaluation, logging, hardware) may change: the run goes on from iteration 2
    train(tmp_path, "iterations=3")
    assert trained_iterations(tmp_path) == [1, 2, 3]
    # an explicit checkpoint continues with the new settings
    train(tmp_path, "iterations=4", "optim.lr=0.01", f"run.resume={tmp_path}/checkpoints/iteration-000003")
    assert trained_iterations(tmp_path) == [1, 2, 3, 4]


def test_a_finished_run_says_so_instead_of_running_again(tmp_path):
    # checkpoint_every=3 does not divide 4: the finished state is checkpointed anyway
    train(tmp_path, "iterations=4", "run.checkpoint_every=3")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iteration-000003", "iteration-000004"]
    rows = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ConfigError) as err:
        train(tmp_path, "iterations=4", "run.checkpoint_every=3")
    assert "\n" not in str(err.value)
    assert "already finished (iterations=4; its checkpoint is at iteration 4)" in str(err.value)
    assert (tmp_path / "metrics.jsonl").read_text() == rows


def test_starting_over_leaves_nothing_of_the_old_run(tmp_path):
    train(tmp_path, "iterations=3")
    _, fresh = train(tmp_path, "iterations=1", "run.resume=null")
    assert trained_iterations(tmp_path) == [1]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iteration-000001"]
    _, again = train(tmp_path / "other", "iterations=1")
    torch.testing.assert_close(fresh.denoiser.gain, again.denoiser.gain, rtol=0, atol=0)


def register_half_scored():
    from rewards.base import REWARDS, Reward, register_reward

    if "test_rows_unscored" in REWARDS:
        return

    @register_reward("test_rows_unscored")
    class ThreeQuartersUnscored(Reward):
        """Brightness; the training batches (4 rows) score only their first row."""

        def score(self, samples, prompts, **context):
            valid = torch.ones(len(samples), dtype=torch.bool)
            if len(samples) == 4:
                valid[1:] = False
            return {"score": samples.mean(dim=(1, 2, 3)), "_valid": valid}


def test_too_many_unscored_samples_stop_the_run_with_one_line(tmp_path):
    register_half_scored()
    with pytest.raises(RewardError) as err:
        train(tmp_path / "strict", "iterations=2", "rewards=[test_rows_unscored]")
    message = str(err.value)
    assert "\n" not in message and "(test_rows_unscored) could not score 3 of the 4 samples of iteration 1" in message
    assert "run.max_unscored_fraction=0.5" in message
    # a looser policy trains on (here: drops every group, since one scored row carries no signal)
    train(tmp_path / "loose", "iterations=2", "rewards=[test_rows_unscored]", "run.max_unscored_fraction=0.8")
    rows = [json.loads(line) for line in (tmp_path / "loose" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/unscored"] for r in rows if "reward/unscored" in r] == [3.0, 3.0]


def test_max_unscored_fraction_must_be_a_fraction(tmp_path):
    with pytest.raises(ConfigError, match=r"run.max_unscored_fraction must be in \[0, 1\], got 1.5"):
        gaussian_trainer("flow_grpo", tmp_path, "run.max_unscored_fraction=1.5")


@pytest.mark.parametrize("name", sorted(__import__("align.trainers", fromlist=["TRAINERS"]).TRAINERS))
def test_no_trainer_opens_a_run_without_the_validation_pass(name, tmp_path, monkeypatch):
    """Every registered trainer (later ones too: this runs over the registry) refuses a value only
    the shared pass checks, before a model loads or the run folder is made."""
    import pipelines.registry
    from align.config import load_config
    from align.trainers import trainer_module

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipelines.registry, "load_adapter", refuse)
    module = trainer_module(name)
    for bad, expected in (("prompts=[]", "prompts is empty"), ("optim.lr=-1", "optim.lr must be > 0")):
        config = load_config(module.CONFIG, None, [bad, f"run.output_dir={tmp_path / 'run'}"])
        with pytest.raises(ConfigError, match=expected):
            module.train(config)
        # the shared start itself validates, whatever a trainer's train() does first
        from align.trainers.common import start_run

        with pytest.raises(ConfigError, match=expected):
            start_run(config)
        assert not (tmp_path / "run").exists()


def test_a_failed_start_writes_nothing(tmp_path, monkeypatch):
    """A start that fails leaves no folder: the next run would take it for a run to continue. A
    missing checkpoint is refused before the run opens; a failure after the folder is made (here the
    first evaluation's reward) removes it; a folder that held a run before keeps what it had."""
    import align.trainers.common as common

    with pytest.raises(ConfigError, match=r"^run.resume: checkpoint folder not found: .*nowhere$"):
        train(tmp_path / "run", "iterations=1", f"run.resume={tmp_path / 'nowhere'}")
    assert not (tmp_path / "run").exists()

    def broken_evaluation(*args, **kwargs):
        raise RuntimeError("the reward failed")

    monkeypatch.setattr(common, "evaluate_run", broken_evaluation)
    with pytest.raises(RuntimeError, match="the reward failed"):
        train(tmp_path / "run", "iterations=1")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    train(tmp_path / "kept", "iterations=1")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "kept").rglob("*"))
    monkeypatch.setattr(common, "evaluate_run", broken_evaluation)
    with pytest.raises(RuntimeError, match="the reward failed"):
        train(tmp_path / "kept", "iterations=2", "run.resume=null")
    assert (tmp_path / "kept" / "run.json").is_file() and (tmp_path / "kept" / "metrics.jsonl").is_file()
