"""The diffusers adapters on tiny random pipelines: loading through ``from_pretrained``, prompt
encoding, CFG, schedules, decoding, LoRA, and equivalence with the diffusers pipelines' own
sampling loops."""

from __future__ import annotations

from functools import partial

import pytest
import torch

try:
    from tests.tiny_models import (assert_lora_attaches_and_disables, build_flux, build_sd, build_sd3, build_sdxl,
                                   build_wan, euler, load_quietly, model_dir_cache)
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_lora_attaches_and_disables, build_flux, build_sd, build_sd3, build_sdxl, build_wan,
                             euler, load_quietly, model_dir_cache)

from pipelines.registry import ADAPTERS, list_adapters, load_adapter

SEQ = 16  # T5 / UMT5 tokens per prompt in these tests
PROMPTS = ["a photo of a cat", "a red car on a street at night"]

#: name -> (registry name, builder, builder kwargs, adapter kwargs, size kwargs)
SPECS = {
    "sd3": ("sd3", build_sd3, {}, {"max_sequence_length": SEQ}, {"height": 32, "width": 32}),
    "sd3_t5": ("sd3", build_sd3, {"with_t5": True}, {"max_sequence_length": SEQ}, {"height": 32, "width": 32}),
    "flux": ("flux", build_flux, {}, {"max_sequence_length": SEQ}, {"height": 32, "width": 32}),
    "wan": ("wan", build_wan, {}, {"max_sequence_length": SEQ}, {"height": 32, "width": 32, "num_frames": 5}),
    "wan_euler": ("wan", build_wan, {"unipc": False}, {"max_sequence_length": SEQ},
                  {"height": 32, "width": 32, "num_frames": 5}),
    "sd": ("sd", build_sd, {}, {}, {"height": 32, "width": 32}),
    "sd_v": ("sd", build_sd, {"prediction_type": "v_prediction"}, {}, {"height": 32, "width": 32}),
    "sdxl": ("sdxl", build_sdxl, {}, {}, {"height": 32, "width": 32}),
}
MAIN = ["sd3", "flux", "wan", "sd", "sdxl"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_dirs(tmp_path_factory):
    builders = {key: partial(build, **build_kwargs) for key, (_, build, build_kwargs, _, _) in SPECS.items()}
    return model_dir_cache(tmp_path_factory.mktemp("tiny_pipelines"), builders)


@pytest.fixture
def load(saved_dirs):
    """A fresh adapter loaded from the saved pipeline, as a user loads one."""
    def _load(key: str):
        name, _, _, adapter_kwargs, _ = SPECS[key]
        return load_quietly(name, saved_dirs(key), **adapter_kwargs)
    return _load


def _encode(adapter, key, scale=3.0):
    if SPECS[key][0] == "flux":  # distilled guidance + true CFG against the negative prompt
        return adapter.encode(PROMPTS, negative_prompt="blurry", guidance_scale=3.5, true_cfg_scale=scale)
    return adapter.encode(PROMPTS, negative_prompt="blurry, low quality", guidance_scale=scale)


def _noise(adapter, key, batch=2, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), **SPECS[key][4])


def _first_t(adapter, key, steps=4, index=1):
    shape = adapter.latent_shape(**SPECS[key][4])
    return adapter.schedule(steps, latent_shape=shape).timesteps[index]


# --- interface ----------------------------------------------------------------------------------
@pytest.mark.parametrize("key", MAIN + ["sd3_t5"])
def test_predict_shape_cfg_and_nfe(load, key):
    adapter = load(key)
    cond = _encode(adapter, key)
    assert cond.uses_cfg and len(cond) == 2
    for d in (cond.tensors, cond.negative):
        assert all(v.shape[0] == 2 for v in d.values()), "conditioning tensors must be batch-first"
    x = _noise(adapter, key)
    assert tuple(x.shape[1:]) == adapter.latent_shape(**SPECS[key][4])
    t = _first_t(adapter, key)

    nfe, rows = adapter.nfe, adapter.transformer_rows
    with torch.no_grad():
        out = adapter.predict(x, t, cond)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert adapter.nfe - nfe == 2 and adapter.transformer_rows - rows == 4

    with torch.no_grad():  # the CFG combination from two separate calls
        tb = torch.as_tensor(t, dtype=torch.float32).expand(2)
        u = adapter.forward(x, tb, cond.negative, cond.extra).float()
        c = adapter.forward(x, tb, cond.tensors, cond.extra).float()
    assert not torch.allclose(u, c), "prompt must change the prediction"
    torch.testing.assert_close(out, u + cond.guidance_scale * (c - u), atol=1e-5, rtol=1e-4)

    # no CFG at guidance 1: a single forward per sample
    plain = adapter.encode(PROMPTS[:1], guidance_scale=1.0) if SPECS[key][0] != "flux" else \
        adapter.encode(PROMPTS[:1], guidance_scale=3.5)
    assert not plain.uses_cfg
    rows = adapter.transformer_rows
    with torch.no_grad():
        adapter.predict(x[:1], t, plain)
    assert adapter.transformer_rows - rows == 1


@pytest.mark.parametrize("key", MAIN + ["wan_euler"])
def test_schedule(load, key):
    adapter = load(key)
    steps = 6
    schedule = adapter.schedule(steps, latent_shape=adapter.latent_shape(**SPECS[key][4]))
    assert len(schedule) == steps and schedule.levels.shape == (steps + 1,)
    assert schedule.levels.dtype == torch.float32
    if schedule.kind == "flow":
        assert adapter.prediction_type == "flow"
        assert schedule.levels[0] > 0.99 and schedule.levels[-1] == 0
        assert (schedule.levels[1:] < schedule.levels[:-1]).all()
        torch.testing.assert_close(schedule.timesteps.float(), schedule.levels[:-1] * 1000, atol=1e-3, rtol=0)
    else:
        assert schedule.kind == "ddpm" and adapter.prediction_type in ("epsilon", "v_prediction")
        assert not schedule.timesteps.is_floating_point()
        assert (schedule.timesteps[1:] < schedule.timesteps[:-1]).all()
        assert (schedule.levels[1:] > schedule.levels[:-1]).all() and schedule.levels[-1] <= 1


@pytest.mark.parametrize("key", MAIN)
def test_decode(load, key):
    adapter = load(key)
    x = _noise(adapter, key)
    with torch.no_grad():
        out = adapter.decode(x)
    size = SPECS[key][4]
    if adapter.is_video:
        assert out.shape == (2, size["num_frames"], 3, size["height"], size["width"])
    else:
        assert out.shape == (2, 3, size["height"], size["width"])
    assert out.dtype == torch.float32 and out.min() >= 0 and out.max() <= 1


def test_decode_is_differentiable(load):
    adapter = load("sd3")
    x = _noise(adapter, "sd3", batch=1).requires_grad_(True)
    adapter.decode(x).mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("key", MAIN)
def test_lora_attach_and_disable(load, key):
    adapter = load(key)
    cond = _encode(adapter, key)
    assert_lora_attaches_and_disables(adapter, _noise(adapter, key), _first_t(adapter, key), cond)


@pytest.mark.parametrize("key", ["wan", "sd3"])
def test_bfloat16(saved_dirs, key):
    """Lower-precision loading: Wan keeps some modules in float32, the adapter must use the
    transformer's compute dtype; outputs are float32 whatever the model dtype."""
    name, _, _, adapter_kwargs, size = SPECS[key]
    adapter = load_adapter(name, saved_dirs(key), dtype=torch.bfloat16, **adapter_kwargs)
    assert adapter.dtype == torch.bfloat16
    cond = _encode(adapter, key)
    x = _noise(adapter, key)
    with torch.no_grad():
        out = adapter.predict(x, _first_t(adapter, key), cond)
        images = adapter.decode(x)
    assert out.dtype == images.dtype == torch.float32
    assert torch.isfinite(out).all() and torch.isfinite(images).all()


def test_flux_packing_and_non_square(load):
    adapter = load("flux")
    shape = adapter.latent_shape(32, 64)
    assert shape == (8 * 16, 16)  # (32 / 4) x (64 / 4) tokens of 4 x 4 channels
    x = adapter.initial_noise(1, torch.Generator().manual_seed(0), height=32, width=64)
    unpacked = adapter.unpack(x, 32, 64)
    assert unpacked.shape == (1, 4, 16, 32)
    assert torch.equal(adapter.pack(unpacked), x)
    cond = adapter.encode(PROMPTS[:1], guidance_scale=3.5, height=32, width=64)
    assert cond.extra["latent_grid"] == (8, 16) and cond.negative is None
    with torch.no_grad():
        assert adapter.predict(x, 500.0, cond).shape == x.shape
        assert adapter.decode(x, height=32, width=64).shape == (1, 3, 32, 64)


def test_flux_decode_depends_on_no_earlier_call(load):
    """32x64 and 64x32 images have the same packed length: decode follows the size it is given (or
    the adapter's configured size), never the last latent_shape call."""
    adapter = load("flux")
    x = adapter.initial_noise(1, torch.Generator().manual_seed(0), height=32, width=64)
    with torch.no_grad():
        wide = adapter.decode(x, height=32, width=64)
        adapter.latent_shape(64, 32)  # would have re-mapped this sequence length
        assert torch.equal(adapter.decode(x, height=32, width=64), wide)
        with pytest.raises(ValueError, match="height / width"):
            adapter.decode(x)  # 128 tokens: not the default 32x32 size, not square
        adapter.default_height, adapter.default_width = 32, 64  # the configured size (model.height/width)
        assert torch.equal(adapter.decode(x), wide)


@pytest.mark.parametrize("key", MAIN)
def test_encode_images_inverts_the_decoders_latent_normalisation(load, key):
    """encode_images then decode equals the VAE's own round trip (encode mean, decode) on the raw
    latents: the adapter's scaling / shift / normalisation (and FLUX's packing) cancel exactly."""
    adapter = load(key)
    size = SPECS[key][4]
    gen = torch.Generator().manual_seed(0)
    if adapter.is_video:
        images = torch.rand(2, size["num_frames"], 3, size["height"], size["width"], generator=gen)
    else:
        images = torch.rand(2, 3, size["height"], size["width"], generator=gen)
    with torch.no_grad():
        latents = adapter.encode_images(images)
        assert latents.shape == (2, *adapter.latent_shape(**size))
        ours = adapter.decode(latents)
        vae = adapter.vae
        if adapter.is_video:
            raw = vae.encode(images.permute(0, 2, 1, 3, 4) * 2 - 1).latent_dist.mean
            theirs = adapter.pipe.video_processor.postprocess_video(vae.decode(raw, return_dict=False)[0],
                                                                    output_type="pt")
        else:
            raw = vae.encode(images * 2 - 1).latent_dist.mean
            theirs = adapter.pipe.image_processor.postprocess(vae.decode(raw, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(ours, theirs.float(), rtol=1e-4, atol=1e-4)


def test_registry(saved_dirs):
    assert set(list_adapters()) == {"toy", "toy_video", "toy_edit", "sd3", "flux", "flux_kontext", "wan", "sd", "sdxl",
                                    "qwen_image", "qwen_image_edit", "flux2", "flux2_klein", "z_image", "wan22",
                                    "hunyuan_video15", "hunyuan_video15_i2v"} == set(ADAPTERS)
    adapter = load_adapter("SD", saved_dirs("sd"), dtype=torch.float32)  # dtype or torch_dtype alike
    assert type(adapter).__name__ == "SDAdapter" and adapter.dtype == torch.float32
    with pytest.raises(ValueError, match="did you mean 'sd3'"):
        load_adapter("sd33", "unused")
    with pytest.raises(ValueError, match="did you mean 'sdxl'"):
        load_adapter("sd-xl", "unused")


# --- equivalence with the diffusers pipelines' own loops -----------------------------------------
def _ddim(adapter, cond, x, schedule):
    with torch.no_grad():
        for i in range(len(schedule)):
            out = adapter.predict(x, schedule.timesteps[i], cond)
            a, a_prev = schedule.levels[i], schedule.levels[i + 1]
            if adapter.prediction_type == "epsilon":
                eps = out
                x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
            else:
                x0 = a.sqrt() * x - (1 - a).sqrt() * out
                eps = a.sqrt() * out + (1 - a).sqrt() * x
            x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_sd3_matches_pipeline(load, dynamic_shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    adapter, steps, scale = load("sd3"), 4, 3.0
    if dynamic_shift:  # resolution-dependent shift (mu from the image sequence length)
        adapter.pipe.scheduler = FlowMatchEulerDiscreteScheduler(
            use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256)
    x = _noise(adapter, "sd3", batch=1, seed=3)
    ref = adapter.pipe(prompt=PROMPTS[:1], negative_prompt=["blurry"], latents=x.clone(), height=32, width=32,
                       num_inference_steps=steps, guidance_scale=scale, max_sequence_length=SEQ,
                       output_type="latent").images
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=scale)
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if dynamic_shift:
        return
    # decoding matches the pipeline's own image output
    images = adapter.pipe(prompt=PROMPTS[:1], negative_prompt=["blurry"], latents=x.clone(), height=32, width=32,
                          num_inference_steps=steps, guidance_scale=scale, max_sequence_length=SEQ,
                          output_type="pt").images
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(ours), images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("true_cfg", [1.0, 2.0])
def test_flux_matches_pipeline(load, true_cfg):
    adapter, steps = load("flux"), 4
    x = _noise(adapter, "flux", batch=1, seed=4)
    kwargs = {"negative_prompt": "blurry", "true_cfg_scale": true_cfg} if true_cfg != 1.0 else {}
    ref = adapter.pipe(prompt=PROMPTS[:1], latents=x.clone(), height=32, width=32, num_inference_steps=steps,
                       guidance_scale=3.5, max_sequence_length=SEQ, output_type="latent", **kwargs).images
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=3.5, true_cfg_scale=true_cfg)
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_wan_matches_pipeline(load):
    adapter, steps, scale = load("wan_euler"), 3, 3.0
    x = _noise(adapter, "wan_euler", batch=1, seed=5)
    ref = adapter.pipe(prompt=PROMPTS[:1], negative_prompt="blurry", latents=x.clone(), height=32, width=32,
                       num_frames=5, num_inference_steps=steps, guidance_scale=scale, max_sequence_length=SEQ,
                       output_type="latent").frames
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=scale)
    ours = euler(adapter, cond, x, adapter.schedule(steps, latent_shape=tuple(x.shape[1:])))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    video = adapter.pipe(prompt=PROMPTS[:1], negative_prompt="blurry", latents=x.clone(), height=32, width=32,
                         num_frames=5, num_inference_steps=steps, guidance_scale=scale, max_sequence_length=SEQ,
                         output_type="pt").frames
    with torch.no_grad():
        torch.testing.assert_close(adapter.decode(ours), video, atol=1e-5, rtol=0)


@pytest.mark.parametrize("key", ["sd", "sd_v", "sdxl"])
def test_unet_matches_ddim_pipeline(load, key):
    from diffusers import DDIMScheduler

    adapter, steps, scale = load(key), 5, 3.0
    adapter.pipe.scheduler = DDIMScheduler.from_config(adapter.pipe.scheduler.config)
    x = _noise(adapter, key, batch=1, seed=6)
    ref = adapter.pipe(prompt=PROMPTS[:1], negative_prompt=["blurry"], latents=x.clone(), height=32, width=32,
                       num_inference_steps=steps, guidance_scale=scale, eta=0.0, output_type="latent").images
    cond = adapter.encode(PROMPTS[:1], negative_prompt="blurry", guidance_scale=scale)
    ours = _ddim(adapter, cond, x, adapter.schedule(steps))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
