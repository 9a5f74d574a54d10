"""The Z-Image adapter on tiny random pipelines (base with CFG, distilled Turbo): sampling and decoding
equal ``ZImagePipeline``'s own, the padded per-row caption features keep exactness, LoRA exports load
in the stock pipeline, the reference policy and attention backends."""

from __future__ import annotations

from functools import partial

import pytest
import torch

try:
    from tests.tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                                   assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache)
    from tests.tiny_models_z_image import build_z_image
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                             assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache)
    from tiny_models_z_image import build_z_image

from pipelines.z_image import ZImageAdapter, is_turbo_name

SEQ = 64  # Qwen3 tokens per prompt (chat template included) in these tests
SIZE = {"height": 32, "width": 32}
PROMPTS = ["a photo of a cat", "a red car on a street at night"]
NEGATIVES = ["blurry", "low quality, ugly drawing"]
#: variant -> its builder; the folder (named after the variant) tells the adapter which variant it is
VARIANTS = {"base": build_z_image, "turbo": partial(build_z_image, distilled=True)}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("tiny_z_image"), VARIANTS)


@pytest.fixture
def load(saved_dirs):
    def _load(variant: str, **kwargs) -> ZImageAdapter:
        return load_quietly("z_image", saved_dirs(variant), max_sequence_length=SEQ, **kwargs)
    return _load


def _noise(adapter, batch=2, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), **SIZE)


def _pipeline(adapter, x, steps, pipeline_scale, output_type="latent", **kwargs):
    # the pipeline writes the chat-templated prompts into the lists it is given: pass copies
    return adapter.pipe(prompt=list(PROMPTS), negative_prompt=list(NEGATIVES), latents=x.clone(), **SIZE,
                        num_inference_steps=steps, guidance_scale=pipeline_scale, max_sequence_length=SEQ,
                        output_type=output_type, **kwargs).images


# --- variants -------------------------------------------------------------------------------------
def test_variant_defaults_follow_the_checkpoint(load):
    base, turbo = load("base"), load("turbo")
    assert (base.distilled, base.guidance_kind, base.default_steps, base.default_guidance) == (False, "cfg", 50, 5.0)
    assert (turbo.distilled, turbo.guidance_kind, turbo.default_steps, turbo.default_guidance) == (True, "none", 9, 1.0)
    assert ZImageAdapter.guidance_kind == "none" and ZImageAdapter.default_steps == 9  # the registry's default: Turbo
    assert base.text_encoder_names == ("text_encoder",) and base.tasks == ("t2i",)
    assert base.encode(PROMPTS).uses_cfg and not turbo.encode(PROMPTS).uses_cfg
    assert load("base", distilled=True).guidance_kind == "none"  # the kwarg overrides the name
    assert load("turbo", distilled=False).default_steps == 50
    for name in ("Tongyi-MAI/Z-Image-Turbo", "/cache/models--Tongyi-MAI--Z-Image-Turbo/snapshots/0123abcd"):
        assert is_turbo_name(name)
    for name in ("Tongyi-MAI/Z-Image", "/cache/models--Tongyi-MAI--Z-Image/snapshots/0123abcd", None):
        assert not is_turbo_name(name)


def test_unsupported_options_are_one_line_errors(load, saved_dirs):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(saved_dirs("base"))
    with pytest.raises(ValueError, match="cfg_truncation=0.5") as err:
        ZImageAdapter(pipe, cfg_truncation=0.5)
    assert "\n" not in str(err.value)
    adapter = load("base")
    with pytest.raises(ValueError, match="guidance_scale 0 < 1") as err:
        adapter.encode(PROMPTS, guidance_scale=0.0)  # the pipeline's "0" is g = 1 here
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(30, 32)
    assert adapter.latent_shape(**SIZE) == (16, 16, 16)


# --- equivalence with ZImagePipeline ---------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "turbo"])
def test_sampling_and_decoding_match_the_pipeline(load, variant):
    """The model card's settings: the base model 50 steps with CFG against a negative prompt (pipeline
    guidance 4 = g 5, a dynamic shift), Turbo 9 steps without CFG (pipeline guidance 0 = g 1)."""
    adapter = load(variant)
    steps, scale = adapter.default_steps, adapter.default_guidance
    x = _noise(adapter, seed=3)
    ref = _pipeline(adapter, x, steps, scale - 1.0)
    cond = adapter.encode(PROMPTS, negative_prompt=NEGATIVES)
    assert cond.uses_cfg == (variant == "base")
    schedule = adapter.schedule(steps, latent_shape=tuple(x.shape[1:]))
    ours = euler(adapter, cond, x, schedule)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # the schedule is the one the pipeline's scheduler ran
    torch.testing.assert_close(schedule.timesteps, adapter.pipe.scheduler.timesteps.float(), atol=0, rtol=0)
    torch.testing.assert_close(schedule.levels, adapter.pipe.scheduler.sigmas.float(), atol=0, rtol=0)
    images = _pipeline(adapter, x, steps, scale - 1.0, output_type="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(ours), images, atol=1e-5, rtol=0)


def test_cfg_normalization_matches_the_pipeline(load, saved_dirs):
    """``cfg_normalization`` k caps each guided prediction's norm at k times the conditional one's."""
    adapter = load("base")
    capped = ZImageAdapter(adapter.pipe, max_sequence_length=SEQ, cfg_normalization=1.0)
    x, steps = _noise(adapter, seed=4), 4
    ref = _pipeline(adapter, x, steps, 3.0, cfg_normalization=1.0)
    cond = capped.encode(PROMPTS, negative_prompt=NEGATIVES, guidance_scale=4.0)
    schedule = capped.schedule(steps, latent_shape=tuple(x.shape[1:]))
    ours = euler(capped, cond, x, schedule)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert not torch.allclose(ours, euler(adapter, cond, x, schedule), atol=1e-3)  # the cap acted


# --- conditioning ----------------------------------------------------------------------------------
def test_padded_caption_rows_keep_exactness(load):
    """Prompts of different token counts share one padded length with a per-row mask; a row predicts
    what the prompt predicts encoded alone (its own length), rows follow select, and CFG is the
    pipeline's c + s (c - u) with s = g - 1."""
    adapter = load("base")
    prompts = ["a cat", "a beautiful red car on a wet street at night in the rain", "a small white dog"]
    cond = adapter.encode(prompts, negative_prompt="blurry", guidance_scale=4.0)
    embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
    assert embeds.shape[:2] == mask.shape and mask.dtype == torch.bool and embeds.shape[0] == 3
    assert all(cond.negative[k].shape == v.shape for k, v in cond.tensors.items())
    lengths = mask.sum(1)
    assert len(set(lengths.tolist())) == 3 and lengths.max() == mask.shape[1]
    assert torch.count_nonzero(embeds[~mask]) == 0

    x = _noise(adapter, batch=3, seed=5)
    t = adapter.schedule(4, latent_shape=tuple(x.shape[1:])).timesteps[1]
    with torch.no_grad():
        batch = adapter.predict(x, t, cond)
        for i, prompt in enumerate(prompts):
            alone = adapter.encode([prompt], negative_prompt="blurry", guidance_scale=4.0)
            assert alone.tensors["prompt_mask"].sum() == lengths[i]
            # (the transformer pads its own batch to the longest row: float noise only)
            torch.testing.assert_close(adapter.predict(x[i:i + 1], t, alone), batch[i:i + 1], atol=1e-5, rtol=0)
        picked = adapter.predict(x[[2, 0, 0]], t, cond.select([2, 0, 0]))
        torch.testing.assert_close(picked, batch[[2, 0, 0]], atol=1e-6, rtol=0)
        tb = torch.as_tensor(t).expand(3)
        u = adapter.forward(x, tb, cond.negative, cond.extra).float()
        c = adapter.forward(x, tb, cond.tensors, cond.extra).float()
    torch.testing.assert_close(batch, c + 3.0 * (c - u), atol=1e-5, rtol=0)
    assert not torch.allclose(u, c)


# --- decoding --------------------------------------------------------------------------------------
def test_decode_is_differentiable_and_encode_images_inverts_it(load):
    adapter = load("turbo")
    x = _noise(adapter, batch=1).requires_grad_(True)
    images = adapter.decode(x)
    assert images.shape == (1, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    images.mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = adapter.encode_images(pixels)
        assert latents.shape == (2, *adapter.latent_shape(**SIZE))
        raw = adapter.vae.encode(pixels * 2 - 1).latent_dist.mean
        theirs = adapter.pipe.image_processor.postprocess(adapter.vae.decode(raw, return_dict=False)[0],
                                                          output_type="pt")
        torch.testing.assert_close(adapter.decode(latents), theirs.float(), atol=1e-5, rtol=1e-4)


# --- LoRA ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "turbo"])
def test_lora_export_loads_in_the_stock_pipeline(load, saved_dirs, tmp_path, variant):
    """add_lora / disable_adapter, then the export through ``ZImagePipeline.load_lora_weights``:
    the stock pipeline predicts what the trained adapter predicts, and ``unload_lora_weights``
    gives back its base predictions bit for bit."""
    from diffusers import ZImagePipeline

    adapter = load(variant)
    cond = adapter.encode(PROMPTS, negative_prompt=NEGATIVES)
    x = _noise(adapter, seed=6)
    t = adapter.schedule(4, latent_shape=tuple(x.shape[1:])).timesteps[1]
    trainable, _, tuned = assert_lora_attaches_and_disables(adapter, x, t, cond)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in trainable} >= {"to_q", "to_k", "to_v"}
    graded = adapter.predict(x, t, cond)
    graded.square().mean().backward()  # gradients reach the LoRA through the list-taking transformer
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in adapter.denoiser.named_parameters() if "lora_A" in n)
    assert torch.equal(graded.detach(), tuned), "with gradients, the same prediction"

    export = adapter.export_lora(tmp_path / "lora")
    stock = ZImageAdapter(ZImagePipeline.from_pretrained(saved_dirs(variant)), max_sequence_length=SEQ)
    # reloaded: the project's own loading path (ModelConfig.lora)
    assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, tuned, reloaded=load(variant))


# --- attention backend -----------------------------------------------------------------------------
def test_a_dispatched_attention_backend_predicts_the_same(load):
    adapter = load("base")
    cond = adapter.encode(PROMPTS, negative_prompt=NEGATIVES)  # rows of different lengths: masked attention
    x = _noise(adapter, seed=7)
    t = adapter.schedule(4, latent_shape=tuple(x.shape[1:])).timesteps[1]
    assert_dispatched_backend_predicts_the_same(adapter, x, t, cond)
