"""The Qwen-Image adapter on a tiny random ``QwenImagePipeline``: prompt encoding through the
pipeline's template, padded [negative; positive] batches, true CFG with the norm rescale, the
schedule, decoding, LoRA interop with the stock pipeline, and equality with the pipeline's own
sampling loop."""

from __future__ import annotations

import json

import pytest
import torch

try:
    from tests.tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                                   assert_stock_pipeline_loads_the_lora, euler, load_quietly, perturb_lora)
    from tests.tiny_models_qwen_image import TEMPLATE_DROP, build_qwen_image
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                             assert_stock_pipeline_loads_the_lora, euler, load_quietly, perturb_lora)
    from tiny_models_qwen_image import TEMPLATE_DROP, build_qwen_image

from pipelines.registry import load_adapter

PROMPTS = ["a photo of a cat", "a red car on a street at night"]
SIZE = {"height": 32, "width": 32}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_qwen_image(tmp_path_factory.mktemp("qwen_image") / "pipe"))


@pytest.fixture
def adapter(model_dir):
    model = load_quietly("qwen_image", model_dir)
    model.default_height = model.default_width = 32  # model.height / model.width of a training config
    return model


def _noise(model, batch=1, seed=0, **size):
    return model.initial_noise(batch, torch.Generator().manual_seed(seed), **(size or SIZE))


# --- loading and prompt encoding -----------------------------------------------------------------
def test_loads_with_family_defaults(adapter):
    from diffusers import QwenImagePipeline

    assert type(adapter).__name__ == "QwenImageAdapter" and isinstance(adapter.pipe, QwenImagePipeline)
    assert adapter.guidance_kind == "cfg_rescaled" and adapter.tasks == ("t2i",)
    assert (adapter.default_steps, adapter.default_guidance) == (50, 4.0)
    assert adapter.text_encoder_names == ("text_encoder",)
    assert adapter.latent_shape(32, 32) == (16, 16)  # (32 / 8)^2 tokens of 4 channels x 2 x 2
    assert adapter.latent_shape(32, 64) == (32, 16)
    with pytest.raises(ValueError, match="multiples of 8"):
        adapter.latent_shape(36, 32)
    trainable = [n for n, p in adapter.pipe.text_encoder.named_parameters() if p.requires_grad]
    assert not trainable, "the text encoder stays frozen"
    names = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
             for n, _ in adapter.denoiser.named_modules()}
    assert set(adapter.default_lora_targets) <= names


def test_template_prefix_is_the_dropped_system_prompt(adapter):
    """The pipeline drops the first 34 tokens of every templated prompt: with this tokenizer they are
    exactly the system prompt and ``<|im_start|>user\\n``, so the embeddings start at the prompt."""
    pipe = adapter.pipe
    assert pipe.prompt_template_encode_start_idx == TEMPLATE_DROP
    template = pipe.prompt_template_encode
    prefix = template[:template.index("{}")]
    assert len(pipe.tokenizer(prefix)["input_ids"]) == TEMPLATE_DROP
    for prompt in PROMPTS:
        ids = pipe.tokenizer(template.format(prompt))["input_ids"]
        kept = pipe.tokenizer.decode(ids[TEMPLATE_DROP:])
        assert kept.startswith(prompt) and kept.endswith("<|im_start|>assistant\n")
        embeds, mask = pipe.encode_prompt(prompt)
        assert mask is None and embeds.shape[1] == len(ids) - TEMPLATE_DROP


def test_encode_pads_negative_and_positive_to_one_length(adapter):
    cond = adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=4.0)
    assert cond.uses_cfg and len(cond) == 2 and cond.guidance_scale == 4.0
    pos, neg = cond.tensors, cond.negative
    assert set(pos) == set(neg) == {"prompt_embeds", "prompt_embeds_mask"}
    for key in pos:
        assert pos[key].shape == neg[key].shape
    lengths = pos["prompt_embeds_mask"].sum(1).tolist()
    neg_length = int(neg["prompt_embeds_mask"][0].sum())
    assert lengths[0] < lengths[1] and neg_length < lengths[1]  # two kinds of padding in one batch
    expected, _ = adapter.pipe.encode_prompt(PROMPTS[0])
    torch.testing.assert_close(pos["prompt_embeds"][0, :lengths[0]], expected[0], rtol=0, atol=1e-6)
    assert not pos["prompt_embeds"][0, lengths[0]:].any() and not cond.extra["text_unpadded"]

    plain = adapter.encode(PROMPTS[:1], guidance_scale=1.0)
    assert not plain.uses_cfg and plain.negative is None and plain.extra["text_unpadded"]
    assert bool(plain.tensors["prompt_embeds_mask"].all())
    with pytest.raises(ValueError, match="negative prompts"):
        adapter.encode(PROMPTS, negative_prompt=["a", "b", "c"], guidance_scale=4.0)


def test_predict_is_rescaled_true_cfg_of_unpadded_branches(adapter):
    """One padded [negative; positive] batch gives what two unpadded calls give (padded text keys are
    masked), combined as comb = u + s (c - u), comb * ||c|| / ||comb||."""
    scale = 4.0
    cond = adapter.encode(PROMPTS[1:], negative_prompt="blurry", guidance_scale=scale)
    x = _noise(adapter, seed=1)
    t = adapter.schedule(4, latent_shape=tuple(x.shape[1:])).timesteps[1]
    nfe, rows = adapter.nfe, adapter.transformer_rows
    with torch.no_grad():
        out = adapter.predict(x, t, cond)
    assert adapter.nfe - nfe == 1 and adapter.transformer_rows - rows == 2
    assert out.shape == x.shape and out.dtype == torch.float32

    pipe, tb = adapter.pipe, torch.as_tensor(t, dtype=torch.float32).expand(1)
    with torch.no_grad():
        branches = []
        for prompt in (PROMPTS[1], "blurry"):
            embeds, mask = pipe.encode_prompt(prompt)
            branches.append(adapter.denoiser(hidden_states=x, timestep=tb / 1000, encoder_hidden_states=embeds,
                                             encoder_hidden_states_mask=mask, img_shapes=[[(1, 4, 4)]],
                                             return_dict=False)[0])
    c, u = branches
    assert not torch.allclose(u, c)
    comb = u + scale * (c - u)
    expected = comb * (c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), c.norm(dim=-1), atol=1e-5, rtol=1e-5)  # the rescale's point
    assert not torch.allclose(out, comb, atol=1e-3)
    # the split and cached-uncond paths agree with the batched one
    with torch.no_grad():
        split, kept = adapter.predict(x, t, cond, cfg_split=True, return_uncond=True)
        again = adapter.predict(x, t, cond, uncond=kept)
    torch.testing.assert_close(split, out, atol=1e-5, rtol=0)
    torch.testing.assert_close(again, out, atol=1e-5, rtol=0)


# --- schedule and equality with the pipeline's loop ----------------------------------------------
def test_schedule_is_the_pipelines(adapter):
    steps = 6
    schedule = adapter.schedule(steps, latent_shape=adapter.latent_shape(**SIZE))
    assert len(schedule) == steps and schedule.levels.shape == (steps + 1,)
    assert schedule.levels[0] > 0.99 and schedule.levels[-1] == 0
    assert abs(float(schedule.levels[-2]) - 0.02) < 1e-6  # the released scheduler's shift_terminal
    torch.testing.assert_close(schedule.timesteps, schedule.levels[:-1] * 1000, atol=1e-3, rtol=0)
    pipe = adapter.pipe
    pipe(prompt=PROMPTS[:1], height=32, width=32, num_inference_steps=steps, true_cfg_scale=1.0,
         output_type="latent")
    torch.testing.assert_close(schedule.levels, pipe.scheduler.sigmas.float(), rtol=0, atol=0)
    wide = adapter.schedule(steps, latent_shape=adapter.latent_shape(32, 64))
    assert not torch.equal(wide.levels, schedule.levels), "mu follows the image sequence length"
    with pytest.raises(ValueError, match="num_steps"):
        adapter.schedule(0)


@pytest.mark.parametrize("prompts, scale, size", [
    (PROMPTS[:1], 1.0, (32, 32)),  # no CFG: a single unpadded branch
    (PROMPTS[:1], 4.0, (32, 32)),  # true CFG, the negative prompt shorter than the prompt
    (PROMPTS, 2.5, (32, 32)),  # a batch of prompts of two lengths and their negatives
    (PROMPTS[1:], 4.0, (32, 64)),  # non-square: the transformer's img_shapes follow the grid
])
def test_sampling_matches_pipeline(adapter, prompts, scale, size):
    steps, (height, width) = 4, size
    batch = len(prompts)
    x = _noise(adapter, batch=batch, seed=4, height=height, width=width)
    negative = ["blurry"] * batch if scale != 1.0 else None
    ref = adapter.pipe(prompt=prompts, negative_prompt=negative, true_cfg_scale=scale, latents=x.clone(),
                       height=height, width=width, num_inference_steps=steps, output_type="latent").images
    cond = adapter.encode(prompts, negative_prompt="blurry", guidance_scale=scale, height=height, width=width)
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    assert not torch.allclose(ours, x, atol=1e-2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_decode_matches_pipeline_images(adapter):
    steps, scale = 3, 4.0
    x = _noise(adapter, seed=5)
    kwargs = dict(prompt=PROMPTS[:1], negative_prompt=["blurry"], true_cfg_scale=scale, height=32, width=32,
                  num_inference_steps=steps)
    images = adapter.pipe(latents=x.clone(), output_type="pt", **kwargs).images
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=scale)
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    with torch.no_grad():
        decoded = adapter.decode(ours)
    assert decoded.shape == (1, 3, 32, 32) and decoded.dtype == torch.float32
    torch.testing.assert_close(decoded, images, atol=1e-5, rtol=0)
    wide = _noise(adapter, seed=6, height=32, width=64)
    with torch.no_grad():
        assert adapter.decode(wide, height=32, width=64).shape == (1, 3, 32, 64)
    with pytest.raises(ValueError, match="height / width"):
        adapter.decode(wide)  # 32 tokens: neither the configured 32x32 size nor square


def test_decode_is_differentiable_and_encode_images_inverts_it(adapter):
    x = _noise(adapter, seed=7).requires_grad_(True)
    adapter.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = adapter.encode_images(images)
        assert latents.shape == (2, *adapter.latent_shape(**SIZE))
        ours = adapter.decode(latents)
        vae = adapter.vae
        raw = vae.encode(images[:, :, None] * 2 - 1).latent_dist.mean
        theirs = adapter.pipe.image_processor.postprocess(vae.decode(raw, return_dict=False)[0][:, :, 0],
                                                          output_type="pt")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


# --- LoRA --------------------------------------------------------------------------------------
def test_lora_disable_adapter_gives_the_base_model(adapter):
    cond = adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=4.0)
    x, t = _noise(adapter, batch=2), adapter.schedule(4, latent_shape=adapter.latent_shape(**SIZE)).timesteps[1]
    assert_lora_attaches_and_disables(adapter, x, t, cond)
    # the rescaled guidance is differentiable: the trainable LoRA weights get gradients through it
    adapter.predict(x, t, cond).square().mean().backward()
    missing = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad and p.grad is None]
    # only the last block's text-stream output feeds nothing: the image tokens leave that block first
    assert missing and all(n.startswith("transformer_blocks.1.attn.to_add_out.") for n in missing), missing


def test_exported_lora_loads_in_the_stock_pipeline(adapter, model_dir, tmp_path):
    from diffusers import QwenImagePipeline

    from pipelines.qwen_image import QwenImageAdapter

    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=4.0)
    x, t = _noise(adapter, seed=2), torch.tensor(700.0)
    adapter.add_lora(rank=4, alpha=8)
    perturb_lora(adapter.denoiser)
    export = adapter.export_lora(tmp_path / "lora")
    with torch.no_grad():
        ours = adapter.predict(x, t, cond)

    stock = QwenImageAdapter(QwenImagePipeline.from_pretrained(model_dir))
    stock.default_height = stock.default_width = 32
    reloaded = load_adapter("qwen_image", model_dir)  # and through the adapter's own load_lora
    reloaded.default_height = reloaded.default_width = 32
    assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, ours, reloaded=reloaded)


def test_attention_backend_native_math(adapter):
    cond = adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=4.0)
    assert_dispatched_backend_predicts_the_same(adapter, _noise(adapter, batch=2, seed=8), torch.tensor(600.0), cond)


def test_bfloat16(model_dir):
    """Lower-precision loading: outputs are float32 whatever the model's dtype."""
    model = load_adapter("qwen_image", model_dir, dtype=torch.bfloat16)
    model.default_height = model.default_width = 32
    assert model.dtype == torch.bfloat16
    cond = model.encode(PROMPTS, negative_prompt="blurry", guidance_scale=4.0)
    x = _noise(model, batch=2)
    with torch.no_grad():
        out = model.predict(x, torch.tensor(500.0), cond)
        images = model.decode(x)
    assert out.dtype == images.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(images).all()


# --- refusals ----------------------------------------------------------------------------------
def test_refuses_guidance_distilled_transformer(tmp_path):
    directory = build_qwen_image(tmp_path / "distilled", guidance_embeds=True)
    with pytest.raises(ValueError, match="guidance_embeds=True"):
        load_adapter("qwen_image", str(directory))


def test_refuses_a_qwen_image_21_folder(tmp_path):
    from pipelines.qwen_image import QwenImageAdapter

    folder = tmp_path / "qwen21"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImage21Pipeline", "_diffusers_version": "0.42.1",
        "processor": ["transformers", "Qwen3VLProcessor"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
        "transformer": ["diffusers", "QwenImage21Transformer2DModel"], "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    }))
    with pytest.raises(ValueError, match="Qwen-Image 2.1"):
        QwenImageAdapter.from_pretrained(str(folder))
