"""Checkpoints without pickle that survive corruption: every file is safetensors or JSON with a
manifest of sizes; a truncated or missing file makes resume fall back to the newest intact
checkpoint (with a one-line warning) and the run still ends where an uninterrupted one does."""

from __future__ import annotations

import pytest
import torch

from align.training.checkpoint_files import checkpoint_problem, join_tensors, split_tensors
from tests.conftest import GaussianAdapter, crash_on_call, gaussian_trainer


def test_split_and_join_tensors_round_trip():
    state = {"step": 3, "lr": 1e-3, "nan": float("nan"), "names": ["a", None, True],
             "nested": {7: {"exp_avg": torch.randn(2, 3), "step": torch.tensor(4.0)}}, "list": [torch.ones(2)]}
    structure, tensors = split_tensors(state)
    back = join_tensors(structure, tensors)
    assert back["step"] == 3 and back["names"] == ["a", None, True] and back["nan"] != back["nan"]
    assert torch.equal(back["nested"][7]["exp_avg"], state["nested"][7]["exp_avg"])
    assert torch.equal(back["list"][0], torch.ones(2)) and list(back["nested"]) == [7]


def run(out, iterations, adapter=None):
    module, config = gaussian_trainer("flow_grpo", out, f"iterations={iterations}", "group_size=4", "ppo.kl_beta=0",
                                      "run.checkpoint_every=1", "ppo.clip_range=0.2")
    adapter = adapter or GaussianAdapter(shape=(3, 4, 4))
    module.train(config, adapter=adapter)
    return adapter.denoiser.gain.detach().clone()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return run(tmp_path_factory.mktemp("whole"), 6)


@pytest.mark.parametrize("damaged", ["trainable.safetensors", "optimizer.safetensors", "optimizer.json",
                                     "state.json", "state.safetensors", "checkpoint.json"])
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damaged, damage, tmp_path, uninterrupted):
    run(tmp_path, 4)
    newest = tmp_path / "checkpoints" / "iteration-000004"
    assert not list(newest.glob("*.pkl")) and not list(newest.glob("*.bin"))  # no pickle anywhere
    assert checkpoint_problem(newest) is None
    path = newest / damaged
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])
    else:
        path.unlink()
    assert checkpoint_problem(newest) is not None
    with pytest.warns(UserWarning, match="iteration-000004 is unusable"):
        resumed = run(tmp_path, 6)
    assert "resuming" in (tmp_path / "log.txt").read_text() and "from iteration-000003" in (
        tmp_path / "log.txt").read_text()
    torch.testing.assert_close(resumed, uninterrupted, rtol=0, atol=0)


def test_resuming_a_named_damaged_checkpoint_is_one_line(tmp_path):
    from align.config import ConfigError

    run(tmp_path, 2)
    checkpoint = tmp_path / "checkpoints" / "iteration-000002"
    (checkpoint / "state.json").write_text("{")
    module, config = gaussian_trainer("flow_grpo", tmp_path, "iterations=3", "group_size=4",
                                      f"run.resume={checkpoint}")
    with pytest.raises(ConfigError, match="state.json is truncated") as err:
        module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4)))
    assert "\n" not in str(err.value)


def test_a_checkpoint_of_other_lora_settings_is_one_line(tmp_path):
    from align.config import load_config
    from align.trainers import trainer_module
    from pipelines.toy import TOY_WEIGHTS_DIR

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    from align.config import ConfigError

    module = trainer_module("flow_grpo")

    def config(rank):
        return load_config(module.CONFIG, None, [
            "model.name=toy", "rewards=[digit]", "iterations=1", "prompts_per_iteration=1", "group_size=2",
            "rollout.num_steps=2", f"lora.rank={rank}", "eval.per_prompt=1", "eval_prompts=['a red digit 3']",
            f"run.output_dir={tmp_path}", "run.log_with=none", "run.progress=false", "run.checkpoint_every=1"])

    module.train(config(2))
    saved = (tmp_path / "config.yaml").read_text()
    wider = config(4)
    wider.iterations = 2  # run.resume=auto: the folder's rank-2 run is refused before anything loads
    with pytest.raises(ConfigError, match="holds a run with lora.rank=2, this config has lora.rank=4") as err:
        module.train(wider)
    assert "\n" not in str(err.value)
    # continuing it explicitly: the checkpoint's weights do not fit the rank-4 LoRA
    wider.run.resume = str(tmp_path / "checkpoints" / "iteration-000001")
    with pytest.raises(ConfigError, match="other LoRA settings") as err:
        module.train(wider)
    assert "\n" not in str(err.value)
    assert (tmp_path / "config.yaml").read_text() == saved  # a failed start leaves the saved config


def test_a_resumed_run_never_logs_an_iteration_twice(tmp_path, monkeypatch):
    """Checkpoints every 2 iterations, a crash in iteration 4: the resume starts after 2 and redoes
    3; metrics.jsonl keeps one row per iteration, and the run ends where an uninterrupted one does."""
    import json

    from align.trainers import flow_grpo

    whole = run(tmp_path / "whole", 5)
    module, config = gaussian_trainer("flow_grpo", tmp_path / "parts", "iterations=5", "group_size=4", "ppo.kl_beta=0",
                                      "run.checkpoint_every=2", "ppo.clip_range=0.2")
    crash_on_call(monkeypatch, flow_grpo, "sample_and_score", 4,
                  lambda: module.train(config, adapter=GaussianAdapter(shape=(3, 4, 4))))
    rows = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in rows if "train/loss" in m] == [1, 2, 3]
    resumed = GaussianAdapter(shape=(3, 4, 4))
    module.train(config, adapter=resumed)
    rows = [json.loads(line) for line in (tmp_path / "parts" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in rows if "train/loss" in m] == [1, 2, 3, 4, 5]
    torch.testing.assert_close(resumed.denoiser.gain, whole, rtol=0, atol=0)


def test_ctrl_c_is_one_line_saying_how_to_resume(monkeypatch, capsys, tmp_path):
    from align.commands import cli
    from align.trainers import flow_grpo

    def interrupted(config, adapter=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(flow_grpo, "train", interrupted)
    assert cli.main(["train", "flow_grpo", f"run.output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("align: interrupted") and "no checkpoint was written" in err
    (tmp_path / "checkpoints" / "iteration-000004").mkdir(parents=True)
    assert cli.main(["train", "flow_grpo", f"run.output_dir={tmp_path}"]) == 130
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"the last checkpoint is {tmp_path}/checkpoints/iteration-000004" in err
    assert f"run.output_dir={tmp_path} continues from it" in err
