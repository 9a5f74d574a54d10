"""The exported LoRA loads into a fresh stock diffusers pipeline with ``load_lora_weights`` and
gives the same outputs as the trained adapter."""

import torch

from tests.tiny_models import build_sd, build_sd3


def _perturb_lora(module):
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def _check(adapter, pipe_cls, model_dir, tmp_path, component, t):
    adapter.add_lora(rank=4, alpha=8)
    _perturb_lora(adapter.denoiser)
    export = adapter.export_lora(tmp_path / "lora")
    cond = adapter.encode(["a red car"], guidance_scale=1.0)
    x = torch.randn(1, *adapter.latent_shape())
    with torch.no_grad():
        ours = adapter.predict(x, t, cond)
        with adapter.disable_adapter():
            base = adapter.predict(x, t, cond)
    assert not torch.allclose(ours, base, atol=1e-4)  # the LoRA matters

    fresh = pipe_cls.from_pretrained(model_dir, **({"text_encoder_3": None, "tokenizer_3": None}
                                                   if component == "transformer" else {"safety_checker": None}))
    fresh.load_lora_weights(str(export))
    adapter_type = type(adapter)
    reloaded = adapter_type(fresh)
    with torch.no_grad():
        theirs = reloaded.predict(x, t, cond)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


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
