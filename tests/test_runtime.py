"""Runtime: config errors, atomic checkpoints, kill and resume, and every trainer on an analytic model."""

import importlib
import json

import pytest
import torch

from align.config import ConfigError, load_config
from align.trainers import TRAINERS, trainer_module
from rewards.base import Reward, register_reward
from tests.conftest import GaussianAdapter, GaussianDDPMAdapter, crash_on_call


@register_reward("test_brightness")
class Brightness(Reward):
    differentiable = True

    def score(self, samples, prompts, **context):
        return {"score": samples.mean(dim=(1, 2, 3))}


class ImageAdapter(GaussianAdapter):
    """Analytic flow model whose latents are 3-channel images; ``gain`` is the trained weight."""

    def __init__(self):
        super().__init__(shape=(3, 4, 4))


def config_for(name, tmp_path, *extra):
    module = trainer_module(name)
    overrides = ["rewards=[test_brightness]", "prompts=['0.5']", "eval_prompts=['0.5']", "iterations=6",
                 "lora.enabled=false", f"run.output_dir={tmp_path / name}", "optim.lr=0.05",
                 "ppo.clip_range=0.2", "rollout.num_steps=6", "run.log_with=none", "prompts_per_iteration=1",
                 "run.progress=false", "eval.per_prompt=16"]
    if name in ("flow_grpo", "dense_grpo", "tempflow_grpo", "branch_grpo", "ddpo"):
        overrides.append("ppo.kl_beta=0")
    return module, load_config(module.CONFIG, None, overrides + list(extra))


def test_unknown_key_is_a_one_line_error_with_the_closest_name():
    module = trainer_module("flow_grpo")
    with pytest.raises(ConfigError, match="did you mean 'ppo.clip_range'") as err:
        load_config(module.CONFIG, None, ["clip_rnage=0.1"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="clip_range: it belongs to a block; write ppo.clip_range"):
        load_config(module.CONFIG, None, ["clip_range=0.1"])
    with pytest.raises(ConfigError, match="did you mean 'optim.lr'"):
        load_config(module.CONFIG, None, ["optim.lrr=0.1"])
    with pytest.raises(ConfigError, match="clip_range"):
        load_config(module.CONFIG, None, ["ppo.clip_range=abc"])
    with pytest.raises(ConfigError, match="did you mean 'flow_grpo'"):
        trainer_module("flow_grp")


def test_unknown_reward_fails_before_the_model_loads(tmp_path):
    module, config = config_for("flow_grpo", tmp_path, "rewards=[digitt]")
    with pytest.raises(ConfigError, match="unknown reward 'digitt'"):
        module.train(config, adapter=None)  # adapter None would load a model: the error comes first
    assert not (tmp_path / "flow_grpo").exists()


@pytest.mark.parametrize("name,options", [
    ("flow_grpo", []), ("flow_grpo", ["guard=true", "ppo.inner_epochs=2", "train_batch_size=4"]),
    ("flow_grpo", ["window_size=2", "rollout.kernel=cps"]), ("dense_grpo", ["calibrate_noise=true"]),
    ("tempflow_grpo", [])])
def test_trainer_raises_the_reward_of_an_analytic_model(name, options, tmp_path):
    """Brightness of samples of N(0.5, 0.5^2) data: the trainable velocity gain must rise and with
    it the reward, by far more than the run-to-run spread (measured: < 0.01 between seeds)."""
    extra = ["group_size=2"] if name == "tempflow_grpo" else ["group_size=8"]
    module, config = config_for(name, tmp_path, "iterations=12", *extra, *options)
    summary = module.train(config, adapter=ImageAdapter())
    assert summary["reward_after"] > summary["reward_before"] + 0.1


def test_first_on_policy_step_has_ratio_one_and_no_clipping(tmp_path):
    module, config = config_for("flow_grpo", tmp_path, "iterations=1", "group_size=4")
    module.train(config, adapter=ImageAdapter())
    lines = [json.loads(line) for line in (tmp_path / "flow_grpo" / "metrics.jsonl").read_text().splitlines()]
    first = next(line for line in lines if "train/ratio_mean" in line)
    assert first["train/ratio_mean"] == 1.0 and first["train/clip_fraction"] == 0.0
    assert first["train/approx_kl"] == 0.0


def test_killed_run_resumes_to_the_same_state(tmp_path, monkeypatch):
    """Uninterrupted 6 iterations == 4 iterations, a crash, and a resume (checkpoint every step)."""
    module, config = config_for("flow_grpo", tmp_path, "run.checkpoint_every=1", "group_size=4")
    full = ImageAdapter()
    module.train(config, adapter=full)

    module, config = config_for("flow_grpo", tmp_path / "b", "run.checkpoint_every=1", "group_size=4")
    # 1 evaluation + 4 iterations done, the fifth dies in its reward phase
    crash_on_call(monkeypatch, Brightness, "score", 6, lambda: module.train(config, adapter=ImageAdapter()))
    checkpoints = sorted(p.name for p in (tmp_path / "b" / "flow_grpo" / "checkpoints").iterdir())
    assert checkpoints == ["iteration-000003", "iteration-000004"]  # limit 2, no partial folder left
    resumed = ImageAdapter()
    module.train(config, adapter=resumed)
    torch.testing.assert_close(resumed.denoiser.gain, full.denoiser.gain, rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_every_trainer_names_itself_and_checks_names_before_loading(name, tmp_path):
    """Each trainer's config names its trainer, and its check_config rejects a mistyped model name
    with a one-line error naming the field, before anything loads or any folder is made."""
    module = importlib.import_module(TRAINERS[name])
    config = load_config(module.CONFIG, None, ["model.name=sd33", f"run.output_dir={tmp_path / 'run'}"])
    assert config.trainer == name
    with pytest.raises(ConfigError, match=r"^model.name: unknown model 'sd33' \(did you mean 'sd3'\?") as err:
        module.train(config)
    assert "\n" not in str(err.value) and not (tmp_path / "run").exists()



@pytest.mark.parametrize("name", ["flow_grpo", "dense_grpo", "ddpo"])
def test_gradient_accumulation_matches_one_large_minibatch(name, tmp_path):
    """Minibatches of 4 accumulated over 2 steps make the same update as minibatches of 8 (each
    loss is divided by the step count, one optimizer step per 2 minibatches); without accumulation
    the two minibatches of 4 make two different updates."""
    def final_gain(label, *extra):
        module, config = config_for(name, tmp_path / label, "iterations=2", "group_size=8", "eval.per_prompt=2",
                                    *extra)
        adapter = GaussianDDPMAdapter() if name == "ddpo" else ImageAdapter()
        module.train(config, adapter=adapter)
        return adapter.denoiser.gain.detach().clone()

    large = final_gain("large", "train_batch_size=8")
    accumulated = final_gain("accumulated", "train_batch_size=4", "run.gradient_accumulation_steps=2")
    separate = final_gain("separate", "train_batch_size=4")
    torch.testing.assert_close(accumulated, large, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(separate, large, rtol=1e-5, atol=1e-7)


def test_ema_weights_are_evaluated_and_resumed(tmp_path):
    """optim.ema_decay: training is unchanged (same raw weights), the evaluation uses the EMA, which
    trails the rising weights (reward between the start and the raw weights'), and a resumed run
    restores the EMA to the value of an uninterrupted one."""
    def run(label, *extra):
        module, config = config_for("flow_grpo", tmp_path / label, "group_size=8", "run.checkpoint_every=2", *extra)
        adapter = ImageAdapter()
        return module.train(config, adapter=adapter), adapter.denoiser.gain.detach().clone()

    raw, raw_gain = run("raw")
    ema, ema_gain = run("ema", "optim.ema_decay=0.9")
    torch.testing.assert_close(ema_gain, raw_gain, rtol=0, atol=0)
    assert raw["reward_before"] == ema["reward_before"]
    assert raw["reward_before"] < ema["reward_after"] < raw["reward_after"]

    run("resumed", "optim.ema_decay=0.9", "iterations=4")
    resumed, resumed_gain = run("resumed", "optim.ema_decay=0.9", "run.resume=latest")
    torch.testing.assert_close(resumed_gain, raw_gain, rtol=0, atol=0)
    assert resumed["reward_after"] == ema["reward_after"]


def test_non_finite_gradients_skip_the_update_then_stop_the_run(tmp_path):
    """A NaN gradient skips its update (weights untouched, counted); MAX_BAD_UPDATES in a row stop
    the run with a one-line TrainingError."""
    from align.training.optim import MAX_BAD_UPDATES, TrainingError

    module, config = config_for("flow_grpo", tmp_path / "one", "iterations=1", "group_size=4")
    adapter = ImageAdapter()
    start = adapter.denoiser.gain.detach().clone()
    adapter.denoiser.gain.register_hook(lambda grad: grad * float("nan"))
    with pytest.warns(UserWarning, match="update skipped"):
        module.train(config, adapter=adapter)
    torch.testing.assert_close(adapter.denoiser.gain.detach(), start, rtol=0, atol=0)

    module, config = config_for("flow_grpo", tmp_path / "many", f"iterations={MAX_BAD_UPDATES + 2}",
                                "group_size=4")
    adapter = ImageAdapter()
    adapter.denoiser.gain.register_hook(lambda grad: grad * float("nan"))
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match=f"{MAX_BAD_UPDATES} updates in a row") as err:
        module.train(config, adapter=adapter)
    assert "\n" not in str(err.value)


def test_shuffled_minibatches_partition_the_rows_in_rollout_order():
    """Every row once; each minibatch ascending (a whole-batch minibatch is the rollout's batch, so
    its re-score is bit-exact); the partition into minibatches changes with the seed."""
    from align.trainers.common import shuffled_minibatches

    rows = torch.tensor([0, 2, 3, 5, 7, 8, 9])
    parts = shuffled_minibatches(rows, 3, seed=0)
    assert [len(p) for p in parts] == [3, 3, 1]
    assert sorted(torch.cat(parts).tolist()) == rows.tolist()
    assert all(p.tolist() == sorted(p.tolist()) for p in parts)
    assert [p.tolist() for p in shuffled_minibatches(7, 7, seed=1)] == [list(range(7))]
    partitions = {tuple(tuple(p.tolist()) for p in shuffled_minibatches(rows, 3, seed=s)) for s in range(5)}
    assert len(partitions) > 1
