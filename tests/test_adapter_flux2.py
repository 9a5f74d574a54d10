"""The FLUX.2 adapters ([dev] and [klein]) on tiny random pipelines: equivalence with the stock
pipelines' sampling loops and decoding, the latent normalisation, LoRA interop with the pipelines'
load_lora_weights, the reference policy and the attention dispatch."""

from __future__ import annotations

import pytest
import torch

try:
    from tests.tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                                   assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache)
    from tests.tiny_models_flux2 import BUILDERS, MAX_SEQUENCE_LENGTH
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                             assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache)
    from tiny_models_flux2 import BUILDERS, MAX_SEQUENCE_LENGTH

from pipelines.registry import load_adapter

SEQ = MAX_SEQUENCE_LENGTH
SIZE = {"height": 32, "width": 32}
PROMPTS = ["a photo of a cat", "a red car on a street at night"]
#: model key -> registry name
NAMES = {"flux2": "flux2", "flux2_klein": "flux2_klein", "flux2_klein_distilled": "flux2_klein"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("tiny_flux2"), BUILDERS)


@pytest.fixture
def load(saved_dirs):
    def _load(key: str):
        return load_quietly(NAMES[key], saved_dirs(key), max_sequence_length=SEQ)
    return _load


def _noise(adapter, batch=1, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), **SIZE)


def _call(adapter, x, steps, output_type="latent", **kwargs):
    return adapter.pipe(latents=_as_pipeline_latents(adapter, x), num_inference_steps=steps,
                        max_sequence_length=SEQ, output_type=output_type, **SIZE, **kwargs).images


def _as_pipeline_latents(adapter, x):
    """The pipelines take latents as the unpacked (B, 4C, H/16, W/16) patchified grid (H/4 with the
    tiny 2x VAE)."""
    multiple = 2 * adapter.vae_scale_factor
    rows, cols = SIZE["height"] // multiple, SIZE["width"] // multiple
    return x.clone().transpose(1, 2).reshape(x.shape[0], x.shape[2], rows, cols)


# --- interface ----------------------------------------------------------------------------------
def test_attributes_and_latent_shape(load):
    dev, klein, distilled = load("flux2"), load("flux2_klein"), load("flux2_klein_distilled")
    assert (dev.name, dev.guidance_kind, dev.tasks, dev.prediction_type) == ("flux2", "embedded", ("t2i", "edit"), "flow")
    assert (dev.default_steps, dev.default_guidance, dev.text_encoder_out_layers) == (50, 4.0, (10, 20, 30))
    assert (klein.guidance_kind, klein.default_steps, klein.default_guidance) == ("cfg", 50, 4.0)
    assert (distilled.guidance_kind, distilled.default_steps, distilled.default_guidance) == ("none", 4, 1.0)
    assert klein.text_encoder_out_layers == (9, 18, 27) and dev.text_encoder_names == ("text_encoder",)
    # the tiny VAE compresses 2x, so a token is 4 x 4 pixels (16 x 16 with the released 8x VAE)
    assert dev.default_height == dev.default_width == 128 * 2  # default_sample_size x the VAE's factor
    assert dev.latent_shape(**SIZE) == (64, 16) and dev.latent_shape(32, 64) == (128, 16)
    with pytest.raises(ValueError, match="multiples of 4"):
        dev.latent_shape(34, 32)
    # the packing is the pipeline's: pack(unpack(x)) == x
    x = _noise(dev, 2)
    assert torch.equal(dev.pipe._pack_latents(_as_pipeline_latents(dev, x)), x)


def test_text_encoder_layers_are_checked(saved_dirs):
    with pytest.raises(ValueError, match=r"text_encoder_out_layers \(10, 40\) .* 0\.\.30 of the 30-layer"):
        load_adapter("flux2", saved_dirs("flux2"), text_encoder_out_layers=(10, 40))
    adapter = load_adapter("flux2_klein", saved_dirs("flux2_klein"), max_sequence_length=SEQ,
                           text_encoder_out_layers=(1, 2, 3))
    ref, _ = adapter.pipe.encode_prompt(PROMPTS[:1], max_sequence_length=SEQ, text_encoder_out_layers=(1, 2, 3))
    assert torch.equal(adapter.encode(PROMPTS[:1], guidance_scale=1.0).tensors["prompt_embeds"], ref)


@pytest.mark.parametrize("key", ["flux2", "flux2_klein", "flux2_klein_distilled"])
def test_encode_and_predict(load, key):
    adapter = load(key)
    cond = adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=3.0)
    embeds = cond.tensors["prompt_embeds"]
    assert embeds.shape == (2, SEQ, 3 * 32)
    if key == "flux2_klein":  # real CFG: the negative branch has the positive's shape
        assert cond.uses_cfg and cond.guidance_scale == 3.0 and cond.negative["prompt_embeds"].shape == embeds.shape
    else:  # embedded guidance ([dev]) or none (distilled [klein]): one branch
        assert not cond.uses_cfg and cond.negative is None
        assert cond.extra.get("guidance") == (3.0 if key == "flux2" else None)
    if key == "flux2":  # the embedded guidance is an input of the transformer
        other = adapter.encode(PROMPTS, guidance_scale=1.5)
        torch.testing.assert_close(other.tensors["prompt_embeds"], embeds, atol=0, rtol=0)
    x, t = _noise(adapter, 2), adapter.schedule(4, latent_shape=adapter.latent_shape(**SIZE)).timesteps[1]
    rows = adapter.transformer_rows
    with torch.no_grad():
        out = adapter.predict(x, t, cond)
        again = adapter.predict(x, t, cond.select([1, 1]))
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert adapter.transformer_rows - rows == (4 if cond.uses_cfg else 2) + (4 if cond.uses_cfg else 2)
    torch.testing.assert_close(again[1], out[1], atol=1e-5, rtol=0)  # rows travel with their conditioning
    if key == "flux2":
        with torch.no_grad():
            assert not torch.allclose(adapter.predict(x, t, other), out, atol=1e-4)
    assert not torch.allclose(out[0], again[0], atol=1e-4), "the prompt must change the prediction"


# --- equivalence with the stock pipelines -------------------------------------------------------
@pytest.mark.parametrize("guidance", [None, 2.5])
def test_flux2_dev_matches_pipeline(load, guidance):
    adapter, steps = load("flux2"), 4
    x = _noise(adapter, 2, seed=4)
    scale = adapter.default_guidance if guidance is None else guidance
    ref = _call(adapter, x, steps, prompt=PROMPTS, guidance_scale=scale)
    schedule = adapter.schedule(steps, latent_shape=tuple(x.shape[1:]))
    torch.testing.assert_close(adapter.pipe.scheduler.sigmas, schedule.levels, atol=0, rtol=0)
    ours = euler(adapter, adapter.encode(PROMPTS, guidance_scale=guidance), x, schedule)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if guidance is None:  # decoding equals the pipeline's image output
        images = _call(adapter, x, steps, output_type="pt", prompt=PROMPTS, guidance_scale=scale)
        with torch.no_grad():
            decoded = adapter.decode(ours)
        assert decoded.shape == (2, 3, 32, 32)
        torch.testing.assert_close(decoded, images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
def test_flux2_klein_cfg_matches_pipeline(load, negative):
    """[klein] base: CFG against the empty prompt as the pipeline runs it, or against another
    negative prompt given to the pipeline as its negative_prompt_embeds. Its latent output is the
    VAE's (unpacked, de-normalised, unpatchified) latent."""
    adapter, steps, scale = load("flux2_klein"), 4, 3.0
    x = _noise(adapter, 2, seed=5)
    cond = adapter.encode(PROMPTS, negative_prompt=negative, guidance_scale=scale)
    kwargs = {"negative_prompt_embeds": cond.negative["prompt_embeds"]} if negative else {}
    ref = _call(adapter, x, steps, prompt=PROMPTS, guidance_scale=scale, **kwargs)
    schedule = adapter.schedule(steps, latent_shape=tuple(x.shape[1:]))
    torch.testing.assert_close(adapter.pipe.scheduler.sigmas, schedule.levels, atol=0, rtol=0)
    ours = euler(adapter, cond, x, schedule)
    with torch.no_grad():
        torch.testing.assert_close(adapter.to_vae_latents(ours), ref, atol=1e-5, rtol=0)
    if not negative:
        images = _call(adapter, x, steps, output_type="pt", prompt=PROMPTS, guidance_scale=scale)
        with torch.no_grad():
            torch.testing.assert_close(adapter.decode(ours), images, atol=1e-5, rtol=0)


def test_flux2_klein_distilled_matches_pipeline(load):
    """Step-distilled [klein]: no guidance at all (the pipeline ignores its guidance_scale)."""
    adapter = load("flux2_klein_distilled")
    steps = adapter.default_steps
    x = _noise(adapter, 1, seed=6)
    ref = _call(adapter, x, steps, prompt=PROMPTS[:1], guidance_scale=4.0)
    ours = euler(adapter, adapter.encode(PROMPTS[:1], guidance_scale=4.0), x,
                  adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    with torch.no_grad():
        torch.testing.assert_close(adapter.to_vae_latents(ours), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["flux2", "flux2_klein"])
def test_encode_images_inverts_the_latent_normalisation(load, key):
    """encode_images then decode equals the VAE's own round trip (mode, decode): the batch-norm
    normalisation, patchify and packing cancel exactly; non-square sizes keep their layout."""
    adapter = load(key)
    images = torch.rand(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = adapter.encode_images(images)
        assert latents.shape == (2, *adapter.latent_shape(32, 64))
        ours = adapter.decode(latents, height=32, width=64)
        raw = adapter.vae.encode(images * 2 - 1).latent_dist.mode()
        theirs = adapter.pipe.image_processor.postprocess(adapter.vae.decode(raw, return_dict=False)[0],
                                                          output_type="pt")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_decode_is_differentiable(load):
    adapter = load("flux2")
    x = _noise(adapter).requires_grad_(True)
    adapter.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --- LoRA, reference policy, attention backend --------------------------------------------------
@pytest.mark.parametrize("key", ["flux2", "flux2_klein"])
def test_lora_export_loads_in_the_stock_pipeline(load, saved_dirs, tmp_path, key):
    import diffusers

    adapter = load(key)
    cond = adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=3.0)
    x, t = _noise(adapter, 2, seed=7), torch.tensor(700.0)
    _, base, tuned = assert_lora_attaches_and_disables(adapter, x, t, cond)
    wrapped = {n.split(".attn.")[-1] for n, m in adapter.denoiser.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                       "to_qkv_mlp_proj"}
    export = adapter.export_lora(tmp_path / "lora")

    # a fresh stock pipeline loads the export with its own load_lora_weights; and the adapter's own load_lora
    pipe = getattr(diffusers, type(adapter).pipeline_class_name).from_pretrained(saved_dirs(key))
    pipe.load_lora_weights(str(export))
    assert_stock_pipeline_loads_the_lora(type(adapter)(pipe, max_sequence_length=SEQ), export, x, t, cond, tuned,
                                         base=base, preloaded=True, reloaded=load(key))


@pytest.mark.parametrize("key", ["flux2", "flux2_klein"])
def test_attention_backend_dispatch(load, key):
    adapter = load(key)
    cond = adapter.encode(PROMPTS, guidance_scale=3.0)
    assert_dispatched_backend_predicts_the_same(adapter, _noise(adapter, 2, seed=8), torch.tensor(600.0), cond)
