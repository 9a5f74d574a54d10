"""Every online trainer runs an iteration on tiny random SD3, FLUX and Wan pipelines (real diffusers
models, tokenizers and schedulers) with CFG in the rollout: the first on-policy step re-scores its
transitions to a ratio of exactly 1, the LoRA gets a gradient, and the trained LoRA is exported."""

from __future__ import annotations

import json

import pytest

from align.config import load_config
from align.trainers import trainer_module
from pipelines.registry import load_adapter

try:
    from tests.tiny_models import build_flux, build_sd3, build_wan, model_dir_cache
except ImportError:  # tests/ on sys.path
    from tiny_models import build_flux, build_sd3, build_wan, model_dir_cache

pytestmark = pytest.mark.usefixtures("one_thread")

#: model -> (builder, size overrides, guidance)
MODELS = {
    "sd3": (build_sd3, ["model.height=32", "model.width=32"], 4.5),
    "flux": (build_flux, ["model.height=32", "model.width=32"], 3.5),
    "wan": (build_wan, ["model.height=32", "model.width=32", "model.num_frames=5"], 5.0),
}

TRAINERS = {
    "flow_grpo": ["group_size=4", "ppo.kl_beta=0.01"],
    "branch_grpo": ["rollout.split_steps=[0,2]", "trees_per_prompt=1", "ppo.kl_beta=0.01"],
    "dense_grpo": ["group_size=2"],
    "tempflow_grpo": ["group_size=1", "branches_per_step=2", "steps_per_iteration=2"],
    "diffusion_nft": ["group_size=4", "t_per_sample=1"],
}


@pytest.fixture(scope="module")
def pipeline_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("trainer_pipelines"), {name: spec[0] for name, spec in MODELS.items()})


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("model", sorted(MODELS))
def test_one_iteration_with_cfg_is_on_policy_and_exports_the_lora(model, trainer, pipeline_dirs, tmp_path):
    _, size, guidance = MODELS[model]
    module = trainer_module(trainer)
    config = load_config(module.CONFIG, None, [
        f"model.name={model}", "model.device=cpu", *size, "rewards=[jpeg_compressibility]", "iterations=1",
        "prompts=['a photo of a cat', 'a red car']", "prompts_per_iteration=2", "eval_prompts=['a red car']",
        "rollout.num_steps=4", f"rollout.guidance_scale={guidance}", "lora.rank=4", "lora.alpha=4",
        "eval.per_prompt=1", "eval.num_steps=2", "run.log_with=none", "run.resume=null", "run.progress=false",
        "run.checkpoint_every=0", f"run.output_dir={tmp_path}", *TRAINERS[trainer]])
    adapter = load_adapter(model, pipeline_dirs(model), max_sequence_length=16)
    adapter.pipe.set_progress_bar_config(disable=True)
    summary = module.train(config, adapter=adapter)
    assert summary["reward_before"] < 0  # minus kilobytes
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "train/loss" in m)
    if trainer != "diffusion_nft":  # the PPO trainers (NFT is likelihood-free)
        assert first["train/ratio_mean"] == 1.0 and first["train/clip_fraction"] == 0.0, first
    assert first["train/grad_norm"] > 0.0
    assert any((tmp_path / "lora").iterdir())


def test_gradient_checkpointing_gives_the_same_update(pipeline_dirs, tmp_path):
    """run.gradient_checkpointing recomputes the transformer's activations in backward: the trained
    LoRA equals the one trained without it; a model that cannot checkpoint is a config error."""
    import torch

    from align.config import ConfigError

    def trained_lora(label, *extra):
        module = trainer_module("flow_grpo")
        config = load_config(module.CONFIG, None, [
            "model.name=sd3", "model.device=cpu", *MODELS["sd3"][1], "rewards=[jpeg_compressibility]",
            "iterations=1", "prompts=['a photo of a cat']", "prompts_per_iteration=1", "group_size=4",
            "eval_prompts=['a red car']", "rollout.num_steps=4", "rollout.guidance_scale=4.5", "lora.rank=4",
            "lora.alpha=4", "optim.lr=0.01", "eval.per_prompt=1", "eval.num_steps=2", "run.log_with=none",
            "run.resume=null", "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp_path / label}",
            *extra])
        adapter = load_adapter("sd3", pipeline_dirs("sd3"), max_sequence_length=16)
        module.train(config, adapter=adapter)
        assert adapter.base_denoiser.gradient_checkpointing == ("run.gradient_checkpointing=true" in extra)
        return {n: p.detach().clone() for n, p in adapter.base_denoiser.named_parameters() if "lora" in n}

    plain = trained_lora("plain")
    checkpointed = trained_lora("checkpointed", "run.gradient_checkpointing=true")
    assert plain.keys() == checkpointed.keys()
    assert any(p.abs().sum() > 0 for n, p in plain.items() if "lora_B" in n)  # the update happened
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-6)

    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, ["model.name=toy", "run.gradient_checkpointing=true", "run.resume=null",
                                               "run.log_with=none", f"run.output_dir={tmp_path / 'toy'}"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        module.train(config)
