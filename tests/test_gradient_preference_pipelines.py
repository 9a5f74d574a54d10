"""The gradient and preference trainers run an iteration on tiny random SD 1.x (epsilon and v
prediction), SD3 and Wan pipelines (real diffusers models, tokenizers, schedulers and VAEs): the
LoRA gets a gradient and is exported; on SD and SD3 stock diffusers loads the export."""

from __future__ import annotations

import json

import pytest

from align.config import load_config
from align.trainers import trainer_module
from pipelines.registry import load_adapter

try:
    from tests.tiny_models import build_sd, build_sd3, build_wan, model_dir_cache
except ImportError:  # tests/ on sys.path
    from tiny_models import build_sd, build_sd3, build_wan, model_dir_cache

pytestmark = pytest.mark.usefixtures("one_thread")

#: model -> (builder, adapter name, size overrides, guidance, stochastic kernel)
MODELS = {
    "sd-eps": (lambda d: build_sd(d), "sd", ["model.height=32", "model.width=32"], 5.0, "ddim"),
    "sd-v": (lambda d: build_sd(d, prediction_type="v_prediction"), "sd", ["model.height=32", "model.width=32"],
             5.0, "ddim"),
    "sd3": (build_sd3, "sd3", ["model.height=32", "model.width=32"], 4.5, "flow_grpo"),
    "wan": (build_wan, "wan", ["model.height=32", "model.width=32", "model.num_frames=5"], 5.0, "flow_grpo"),
}

#: trainer (or preset-like variant) -> its overrides; the digit classifier is a differentiable reward
TRAINERS = {
    "reward_backprop": ["trainer=reward_backprop", "mode=draft", "truncation_steps=2", "rollout.kernel=ode",
                        "group_size=1", "regularizer_weight=0.1", "regularizer_samples=2"],
    "alignprop": ["trainer=reward_backprop", "mode=alignprop", "cut_distribution=uniform", "rollout.kernel=ode",
                  "group_size=1"],
    "draft_lv": ["trainer=reward_backprop", "mode=draft_lv", "rollout.kernel=ode", "group_size=1"],
    "refl": ["trainer=reward_backprop", "mode=refl", "rollout.kernel=ode", "group_size=1"],
    "dpo": ["trainer=dpo", "group_size=3", "rollout.kernel=ode"],
    "d3po": ["trainer=d3po", "STOCHASTIC"],
    "prdp": ["trainer=prdp", "STOCHASTIC"],
    "b2_diffurl": ["trainer=b2_diffurl", "STOCHASTIC", "branch_factor=2", "keep_threshold=0"],
    "raft": ["trainer=raft", "group_size=2", "rollout.kernel=ode"],
    "flow_rwr": ["trainer=raft", "weighting=rwr", "group_size=2", "rollout.kernel=ode"],
}


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("gradient_pipelines"), {name: spec[0] for name, spec in MODELS.items()})


@pytest.mark.parametrize("method", sorted(TRAINERS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_iteration_trains_the_lora_and_exports_it(model, method, pipeline_dirs, tmp_path):
    _, adapter_name, size, guidance, kernel = MODELS[model]
    overrides = [("rollout.kernel=" + kernel) if o == "STOCHASTIC" else o for o in TRAINERS[method]]
    if kernel == "ddim" and "rollout.kernel=ddim" in overrides:
        overrides.append("rollout.kernel_params={eta: 1.0}")
    trainer = next(o.split("=", 1)[1] for o in overrides if o.startswith("trainer="))
    module = trainer_module(trainer)
    config = load_config(module.CONFIG, None, [
        f"model.name={adapter_name}", "model.device=cpu", *size, "rewards=[digit]", "iterations=1",
        "prompts=['a red digit 3', 'a blue digit 5']", "prompts_per_iteration=2", "eval_prompts=['a red digit 3']",
        "rollout.num_steps=4", f"rollout.guidance_scale={guidance}", "lora.rank=4", "lora.alpha=4",
        "eval.per_prompt=1", "eval.num_steps=2", "eval.kernel=ode", "run.log_with=none", "run.resume=null",
        "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp_path}", *overrides])
    adapter = load_adapter(adapter_name, pipeline_dirs(model), **({} if adapter_name == "sd" else
                                                                   {"max_sequence_length": 16}))
    adapter.pipe.set_progress_bar_config(disable=True)
    module.train(config, adapter=adapter)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "train/loss" in m)
    assert first["train/grad_norm"] > 0.0, first
    export = tmp_path / "lora"
    assert any(export.iterdir())
    if adapter_name in ("sd", "sd3"):  # stock diffusers loads the exported LoRA
        import diffusers

        pipe_class = diffusers.StableDiffusionPipeline if adapter_name == "sd" else diffusers.StableDiffusion3Pipeline
        extra = {"safety_checker": None} if adapter_name == "sd" else {"text_encoder_3": None, "tokenizer_3": None}
        fresh = pipe_class.from_pretrained(pipeline_dirs(model), **extra)
        fresh.load_lora_weights(str(export))
        denoiser = fresh.unet if adapter_name == "sd" else fresh.transformer
        assert any("lora" in name for name, _ in denoiser.named_parameters())
