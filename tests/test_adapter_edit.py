"""The editing adapters on tiny random pipelines: FLUX.1 Kontext (``flux_kontext``), FLUX.2's
reference images (``flux2``) and Qwen-Image-Edit / Edit Plus (``qwen_image_edit``). Each samples what
its stock diffusers pipeline samples from the same source image (to 1e-5), the source travels with
its rows through row selections (groups, trees, re-scoring), and the trained LoRA loads in the stock
edit pipeline."""

from __future__ import annotations

import pytest
import torch

try:
    from tests.tiny_models import (assert_lora_attaches_and_disables, assert_stock_pipeline_loads_the_lora, build_flux,
                                   euler, load_quietly, model_dir_cache)
    from tests.tiny_models_flux2 import build_flux2, build_flux2_klein
    from tests.tiny_models_qwen_image import build_qwen_image_edit
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_lora_attaches_and_disables, assert_stock_pipeline_loads_the_lora, build_flux, euler,
                             load_quietly, model_dir_cache)
    from tiny_models_flux2 import build_flux2, build_flux2_klein
    from tiny_models_qwen_image import build_qwen_image_edit

from pipelines.base import Prompt

SEQ = 16
PROMPTS = ["make the cat blue", "remove the car"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _sources(size=(32, 32), seed=0):
    """Two different RGB source images (PIL) of ``size`` (height, width)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(2)]


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("tiny_edit"), {
        "flux_kontext": lambda d: build_flux(d, kontext=True), "flux2": build_flux2, "flux2_klein": build_flux2_klein,
        "qwen_image_edit": build_qwen_image_edit, "qwen_image_edit_plus": lambda d: build_qwen_image_edit(d, plus=True)})


# --- FLUX.1 Kontext -------------------------------------------------------------------------------
@pytest.fixture
def kontext(saved_dirs):
    adapter = load_quietly("flux_kontext", saved_dirs("flux_kontext"), max_sequence_length=SEQ, auto_resize=False)
    adapter.default_height = adapter.default_width = 32  # model.height / model.width
    return adapter


def _kontext_noise(adapter, batch=1, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), height=32, width=32)


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_kontext_matches_pipeline(kontext, true_cfg):
    """The adapter's Euler loop over its schedule, with the source's tokens beside the latents, is the
    stock FluxKontextPipeline's sampling from the same source, with and without true CFG; decoding is
    the pipeline's image output."""
    steps, source = 4, _sources()[0]
    x = _kontext_noise(kontext, seed=4)
    kwargs = {"negative_prompt": "blurry", "true_cfg_scale": true_cfg} if true_cfg != 1.0 else {}
    common = dict(prompt=PROMPTS[:1], image=source, latents=x.clone(), height=32, width=32, max_area=32 * 32,
                  _auto_resize=False, num_inference_steps=steps, guidance_scale=2.5, max_sequence_length=SEQ, **kwargs)
    ref = kontext.pipe(output_type="latent", **common).images
    cond = kontext.encode([Prompt(PROMPTS[0], source)], negative_prompt="blurry", guidance_scale=2.5,
                          true_cfg_scale=true_cfg)
    assert cond.tensors["image_latents"].shape == (1, 64, 16) and cond.extra["image_ids"][:, 0].eq(1).all()
    ours = euler(kontext, cond, x, kontext.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    images = kontext.pipe(output_type="pt", **common).images
    with torch.no_grad():
        torch.testing.assert_close(kontext.decode(ours), images, atol=1e-5, rtol=0)


def test_kontext_source_follows_its_rows_and_matters(kontext):
    """Each row predicts from its own source: selecting rows (as groups and trees do) selects their
    sources, and another source changes the prediction; without images the adapter is text-to-image."""
    sources = _sources()
    cond = kontext.encode([Prompt(p, s) for p, s in zip(PROMPTS, sources)], guidance_scale=2.5)
    x, t = _kontext_noise(kontext, 2, seed=5), torch.tensor(600.0)
    with torch.no_grad():
        both = kontext.predict(x, t, cond)
        swapped = kontext.predict(x.flip(0), t, cond.select([1, 0]))
        other = kontext.predict(x, t, kontext.encode(PROMPTS, guidance_scale=2.5, images=sources[::-1]))
        plain = kontext.predict(x, t, kontext.encode(PROMPTS, guidance_scale=2.5))
    torch.testing.assert_close(swapped, both.flip(0), atol=1e-6, rtol=0)
    assert not torch.allclose(other, both, atol=1e-4), "the source image must matter"
    assert not torch.allclose(plain, both, atol=1e-4)
    assert plain.shape == both.shape


def test_kontext_source_size_rule(kontext):
    """The source is resized as the pipeline resizes it: its own size rounded down to a multiple of
    16 px (4 with the tiny 2x VAE), or (auto_resize, the pipeline's default) the preferred Kontext
    resolution of its aspect."""
    from PIL import Image

    assert kontext.source_size(Image.new("RGB", (50, 37))) == (36, 48)
    kontext.auto_resize = True
    assert kontext.source_size(Image.new("RGB", (64, 64))) == (1024, 1024)
    assert kontext.source_size(Image.new("RGB", (1600, 672))) == (672, 1568)


def test_kontext_lora_export_loads_in_the_stock_pipeline(kontext, saved_dirs, tmp_path):
    from diffusers import FluxKontextPipeline

    from pipelines.flux_kontext import FluxKontextAdapter

    cond = kontext.encode(PROMPTS, guidance_scale=2.5, images=_sources())
    x, t = _kontext_noise(kontext, 2, seed=7), torch.tensor(700.0)
    _, base, tuned = assert_lora_attaches_and_disables(kontext, x, t, cond)
    export = kontext.export_lora(tmp_path / "lora")
    pipe = FluxKontextPipeline.from_pretrained(saved_dirs("flux_kontext"))
    stock = FluxKontextAdapter(pipe, max_sequence_length=SEQ, auto_resize=False)
    stock.default_height = stock.default_width = 32
    assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, tuned, base=base)


# --- FLUX.2 reference images ----------------------------------------------------------------------
FLUX2_SIZE = {"height": 32, "width": 32}


def _flux2(saved_dirs, key):
    adapter = load_quietly(key, saved_dirs(key), max_sequence_length=SEQ)
    adapter.default_height = adapter.default_width = 32
    return adapter


def _references():
    """Two references of different sizes (FLUX.2's pipeline takes images of at least 64 px a side)."""
    return [_sources((64, 64), seed=1)[0], _sources((64, 96), seed=2)[0]]


@pytest.mark.parametrize("key", ["flux2", "flux2_klein"])
def test_flux2_references_match_pipeline(saved_dirs, key):
    """FLUX.2 [dev] (embedded guidance) and [klein] (real CFG, the negative branch seeing the
    references too) with two reference images: the adapter's loop is the stock pipeline's."""
    adapter, steps = _flux2(saved_dirs, key), 3
    x = adapter.initial_noise(1, torch.Generator().manual_seed(3), **FLUX2_SIZE)
    grid = x.clone().transpose(1, 2).reshape(1, x.shape[2], 8, 8)  # the pipelines take the unpacked grid
    references = _references()
    ref = adapter.pipe(prompt=PROMPTS[:1], image=references, latents=grid, num_inference_steps=steps,
                       guidance_scale=4.0, max_sequence_length=SEQ, output_type="latent", **FLUX2_SIZE).images
    cond = adapter.encode([Prompt(PROMPTS[0], references)], guidance_scale=4.0)
    assert cond.uses_cfg == (key == "flux2_klein")
    # 64 x 64 and 64 x 96 pixels at the tiny 2x VAE: 16 x 16 and 16 x 24 tokens, times 10 and 20
    assert cond.tensors["reference_latents"].shape == (1, 256 + 384, 16)
    assert cond.extra["reference_ids"][:, 0].unique().tolist() == [10, 20]
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    with torch.no_grad():  # [dev] returns the packed latents, [klein] the VAE's
        torch.testing.assert_close(ours if key == "flux2" else adapter.to_vae_latents(ours), ref, atol=1e-5, rtol=0)


def test_flux2_references_follow_their_rows_and_lora_loads_in_the_pipeline(saved_dirs, tmp_path):
    """Rows with different references: selecting rows selects their references (the prediction
    depends on them), and the trained LoRA loads in the stock Flux2Pipeline."""
    from diffusers import Flux2Pipeline

    from pipelines.flux2 import Flux2Adapter

    adapter = _flux2(saved_dirs, "flux2")
    references = [_sources((64, 64), seed=1)[0], _sources((64, 64), seed=2)[0]]
    cond = adapter.encode(PROMPTS, guidance_scale=4.0, images=references)
    x, t = adapter.initial_noise(2, torch.Generator().manual_seed(4), **FLUX2_SIZE), torch.tensor(600.0)
    with torch.no_grad():
        both = adapter.predict(x, t, cond)
        swapped = adapter.predict(x.flip(0), t, cond.select([1, 0]))
        other = adapter.predict(x, t, adapter.encode(PROMPTS, guidance_scale=4.0, images=references[::-1]))
    torch.testing.assert_close(swapped, both.flip(0), atol=1e-6, rtol=0)
    assert not torch.allclose(other, both, atol=1e-4), "the reference images must matter"
    with pytest.raises(ValueError, match="same sizes"):
        adapter.encode(PROMPTS, images=[references[0], _sources((64, 96))[0]])

    _, base, tuned = assert_lora_attaches_and_disables(adapter, x, t, cond)
    export = adapter.export_lora(tmp_path / "lora")
    stock = Flux2Adapter(Flux2Pipeline.from_pretrained(saved_dirs("flux2")), max_sequence_length=SEQ)
    stock.default_height = stock.default_width = 32
    assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, tuned, base=base)


# --- Qwen-Image-Edit and Edit Plus -----------------------------------------------------------------
#: the tiny stand-ins see sources at 64^2 pixels through the VAE (the pipelines' 1024^2) and at 32^2
#: through the text encoder (Plus; its 384^2)
VAE_AREA, CONDITION_AREA = 64 * 64, 32 * 32


@pytest.fixture
def small_qwen_areas(monkeypatch):
    """The pipelines' source areas scaled down for the tiny models, the same on both sides."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus

    original = pipeline_qwenimage_edit.calculate_dimensions
    monkeypatch.setattr(pipeline_qwenimage_edit, "calculate_dimensions",
                        lambda area, ratio: original(VAE_AREA if area == 1024 * 1024 else area, ratio))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", VAE_AREA)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", CONDITION_AREA)


def _qwen_edit(saved_dirs, key):
    adapter = load_quietly("qwen_image_edit", saved_dirs(key), max_sequence_length=SEQ * 8)
    adapter.default_height = adapter.default_width = 32
    adapter.vae_image_area, adapter.condition_image_area = VAE_AREA, CONDITION_AREA
    return adapter


@pytest.mark.parametrize("key", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_qwen_image_edit_matches_pipeline(saved_dirs, small_qwen_areas, key):
    """Edit (one source, seen by the text encoder in the template) and Plus (two sources, "Picture 1:
    ... Picture 2: ..."): true CFG with the norm rescale, the sources' latents beside the noisy
    tokens; the adapter's loop is the stock pipeline's."""
    adapter, steps = _qwen_edit(saved_dirs, key), 3
    assert adapter.plus == (key == "qwen_image_edit_plus") and adapter.tasks == ("edit",)
    x = adapter.initial_noise(1, torch.Generator().manual_seed(2), height=32, width=32)
    sources = [_sources((32, 64), seed=3)[0]] + ([_sources((64, 64), seed=4)[0]] if adapter.plus else [])
    image = sources if adapter.plus else sources[0]
    ref = adapter.pipe(prompt=PROMPTS[:1], negative_prompt="blurry", image=image, latents=x.clone(), height=32,
                       width=32, num_inference_steps=steps, true_cfg_scale=4.0, max_sequence_length=SEQ * 8,
                       output_type="latent").images
    cond = adapter.encode([Prompt(PROMPTS[0], image)], negative_prompt="blurry", guidance_scale=4.0)
    assert cond.uses_cfg and torch.equal(cond.tensors["image_latents"], cond.negative["image_latents"])
    # at 64^2 pixels, a 32 x 64 source is 32 x 96 (sides rounded to 32), 4 x 12 tokens at the tiny 4x VAE
    assert cond.extra["source_grids"] == [(1, 4, 12), (1, 8, 8)][:len(sources)]
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    images = adapter.pipe(prompt=PROMPTS[:1], negative_prompt="blurry", image=image, latents=x.clone(), height=32,
                          width=32, num_inference_steps=steps, true_cfg_scale=4.0, max_sequence_length=SEQ * 8,
                          output_type="pt").images
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(ours), images, atol=1e-5, rtol=0)


def test_qwen_image_edit_rows_and_lora(saved_dirs, small_qwen_areas, tmp_path):
    """The source enters the text embedding and the image tokens of its own row: selecting rows
    selects both, another source changes the prediction; the LoRA loads in the stock pipeline."""
    from diffusers import QwenImageEditPipeline

    from pipelines.qwen_image_edit import QwenImageEditAdapter

    adapter = _qwen_edit(saved_dirs, "qwen_image_edit")
    sources = _sources((64, 64), seed=5)
    cond = adapter.encode(PROMPTS, negative_prompt=" ", guidance_scale=4.0, images=sources)
    x, t = adapter.initial_noise(2, torch.Generator().manual_seed(6), height=32, width=32), torch.tensor(500.0)
    with torch.no_grad():
        both = adapter.predict(x, t, cond)
        swapped = adapter.predict(x.flip(0), t, cond.select([1, 0]))
        other = adapter.predict(x, t, adapter.encode(PROMPTS, negative_prompt=" ", guidance_scale=4.0,
                                                     images=sources[::-1]))
    torch.testing.assert_close(swapped, both.flip(0), atol=1e-6, rtol=0)
    assert not torch.allclose(other, both, atol=1e-4), "the source image must matter"
    with pytest.raises(ValueError, match="source image"):
        adapter.encode(PROMPTS)
    with pytest.raises(ValueError, match="one source image a prompt"):
        adapter.encode(PROMPTS[:1], images=[sources])

    _, base, tuned = assert_lora_attaches_and_disables(adapter, x, t, cond)
    export = adapter.export_lora(tmp_path / "lora")
    stock = QwenImageEditAdapter(QwenImageEditPipeline.from_pretrained(saved_dirs("qwen_image_edit")),
                                 max_sequence_length=SEQ * 8)
    stock.default_height = stock.default_width = 32
    assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, tuned, base=base)
