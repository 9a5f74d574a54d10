"""The HunyuanVideo 1.5 adapters (text-to-video and image-to-video) on tiny random pipelines: loading,
prompt and image encoding, trimmed text padding, CFG, schedule, decoding, LoRA (export into a stock
transformer, disable), the attention backend, and equivalence with the diffusers pipelines' own
sampling loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

try:
    from tests.tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                                   assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache,
                                   perturb_lora)
    from tests.tiny_models_hunyuan_video15 import build_hunyuan_video15, build_hunyuan_video15_i2v
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                             assert_stock_pipeline_loads_the_lora, euler, load_quietly, model_dir_cache, perturb_lora)
    from tiny_models_hunyuan_video15 import build_hunyuan_video15, build_hunyuan_video15_i2v

from pipelines.base import Prompt
from pipelines.registry import load_adapter

#: one prompt with quoted glyph text (the ByT5 branch), one without
PROMPTS = ['a cat holding a sign that says "hello"', "a red car on a street at night"]
SIZE = {"height": 32, "width": 32, "num_frames": 5}
BUILDERS = {"t2v": build_hunyuan_video15, "i2v": build_hunyuan_video15_i2v}
NAMES = {"t2v": "hunyuan_video15", "i2v": "hunyuan_video15_i2v"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    return model_dir_cache(tmp_path_factory.mktemp("tiny_hunyuan_video15"), BUILDERS)


@pytest.fixture
def load(saved_dirs):
    def _load(key: str):
        return load_quietly(NAMES[key], saved_dirs(key))
    return _load


def _image(seed: int = 0):
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((32, 32, 3)) * 255).astype("uint8")
    return Image.fromarray(pixels)


def _encode(adapter, prompts=PROMPTS, scale=3.0, negative="blurry"):
    if adapter.tasks == ("i2v",):
        image = _image()
        return adapter.encode(prompts, negative_prompt=negative, guidance_scale=scale, images=[image] * len(prompts),
                              height=32, width=32)
    return adapter.encode(prompts, negative_prompt=negative, guidance_scale=scale)


def _noise(adapter, batch=2, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), **SIZE)


def _t(adapter, steps=4, index=1):
    return adapter.schedule(steps).timesteps[index]


# --- interface ----------------------------------------------------------------------------------
def test_attributes_sizes_and_one_line_errors(load, saved_dirs):
    t2v, i2v = load("t2v"), load("i2v")
    assert t2v.tasks == ("t2v",) and i2v.tasks == ("i2v",) and t2v.is_video and t2v.guidance_kind == "cfg"
    assert t2v.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert i2v.text_encoder_names == ("text_encoder", "text_encoder_2")
    assert t2v.default_guidance == 6.0  # the guider's scale
    assert (t2v.default_height, t2v.default_width) == (24, 40)  # the pipeline's 16:9 bucket of target_size 32
    assert t2v.max_sequence_length == 1000
    assert t2v.latent_shape(**SIZE) == (4, 2, 4, 4)
    trainable = [p for p in t2v.pipe.text_encoder.parameters() if p.requires_grad]
    assert not trainable and all(p.requires_grad for p in t2v.denoiser.parameters())

    with pytest.raises(ValueError, match="multiples of 8"):
        t2v.latent_shape(30, 32, 5)
    with pytest.raises(ValueError, match="num_frames - 1 must be a multiple of 4"):
        t2v.latent_shape(32, 32, 6)
    with pytest.raises(ValueError, match="takes no images"):
        t2v.encode(PROMPTS[:1], images=[_image()])
    with pytest.raises(ValueError, match="needs a conditioning image"):
        i2v.encode(PROMPTS[:1])
    with pytest.raises(FileNotFoundError, match="not found"):
        i2v.encode([Prompt("a cat", "/nonexistent/cat.png")], height=32, width=32)
    with pytest.raises(ValueError, match="must be RGB"):
        i2v.encode(PROMPTS[:1], images=[torch.rand(4, 32, 32)], height=32, width=32)
    with pytest.raises(ValueError, match="use the 'hunyuan_video15_i2v' adapter"):
        load_adapter("hunyuan_video15", saved_dirs("i2v"))
    with pytest.raises(ValueError, match="use the 'hunyuan_video15' adapter"):
        load_adapter("hunyuan_video15_i2v", saved_dirs("t2v"))
    cond = i2v.encode(PROMPTS[:1], images=[_image()], height=32, width=32, guidance_scale=1.0)
    x = i2v.initial_noise(1, torch.Generator().manual_seed(0), height=64, width=64, num_frames=5)
    with pytest.raises(ValueError, match="encode with the video's height and width"):
        i2v.predict(x, 500.0, cond)


def test_unsupported_guiders_and_meanflow_are_one_line(load, tmp_path):
    from diffusers import ClassifierFreeGuidance

    from pipelines.hunyuan_video15 import HunyuanVideo15Adapter, HunyuanVideo15I2VAdapter

    pipe = load("t2v").pipe
    pipe.guider = ClassifierFreeGuidance(guidance_scale=5.0, start=0.2)
    with pytest.raises(ValueError, match="start / stop"):
        HunyuanVideo15Adapter(pipe)
    pipe.guider = ClassifierFreeGuidance(guidance_scale=5.0, enabled=False)
    assert HunyuanVideo15Adapter(pipe).default_guidance == 1.0
    with pytest.raises(ValueError, match="MeanFlow"):
        HunyuanVideo15I2VAdapter.from_pretrained(str(build_hunyuan_video15_i2v(tmp_path / "mf", use_meanflow=True)))


@pytest.mark.parametrize("key", ["t2v", "i2v"])
def test_encode_trims_padding_exactly_and_cfg_is_one_batch(load, key):
    adapter = load(key)
    cond = _encode(adapter)
    assert cond.uses_cfg and len(cond) == 2 and set(cond.negative) == set(cond.tensors)
    for name, value in cond.tensors.items():
        assert value.shape == cond.negative[name].shape and value.shape[0] == 2, name
    # padded to 1000 / 256 tokens by the pipeline; trimmed to the longest valid row here
    length, length_2 = cond.tensors["prompt_embeds"].shape[1], cond.tensors["prompt_embeds_2"].shape[1]
    assert length < 100 and length_2 < 40
    mask_2 = cond.tensors["prompt_embeds_mask_2"]
    assert mask_2[0].sum() > 0 and mask_2[1].sum() == 0  # only the first prompt quotes text
    assert cond.negative["prompt_embeds_mask_2"].sum() == 0
    if key == "i2v":
        assert cond.tensors["image_latents"].shape == (2, 4, 1, 4, 4)
        assert cond.tensors["image_embeds"].shape == (2, 16, 32)
        assert cond.negative["image_embeds"] is cond.tensors["image_embeds"]

    x, t = _noise(adapter), _t(adapter)
    tb = torch.as_tensor(t, dtype=torch.float32).expand(2)
    with torch.no_grad():
        out = adapter.predict(x, t, cond)
        u = adapter.forward(x, tb, cond.negative, cond.extra)
        c = adapter.forward(x, tb, cond.tensors, cond.extra)
        # the untrimmed, fixed-length padding of the pipeline gives the same prediction
        padded = adapter._encode_text(PROMPTS)
        padded.update({k: v for k, v in cond.tensors.items() if k.startswith("image_")})
        assert padded["prompt_embeds"].shape[1] == 1000 and padded["prompt_embeds_2"].shape[1] == 256
        c_padded = adapter.forward(x, tb, padded, cond.extra)
    assert adapter.transformer_rows >= 4 and out.shape == x.shape and out.dtype == torch.float32
    assert not torch.allclose(u, c), "the prompt must change the prediction"
    torch.testing.assert_close(out, u + 3.0 * (c - u), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c_padded, c, atol=1e-5, rtol=0)

    plain = _encode(adapter, PROMPTS[:1], scale=1.0)
    assert not plain.uses_cfg and plain.negative is None


def test_i2v_image_inputs_agree(load, tmp_path):
    """A PIL image, its file and its tensor (8-bit values) give the same conditioning; an image of
    another size is cropped to the video's as the pipeline does; rows sharing an image are equal."""
    adapter = load("i2v")
    image = _image(1)
    path = tmp_path / "cat.png"
    image.save(path)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    kwargs = dict(height=32, width=32, guidance_scale=1.0)
    by_pil = adapter.encode(["a cat", "a dog"], images=[image, image], **kwargs).tensors
    by_path = adapter.encode([Prompt("a cat", str(path)), Prompt("a dog", str(path))], **kwargs).tensors
    by_tensor = adapter.encode(["a cat", "a dog"], images=[tensor, tensor], **kwargs).tensors
    for name in ("image_latents", "image_embeds"):
        assert torch.equal(by_pil[name][0], by_pil[name][1])
        assert torch.equal(by_pil[name], by_path[name]) and torch.equal(by_pil[name], by_tensor[name])
    wide = adapter.encode(["a cat"], images=[image.resize((64, 32))], **kwargs).tensors
    assert wide["image_latents"].shape == (1, 4, 1, 4, 4)


def test_schedule_is_the_pipelines(load):
    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import retrieve_timesteps

    adapter = load("t2v")
    steps = 6
    schedule = adapter.schedule(steps)
    scheduler = type(adapter.pipe.scheduler).from_config(adapter.pipe.scheduler.config)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 0.0, steps + 1)[:-1])
    assert torch.equal(schedule.timesteps, timesteps.float())
    assert torch.equal(schedule.levels, scheduler.sigmas.float())
    assert schedule.levels[0] == 1 and schedule.levels[-1] == 0 and schedule.levels.dtype == torch.float32
    torch.testing.assert_close(schedule.timesteps, schedule.levels[:-1] * 1000)


# --- equivalence with the diffusers pipelines' own loops -----------------------------------------
@pytest.mark.parametrize("scale, rescale", [(3.0, 0.0), (1.0, 0.0), (3.0, 0.7)])
def test_t2v_matches_pipeline(load, scale, rescale):
    from pipelines.hunyuan_video15 import HunyuanVideo15Adapter

    pipe = load("t2v").pipe
    pipe.guider = pipe.guider.new(guidance_scale=scale, guidance_rescale=rescale)
    adapter, steps = HunyuanVideo15Adapter(pipe), 3
    assert adapter.default_guidance == scale and adapter.guidance_rescale == rescale
    x = _noise(adapter, seed=5)
    ref = pipe(prompt=PROMPTS, negative_prompt=["blurry"] * 2, latents=x.clone(), num_inference_steps=steps,
               output_type="latent", **SIZE).frames
    cond = adapter.encode(PROMPTS, negative_prompt="blurry")
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if scale != 3.0 or rescale:
        return
    # decoding equals the pipeline's video output (one video: the VAE decodes batches of one)
    video = pipe(prompt=PROMPTS[:1], negative_prompt=["blurry"], latents=x[:1].clone(), num_inference_steps=steps,
                 output_type="pt", **SIZE).frames
    with torch.no_grad():
        decoded = adapter.decode(ours)
    assert decoded.shape == (2, 5, 3, 32, 32) and decoded.min() >= 0 and decoded.max() <= 1
    torch.testing.assert_close(decoded[:1], video, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scale", [3.0, 1.0])
def test_i2v_matches_pipeline(load, scale):
    adapter, steps = load("i2v"), 3
    pipe, image = adapter.pipe, _image(2)
    pipe.guider = pipe.guider.new(guidance_scale=scale)
    x = _noise(adapter, batch=1, seed=6)
    kwargs = dict(prompt=PROMPTS[:1], image=image, negative_prompt=["blurry"], latents=x.clone(),
                  num_inference_steps=steps, num_frames=5)
    ref = pipe(output_type="latent", **kwargs).frames
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=scale, images=[image],
                          height=32, width=32)
    ours = euler(adapter, cond, x, adapter.schedule(steps))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if scale == 1.0:
        return
    video = pipe(output_type="pt", **kwargs).frames
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(ours), video, atol=1e-5, rtol=0)


def test_decode_is_differentiable_and_encode_images_inverts_its_normalisation(load):
    adapter = load("t2v")
    x = _noise(adapter, batch=1).requires_grad_(True)
    adapter.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    videos = torch.rand(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    vae = adapter.vae
    with torch.no_grad():
        latents = adapter.encode_images(videos)
        assert latents.shape == (2, *adapter.latent_shape(**SIZE))
        ours = adapter.decode(latents)
        raw = vae.encode(videos[:1].permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean
        theirs = adapter.pipe.video_processor.postprocess_video(vae.decode(raw, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(ours[:1], theirs.float(), rtol=1e-4, atol=1e-4)


# --- LoRA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["t2v", "i2v"])
def test_lora_attach_and_disable(load, key):
    adapter = load(key)
    trainable, _, _ = assert_lora_attaches_and_disables(adapter, _noise(adapter), _t(adapter), _encode(adapter))
    assert any("add_q_proj" in n for n in trainable) and any("to_add_out" in n for n in trainable)


@pytest.mark.parametrize("key", ["t2v", "i2v"])
def test_exported_lora_loads_into_a_stock_transformer(load, saved_dirs, tmp_path, key):
    """diffusers 0.42's HunyuanVideo 1.5 pipelines have no LoRA loader (no load_lora_weights): the
    exported folder loads with the stock transformer's load_lora_adapter and gives the trained
    outputs; unload_lora restores the base outputs bit for bit. The adapter's own load_lora reads it too."""
    from pipelines.hunyuan_video15 import HunyuanVideo15Adapter, HunyuanVideo15I2VAdapter

    trained = load(key)
    cond, x, t = _encode(trained), _noise(trained), _t(trained)
    trained.add_lora(rank=4, alpha=8)
    perturb_lora(trained.denoiser)
    export = trained.export_lora(tmp_path / "lora")
    assert (export / "pytorch_lora_weights.safetensors").is_file() and (export / "lora.safetensors").is_file()
    with torch.no_grad():
        ours = trained.predict(x, t, cond)

    adapter_cls = HunyuanVideo15Adapter if key == "t2v" else HunyuanVideo15I2VAdapter
    fresh = adapter_cls.pipeline_class().from_pretrained(saved_dirs(key))
    assert not hasattr(fresh, "load_lora_weights")
    assert_stock_pipeline_loads_the_lora(
        adapter_cls(fresh), export, x, t, cond, ours, reloaded=load(key), unload=fresh.transformer.unload_lora,
        load=lambda folder: fresh.transformer.load_lora_adapter(
            str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name="trained"))


# --- attention backend and precision --------------------------------------------------------------
@pytest.mark.parametrize("key", ["t2v", "i2v"])
def test_attention_backend(load, key):
    adapter = load(key)
    # the token refiner keeps diffusers' legacy AttnProcessor2_0, outside the dispatch
    assert_dispatched_backend_predicts_the_same(adapter, _noise(adapter), _t(adapter), _encode(adapter), every=False)


def test_bfloat16(saved_dirs):
    adapter = load_adapter("hunyuan_video15", saved_dirs("t2v"), dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    cond = _encode(adapter)
    assert cond.tensors["prompt_embeds"].dtype == torch.bfloat16
    x = _noise(adapter)
    with torch.no_grad():
        out = adapter.predict(x, _t(adapter), cond)
        video = adapter.decode(x)
    assert out.dtype == video.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(video).all()


@pytest.mark.parametrize("key", ["t2v", "i2v"])
def test_offloaded_text_encoders_predict_the_same(load, saved_dirs, key):
    """``model.offload_text_encoders`` (accelerate's cpu_offload of the named encoders) and a Qwen
    token budget (``model.max_sequence_length``) load through the runtime's load_model."""
    from align.models import ModelConfig, load_model

    offloaded = load_model(ModelConfig(name=NAMES[key], path=saved_dirs(key), device="cpu", dtype="float32",
                                       offload_text_encoders=True, max_sequence_length=64))
    assert offloaded.max_sequence_length == 64
    plain = load(key)
    x, t = _noise(plain), _t(plain)
    with torch.no_grad():
        torch.testing.assert_close(offloaded.predict(x, t, _encode(offloaded)), plain.predict(x, t, _encode(plain)),
                                   atol=1e-5, rtol=0)
