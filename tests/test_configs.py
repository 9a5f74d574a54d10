"""Every shipped recipe config validates against its trainer's schema (no model is loaded)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from align.config import ConfigError, load_config
from align.trainers import trainer_module

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAINER_OF = {"quickstart": "flow_grpo", "quickstart_video": "reward_backprop", "quickstart_edit": "reward_backprop", "sd35_pickscore": "flow_grpo", "sd35_ocr_fast": "flow_grpo",
              "wan_video_frames": "flow_grpo", "sd15_aesthetic_alignprop": "reward_backprop",
              "sd35_pickscore_draft_lv": "reward_backprop", "sd15_dpo_pickapic": "dpo", "sd35_flow_dpo_online": "dpo",
              "wan_video_backprop": "reward_backprop", "qwen_image_pickscore": "flow_grpo",
              "kontext_edit_grpo": "flow_grpo", "qwen_image_edit_grpo": "flow_grpo",
              "flux2_pickscore": "flow_grpo", "flux2_klein_pickscore": "flow_grpo",
              "z_image_turbo_pickscore": "flow_grpo", "wan22_t2v_pickscore": "flow_grpo", "wan22_ti2v_i2v": "flow_grpo",
              "hunyuan_video15_t2v": "flow_grpo", "hunyuan_video15_i2v": "flow_grpo"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_recipe_config_loads(path, tmp_path):
    assert path.stem in TRAINER_OF, f"add {path.name} to TRAINER_OF"
    module = trainer_module(TRAINER_OF[path.stem])
    raw = OmegaConf.load(path)
    overrides = [f"prompt_file={tmp_path / 'p.txt'}"] if OmegaConf.is_missing(raw, "prompt_file") else []
    if "eval_prompt_file" in raw.keys() and OmegaConf.is_missing(raw, "eval_prompt_file"):
        overrides.append(f"eval_prompt_file={tmp_path / 'p.jsonl'}")
    if "pairs" in raw.keys() and OmegaConf.is_missing(raw, "pairs"):
        overrides.append(f"pairs={write_pairs(tmp_path)}")
    config = load_config(module.CONFIG, path, overrides)
    config.rollout.validate()
    module.check_config(config)


def write_pairs(folder: Path) -> Path:
    """A preference-pair file of two small images (docs/preference_pairs.md)."""
    from PIL import Image

    for name, colour in (("a.png", (200, 40, 40)), ("b.png", (40, 40, 200))):
        Image.new("RGB", (32, 32), colour).save(folder / name)
    path = folder / "pairs.jsonl"
    path.write_text('{"prompt": "a red car", "chosen": "a.png", "rejected": "b.png"}\n'
                    '{"prompt": "a blue car", "chosen": "b.png", "rejected": "a.png"}\n')
    return path


def test_missing_prompt_file_is_named():
    module = trainer_module("flow_grpo")
    with pytest.raises(ConfigError, match="prompt_file"):
        load_config(module.CONFIG, CONFIGS / "sd35_pickscore.yaml")


def test_accelerate_presets_are_valid_yaml():
    for path in (CONFIGS / "accelerate").glob("*.yaml"):
        data = OmegaConf.to_container(OmegaConf.load(path))
        assert data["distributed_type"] in {"NO", "MULTI_GPU", "FSDP", "DEEPSPEED", "MULTI_CPU"}
        assert data["num_processes"] >= 1


@pytest.mark.parametrize("path", sorted((CONFIGS / "methods").glob("*.yaml")), ids=lambda p: p.stem)
def test_method_preset_validates(path):
    """Every method preset names its trainer and passes that trainer's validation pass."""
    raw = OmegaConf.load(path)
    assert "trainer" in raw, f"{path.name} names no trainer"
    module = trainer_module(raw.trainer)
    config = load_config(module.CONFIG, path, ["run.output_dir=null"])
    module.check_config(config)
