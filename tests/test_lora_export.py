"""The exported LoRA loads into a fresh stock diffusers pipeline with ``load_lora_weights`` and
gives the same outputs as the trained adapter."""

import pytest
import torch

from tests.tiny_models import (assert_lora_attaches_and_disables, assert_stock_pipeline_loads_the_lora, build_sd,
                               build_sd3, perturb_lora)


def _check(adapter, pipe_cls, model_dir, tmp_path, component, t):
    cond = adapter.encode(["a red car"], guidance_scale=1.0)
    x = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    _, base, ours = assert_lora_attaches_and_disables(adapter, x, t, cond)
    export = adapter.export_lora(tmp_path / "lora")

    fresh = pipe_cls.from_pretrained(model_dir, **({"text_encoder_3": None, "tokenizer_3": None}
                                                   if component == "transformer" else {"safety_checker": None}))
    fresh.load_lora_weights(str(export))
    assert_stock_pipeline_loads_the_lora(type(adapter)(fresh), export, x, t, cond, ours, base=base, preloaded=True)


def test_sd3_lora_export_loads_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from pipelines.sd3 import SD3Adapter

    model_dir = build_sd3(tmp_path / "sd3")
    _check(SD3Adapter.from_pretrained(str(model_dir)), StableDiffusion3Pipeline, model_dir, tmp_path,
           "transformer", torch.tensor(700.0))


def test_sd_unet_lora_export_loads_in_stock_diffusers(tmp_path):
    from diffusers import StableDiffusionPipeline

    from pipelines.sd_unet import SDAdapter

    model_dir = build_sd(tmp_path / "sd")
    _check(SDAdapter.from_pretrained(str(model_dir)), StableDiffusionPipeline, model_dir, tmp_path, "unet",
           torch.tensor(500))


def test_sd3_adapter_load_lora_reproduces_the_trained_outputs(tmp_path):
    from pipelines.sd3 import SD3Adapter

    model_dir = build_sd3(tmp_path / "sd3")
    trained = SD3Adapter.from_pretrained(str(model_dir))
    trained.add_lora(rank=4, alpha=8)
    perturb_lora(trained.denoiser)
    export = trained.export_lora(tmp_path / "lora")
    reloaded = SD3Adapter.from_pretrained(str(model_dir))
    reloaded.load_lora(export)
    cond = trained.encode(["a red car"], guidance_scale=1.0)
    x = torch.randn(1, *trained.latent_shape())
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(x, torch.tensor(700.0), cond),
                                   trained.predict(x, torch.tensor(700.0), cond), rtol=1e-5, atol=1e-5)


def test_align_sample_with_a_trained_toy_lora(tmp_path, capsys):
    """Train the toy model briefly, then ``align sample --lora run/lora`` draws what the trained
    model draws (same seed: identical images to the trainer's adapter) and not the base model's."""
    import numpy as np
    from PIL import Image

    from align.commands.cli import main
    from align.config import load_config
    from align.commands.sample import SampleConfig, generate
    from align.trainers import trainer_module
    from pipelines.toy import load_toy_adapter

    torch.set_num_threads(1)
    module = trainer_module("flow_grpo")
    run_dir = tmp_path / "run"
    config = load_config(module.CONFIG, None, [
        "model.name=toy", "iterations=2", "prompts_per_iteration=2", "group_size=4", "rollout.num_steps=4",
        "optim.lr=0.05", "lora.rank=4", "lora.alpha=4", "eval.per_prompt=1", "eval_prompts=['a red digit 3']",
        "run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0",
        f"run.output_dir={run_dir}"])
    trained = load_toy_adapter()
    module.train(config, adapter=trained)

    out = tmp_path / "samples"
    assert main(["sample", "--model", "toy", "--lora", str(run_dir / "lora"), "--prompt", "a red digit 3",
                 "--num", "2", "--steps", "4", "--out", str(out)]) == 0
    sample_config = load_config(SampleConfig, None, ["model.name=toy", "num_per_prompt=2", "rollout.num_steps=4"])
    sample_config.prompts = ["a red digit 3"]
    expected, _, _ = generate(trained, sample_config)
    base, _, _ = generate(load_toy_adapter(), sample_config)
    got = np.asarray(Image.open(sorted(out.glob("0*.png"))[0])).astype(np.float32) / 255
    want = expected[0].permute(1, 2, 0).numpy()
    assert np.abs(got - want).max() <= 1 / 255 + 1e-6  # PNG rounding only
    assert not torch.allclose(expected, base, atol=1e-3)  # the LoRA matters


def _exported_loras(make_adapter, tmp_path, seeds=(3, 4)):
    """Two LoRAs of one base (different random lora_B), exported; returns their folders and the
    outputs each gives on (x, t, cond)."""
    folders = []
    for seed in seeds:
        adapter = make_adapter()
        adapter.add_lora(rank=4, alpha=8)
        perturb_lora(adapter.denoiser, seed)
        folders.append(adapter.export_lora(tmp_path / f"lora{seed}"))
    return folders


def _named_loras_switch(make_adapter, tmp_path, t):
    """Load two LoRAs by name on one base: each name gives exactly what that LoRA alone gives, None
    the base model; an unknown name is a one-line error listing the loaded ones."""
    from align.config import ConfigError

    first, second = _exported_loras(make_adapter, tmp_path)
    adapter = make_adapter()
    cond = adapter.encode(["a red car"], guidance_scale=1.0)
    x = torch.randn(1, *adapter.latent_shape(), generator=torch.Generator().manual_seed(0))
    alone = {}
    with torch.no_grad():
        base = adapter.predict(x, t, cond)
        for label, folder in (("a", first), ("b", second)):
            single = make_adapter()
            single.load_lora(folder)
            alone[label] = single.predict(x, t, cond)
        adapter.load_lora(first, name="a")
        adapter.load_lora(second, name="b")
        assert sorted(adapter.lora_names()) == ["a", "b"]
        assert torch.equal(adapter.predict(x, t, cond), alone["b"])  # the last one loaded is active
        adapter.use_lora("a")
        torch.testing.assert_close(adapter.predict(x, t, cond), alone["a"], rtol=1e-5, atol=1e-6)
        adapter.use_lora(None)
        torch.testing.assert_close(adapter.predict(x, t, cond), base, rtol=1e-5, atol=1e-6)
        adapter.use_lora("b")
        torch.testing.assert_close(adapter.predict(x, t, cond), alone["b"], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(alone["a"], alone["b"], atol=1e-4)
    with pytest.raises(ConfigError, match="valid: a, b"):
        adapter.use_lora("c")
    return adapter


def test_named_loras_switch_on_the_toy_model(tmp_path):
    from pipelines.toy import TOY_WEIGHTS_DIR, load_toy_adapter

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    adapter = _named_loras_switch(load_toy_adapter, tmp_path, 500.0)
    assert sorted(adapter.lora_names()) == ["a", "b"]


def test_named_loras_switch_on_sd3(tmp_path):
    from pipelines.sd3 import SD3Adapter

    model_dir = build_sd3(tmp_path / "sd3")
    adapter = _named_loras_switch(lambda: SD3Adapter.from_pretrained(str(model_dir)), tmp_path, 500.0)
    assert sorted(adapter.lora_names()) == ["a", "b"]


def test_toy_encode_images_is_the_exact_inverse_of_decode():
    from pipelines.toy import TOY_WEIGHTS_DIR, load_toy_adapter

    if not (TOY_WEIGHTS_DIR / "config.json").exists():
        pytest.skip("toy model weights not built")
    adapter = load_toy_adapter()
    images = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(adapter.decode(adapter.encode_images(images)), images)
