"""The shipped recipes (configs/*.yaml) build every reward they name and run as written, on tiny
random stand-ins of the real models: the model path, sizes and device / dtype, the run length, and in
each reward only the weights it loads (a hub backbone, or the file a weight key of the recipe names)
are replaced. Every other setting of each recipe (kernels, windows, CFG, chunked batches, LoRA,
bf16 autocast, KL, the trained and held-out rewards) is exercised."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from align.config import load_config
from align.trainers import trainer_module
from rewards import build_reward
from rewards.tiny import save_random_aesthetic_head, tiny_hf_clip, tiny_open_clip_checkpoint, tiny_open_clip_config

try:
    from tests.tiny_models import (FAMILY_CASES, build_family, build_flux, build_sd, build_sd3, build_wan,
                                   family_overrides, write_family_prompts)
except ImportError:  # tests/ on sys.path
    from tiny_models import (FAMILY_CASES, build_family, build_flux, build_sd, build_sd3, build_wan, family_overrides,
                             write_family_prompts)

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
#: the recipes for real models (configs/*.yaml but the embedded defaults' quickstarts) and the reference
#: presets (configs/reference/*.yaml)
RECIPES = sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in [*CONFIGS.glob("*.yaml"),
                                                                        *CONFIGS.glob("reference/*.yaml")]
                 if OmegaConf.load(p).get("model", {}).get("name") not in ("toy", "toy_video", "toy_edit"))
BUILDERS = {"sd3": build_sd3, "wan": build_wan, "flux": build_flux, "sd": build_sd}
#: the recipes of FAMILY_CASES' families run on the tiny stand-in of FAMILY_CASES named here (by recipe, else by
#: model name)
FAMILY_OF_RECIPE = {"z_image_turbo_pickscore": "z_image_turbo", "wan22_t2v_pickscore": "wan22_a14b",
                    "wan22_ti2v_i2v": "wan22_i2v"}
FAMILY_OF_MODEL = {"qwen_image": "qwen_image", "flux2": "flux2", "flux2_klein": "flux2_klein",
                   "hunyuan_video15": "hunyuan_video15", "hunyuan_video15_i2v": "hunyuan_video15_i2v",
                   "flux_kontext": "flux_kontext", "qwen_image_edit": "qwen_image_edit"}
#: rewards that embed images with a CLIP backbone taken from the hub (clip_model / clip_pretrained)
OPEN_CLIP_REWARDS = {"aesthetic", "video_frames", "clip_score"}
#: option -> what it names: a file or model the user provides (the recipe must name these keys)
WEIGHT_KEYS = ("head_path", "model_path", "classifier_path")


@lru_cache(maxsize=None)
def stand_ins(root: str) -> dict:
    root = Path(root)
    return {"clip_model": tiny_open_clip_config(), "clip_pretrained": str(tiny_open_clip_checkpoint(root / "clip.pt")),
            "head_path": str(save_random_aesthetic_head(root / "head.pth", embed_dim=32)),
            "model_path": str(tiny_hf_clip(root / "hf_clip"))}


@lru_cache(maxsize=None)
def scripted_chat_server() -> str:
    """The URL of a scripted critic (``python -m rewards.chat_server --scripted``) on 127.0.0.1, started
    on first use and stopped with the test process (or after 600 s)."""
    import atexit
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "rewards.chat_server", "--scripted", "--host", "127.0.0.1",
                             "--port", "0", "--max-seconds", "600"], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    atexit.register(proc.kill)
    line = proc.stdout.readline()
    assert line.startswith("READY "), f"the scripted chat server did not start: {line!r}"
    return f"http://127.0.0.1:{int(line.split()[1])}/v1"


def with_stand_ins(spec, root) -> dict:
    """The reward spec as the recipe writes it, its weights swapped for tiny ones: a weight key keeps
    its place (a missing one stays missing, so the reward fails to build), a hub backbone is swapped,
    and the reward runs on the CPU; a VLM critique asks the scripted critic in process, and the specs
    inside a combined edit score are swapped the same way."""
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    models = stand_ins(str(root))
    if spec["name"] == "edit_score":
        for part in ("instruction", "preservation"):
            if part in spec:
                spec[part] = with_stand_ins(spec[part], root)
    if spec["name"] == "critique":  # the scripted stand-in of an OpenAI-compatible VLM server
        spec["base_url"] = scripted_chat_server()
    if spec["name"] == "preservation" and spec.get("features") == "clip":
        spec.update(clip_model=models["clip_model"], clip_pretrained=models["clip_pretrained"])
    for key in WEIGHT_KEYS:
        if key in spec:
            spec[key] = models[key] if key in models else spec[key]
    if spec["name"] in OPEN_CLIP_REWARDS:
        spec.update(clip_model=models["clip_model"], clip_pretrained=models["clip_pretrained"])
    if spec["name"] == "hpsv2":  # an open_clip model whose weights are the recipe's checkpoint file
        spec["clip_model"] = models["clip_model"]
        if "checkpoint" in spec:
            spec["checkpoint"] = models["clip_pretrained"]
    if spec["name"] == "pickscore":
        spec["processor_path"] = None  # the tiny model directory holds its own processor
    if spec["name"] == "hpsv3":  # a tiny Qwen2-VL base and a random release-layout checkpoint over it
        from rewards.tiny import save_random_hpsv3, tiny_qwen2_vl

        base = Path(root) / "hpsv3_base"
        if not base.exists():
            tiny_qwen2_vl(base)
            save_random_hpsv3(Path(root) / "HPSv3.safetensors", base)
        spec.update(checkpoint=str(Path(root) / "HPSv3.safetensors"), base_path=str(base), pixels=56 * 56,
                    dtype="float32")
    if "device" in spec:
        spec["device"] = "cpu"
    return spec


def recipe_rewards(recipe: str):
    raw = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{recipe}.yaml"))
    return [("rewards", s) for s in raw.get("rewards", [])] + [("heldout_rewards", s) for s in
                                                               raw.get("heldout_rewards", [])]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_builds_every_reward_it_names(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    rewards = recipe_rewards(recipe)
    assert rewards
    for field, spec in rewards:
        reward = build_reward(with_stand_ins(spec, root))  # a missing weight key fails here
        assert reward.name == (spec if isinstance(spec, str) else spec["name"]), field


def test_a_recipe_without_its_weights_key_fails_to_build(tmp_path):
    """The check above is not vacuous: an aesthetic reward without ``head_path`` does not build."""
    from align.config import ConfigError

    with pytest.raises(ConfigError, match="head_path"):
        build_reward(with_stand_ins({"name": "aesthetic", "device": "cuda"}, tmp_path))


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_runs_an_iteration(recipe, tmp_path, tmp_path_factory):
    raw = OmegaConf.load(CONFIGS / f"{recipe}.yaml")
    root = tmp_path_factory.mktemp("models")
    family = FAMILY_OF_RECIPE.get(recipe, FAMILY_OF_MODEL.get(raw.model.name))
    model_dir = build_family(family, tmp_path) if family else BUILDERS[raw.model.name](tmp_path / "model")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a sign that says "hello"\na red car\n')
    size = family_overrides(family) if family else ["model.height=32", "model.width=32"]
    if family and FAMILY_CASES[family][5] in ("i2v", "edit"):  # image-to-video and editing read JSONL prompts
        image_prompts = write_family_prompts(family, ["a red car"], tmp_path)
        prompts = tmp_path / "prompts.jsonl"
        size.append(image_prompts[1])
    module = trainer_module(raw.get("trainer", "flow_grpo"))
    trained = [with_stand_ins(s, root) for f, s in recipe_rewards(recipe) if f == "rewards"]
    heldout = [with_stand_ins(s, root) for f, s in recipe_rewards(recipe) if f == "heldout_rewards"]
    frames = ["model.num_frames=5"] if raw.model.name == "wan" else []
    if "pairs" in raw.keys():  # offline preference pairs: two images the tiny model's VAE encodes
        from tests.test_configs import write_pairs

        frames.append(f"pairs={write_pairs(tmp_path)}")
    config = load_config(module.CONFIG, CONFIGS / f"{recipe}.yaml", [
        f"model.path={model_dir}", *size, "model.dtype=float32", "model.device=cpu",
        f"prompt_file={prompts}", "iterations=1", "eval.per_prompt=1",
        "eval.num_steps=2", "eval_prompts=['a sign that says \"hello\"']", "run.log_with=none",
        f"run.output_dir={tmp_path / 'run'}",
        "run.progress=false", f"rewards={json.dumps(trained)}", f"heldout_rewards={json.dumps(heldout)}",
        *frames])
    summary = module.train(config)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "reward/unscored" in m or "advantage/kept_fraction" in m or "train/loss" in m)
    for field, spec in recipe_rewards(recipe):
        if field == "heldout_rewards":
            assert f"eval/heldout/{spec['name']}" in summary
    if first.get("advantage/kept_fraction", 0.0) > 0:  # a random model's images may carry no signal (OCR)
        # the recipe's group sizes, model-call chunks (max_batch) and minibatches as written: every
        # model call has the rollout's batch size, so before the first update each transition
        # re-scores exactly (bf16 included)
        assert first["train/on_policy_approx_kl"] == 0.0 and first["train/on_policy_clip_fraction"] == 0.0, first
        assert first["train/grad_norm"] > 0.0
    if raw.get("trainer") in ("reward_backprop", "dpo"):  # the gradient and preference recipes
        accumulated = raw.get("run", {}).get("gradient_accumulation_steps", 1) > 1  # no update in one iteration
        assert accumulated or first["train/grad_norm"] > 0.0, first
        assert first["train/loss"] == first["train/loss"]  # a finite loss, not NaN
    assert any((tmp_path / "run" / "lora").iterdir())
