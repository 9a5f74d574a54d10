"""The align command: sample from diffusers adapters over topologies, env, and one-line errors."""

from pathlib import Path

from PIL import Image

from align.commands.cli import main
from tests.tiny_models import build_sd3, build_wan

QUICKSTART = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"


def test_sample_sd3_tree_writes_pngs_and_grid(tmp_path, capsys):
    model = build_sd3(tmp_path / "sd3")
    out = tmp_path / "out"
    code = main(["sample", "--model", "sd3", "--model-path", str(model), "--prompt", "a red car", "--num", "1",
                 "--steps", "4", "--guidance", "2.0", "--out", str(out), "rollout.kernel=flow_grpo",
                 "rollout.split_steps=[0,2]"])
    assert code == 0
    pngs = sorted(out.glob("0*.png"))
    assert len(pngs) == 4  # one root, two splits of factor 2
    # the grid: the four samples in a row, each 32 px sample enlarged 3x (nearest) to be seen
    w, h = Image.open(pngs[0]).size
    grid = Image.open(out / "grid.png")
    assert grid.size == (4 * w * 3, h * 3)
    first = Image.open(pngs[0]).convert("RGB")
    assert grid.convert("RGB").crop((0, 0, 3 * w, 3 * h)).resize((w, h), Image.NEAREST).tobytes() == first.tobytes()
    assert "nfe=" in capsys.readouterr().out
    assert len((out / "prompts.txt").read_text().splitlines()) == 4


def test_sample_wan_writes_mp4(tmp_path):
    model = build_wan(tmp_path / "wan")
    out = tmp_path / "video"
    code = main(["sample", "--model", "wan", "--model-path", str(model), "--prompt", "a cat", "--num", "1",
                 "--steps", "2", "--out", str(out), "model.height=16", "model.width=16", "model.num_frames=5"])
    assert code == 0
    assert (out / "0000.mp4").stat().st_size > 0 and (out / "grid.png").exists()


def test_sample_without_steps_takes_the_models_default(tmp_path, capsys):
    """rollout.num_steps 0 (the default of `align sample`) is the adapter's own step count."""
    from pipelines.toy import TOY_WEIGHTS_DIR, ToyAdapter

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        import pytest

        pytest.skip("toy model weights not built")
    def nfe(*args):
        out = tmp_path / "-".join(args or ("default",))
        assert main(["sample", "--model", "toy", "--prompt", "a red digit 7", "--num", "2", "--out", str(out),
                     *args]) == 0
        assert len(list(out.glob("0*.png"))) == 2
        return capsys.readouterr().out.split("nfe=")[1].strip(")\n")

    assert nfe() == nfe("--steps", str(ToyAdapter.default_steps)) != nfe("--steps", "3")


def test_config_errors_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["sample", "--model", "sd33", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "did you mean 'sd3'" in err and "\n" not in err
    assert main(["sample", "rollout.num_stepz=3", "--out", str(tmp_path)]) == 2
    assert "rollout.num_steps" in capsys.readouterr().err
    assert main(["train", "flow_grpo", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_one_entry_of_a_list_is_a_one_line_error(capsys):
    """OmegaConf replaces lists whole: ``rewards[0].lr=0.1`` on a preset that sets ``rewards`` says so."""
    preset = Path(__file__).resolve().parents[1] / "configs" / "methods" / "adv_grpo.yaml"
    assert main(["train", "--config", str(preset), "rewards[0].lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "rewards: a list is replaced whole" in err and "\n" not in err


def test_env_reports_versions(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "diffusers" in out and "attention" in out


def test_overrides_may_follow_options(tmp_path, capsys):
    assert main(["train", "flow_grpo", "--config", str(tmp_path / "none.yaml"), "clip_rnage=1"]) == 2
    assert "not found" in capsys.readouterr().err  # parsed as an override, then the file check fails first
    assert main(["train", "flow_grpo", "clip_rnage=1", "--config", str(QUICKSTART)]) == 2
    assert "did you mean 'ppo.clip_range'" in capsys.readouterr().err


def test_print_config_shows_the_resolved_config_and_it_loads_back(tmp_path, capsys):
    from align.config import load_config
    from align.trainers import trainer_module

    out = tmp_path / "run"
    assert main(["train", "flow_grpo", "--print-config", "--config", str(QUICKSTART), "ppo.clip_range=0.1",
                 f"run.output_dir={out}"]) == 0
    text = capsys.readouterr().out
    path = tmp_path / "resolved.yaml"
    path.write_text(text)
    module = trainer_module("flow_grpo")
    resolved = load_config(module.CONFIG, path)
    assert resolved == load_config(module.CONFIG, QUICKSTART, ["ppo.clip_range=0.1", f"run.output_dir={out}"])
    assert resolved.ppo.clip_range == 0.1 and resolved.iterations == 20
    assert not out.exists()  # printed only: no run started


import pytest  # noqa: E402


@pytest.mark.parametrize("args, field, hint", [
    (["train", "flow_gpro"], "trainer", "flow_grpo"),
    (["train", "flow_grpo", "model.name=sd33"], "model.name", "sd3"),
    (["train", "flow_grpo", "rollout.kernel=flow_grop"], "rollout.kernel", "flow_grpo"),
    (["train", "flow_grpo", "rewards=[digitt]"], "rewards[0]", "digit"),
    (["train", "dense_grpo", "heldout_rewards=[{name: jpeg_compresibility}]"], "heldout_rewards[0]",
     "jpeg_compressibility"),
    (["train", "flow_grpo", "run.log_with=tensorbord"], "run.log_with", "tensorboard"),
    (["train", "flow_grpo", "run.mixed_precision=bf61"], "run.mixed_precision", "bf16"),
    (["sample", "--model", "sd33"], "model.name", "sd3"),
])
def test_every_typed_name_fails_in_one_line_with_the_closest_name(args, field, hint, tmp_path, capsys, monkeypatch):
    """A mistyped name of each kind: exit status 2, one line naming the field and the closest valid
    name, before any model loads (a model load would be the adapter registry's import)."""
    import pipelines.registry

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipelines.registry, "load_adapter", no_load)
    assert main([*args, f"run.output_dir={tmp_path / 'run'}"] if args[0] == "train"
                else [*args, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"{field}:" in err and f"did you mean {hint!r}" in err, err
    assert not (tmp_path / "run").exists()


def test_a_method_preset_names_its_trainer(tmp_path, capsys):
    preset = Path(__file__).resolve().parents[1] / "configs" / "methods" / "dense_grpo.yaml"
    assert main(["train", "--config", str(preset), "--print-config"]) == 0
    assert "trainer: dense_grpo" in capsys.readouterr().out
    assert main(["train", "flow_grpo", "--config", str(preset), "--print-config"]) == 2
    assert "the config names 'dense_grpo'" in capsys.readouterr().err
    # a preset and overrides, no method named: the first override is not taken for a method
    assert main(["train", "--config", str(preset), "iterations=7", "group_size=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "trainer: dense_grpo" in out and "iterations: 7" in out and "group_size: 3" in out


def test_launch_checks_the_preset_and_the_config_before_starting_processes(tmp_path, capsys):
    assert main(["launch", "multi_gpuu", "train", "flow_grpo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "launch:" in err and "did you mean 'multi_gpu'" in err
    assert main(["launch", "--dry-run", "multi_cpu", "train", "flow_grpo", "rollout.kernel=flow_grop"]) == 2
    assert "rollout.kernel:" in capsys.readouterr().err
    assert main(["launch", "--dry-run", "multi_cpu", "train", "flow_grpo", "--config", str(QUICKSTART),
                 "optim.lr=1e-3"]) == 0
    command = capsys.readouterr().out.split()
    assert command[1:4] == ["-m", "accelerate.commands.launch", "--config_file"]
    assert command[4].endswith("configs/accelerate/multi_cpu.yaml") and Path(command[4]).is_file()
    # every process writes the folder the launcher chose
    assert command[5:] == ["-m", "align", "train", "flow_grpo", "--config", str(QUICKSTART), "optim.lr=1e-3",
                           "run.output_dir=runs/quickstart"]
