"""The Wan 2.2 adapter (``wan22``) on tiny random pipelines: A14B text-to-video with two experts
switched at the boundary timestep (each with its CFG scale), TI2V-5B text- and image-to-video with
per-token timesteps and the Wan 2.2 VAE. Equality with the stock pipelines' own loops and decoding,
the expert switch in rollouts and re-scoring, training one expert only, and LoRA interop of both
experts with the stock pipeline."""

from __future__ import annotations

import json

import pytest
import torch

try:
    from tests.tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                                   assert_stock_pipeline_loads_the_lora, build_wan, euler, load_quietly, perturb_lora)
    from tests.tiny_models_wan22 import build_wan22_a14b, build_wan22_ti2v
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import (assert_dispatched_backend_predicts_the_same, assert_lora_attaches_and_disables,
                             assert_stock_pipeline_loads_the_lora, build_wan, euler, load_quietly, perturb_lora)
    from tiny_models_wan22 import build_wan22_a14b, build_wan22_ti2v

from pipelines.base import Prompt
from pipelines.registry import load_adapter
from pipelines.wan import HIGH_NOISE_LORA_FILE, LOW_NOISE_LORA_FILE, Wan22Adapter, WanExperts

SEQ = 16  # UMT5 tokens per prompt
PROMPTS = ["a photo of a cat", "a red car on a street at night"]
A14B_SIZE = {"height": 32, "width": 32, "num_frames": 5}
TI2V_SIZE = {"height": 64, "width": 64, "num_frames": 5}
STEPS = 4  # Euler, shift 3: timesteps 1000 (high-noise expert), 857.7, 602.2, 8.9 (low-noise expert)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    return {"a14b": str(build_wan22_a14b(root / "a14b")), "ti2v": str(build_wan22_ti2v(root / "ti2v"))}


def _load(dirs, key, **kwargs):
    adapter = load_quietly("wan22", dirs[key], max_sequence_length=SEQ, **kwargs)
    size = A14B_SIZE if key == "a14b" else TI2V_SIZE
    adapter.default_height, adapter.default_width = size["height"], size["width"]  # model.height / width
    return adapter


@pytest.fixture
def a14b(dirs):
    return _load(dirs, "a14b")


@pytest.fixture
def ti2v(dirs):
    return _load(dirs, "ti2v")


def _noise(adapter, size, batch=1, seed=0):
    return adapter.initial_noise(batch, torch.Generator().manual_seed(seed), **size)


def _image(seed=1, size=64):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def _tensor_names(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def _i2v_pipeline(adapter):
    from diffusers import WanImageToVideoPipeline

    pipe = WanImageToVideoPipeline(**adapter.pipe.components, expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- loading --------------------------------------------------------------------------------------
def test_loads_both_layouts_with_family_settings(a14b, ti2v, dirs, tmp_path):
    assert isinstance(a14b, Wan22Adapter) and isinstance(a14b.denoiser, WanExperts)
    assert a14b.denoiser.transformer is a14b.pipe.transformer and a14b.denoiser.transformer_2 is a14b.pipe.transformer_2
    assert a14b.tasks == ("t2v",) and ti2v.tasks == ("t2v", "i2v")
    assert a14b.guidance_kind == "cfg" and a14b.text_encoder_names == ("text_encoder",) and a14b.is_video
    assert (a14b.default_steps, a14b.default_guidance, a14b.default_guidance_2) == (40, 4.0, 3.0)
    assert (ti2v.default_steps, ti2v.default_guidance, ti2v.default_num_frames) == (50, 5.0, 121)
    assert a14b.boundary_timestep == 875.0 and ti2v.boundary_timestep is None
    assert a14b.latent_shape(**A14B_SIZE) == (4, 2, 4, 4)
    assert ti2v.latent_shape(**TI2V_SIZE) == (48, 2, 4, 4)  # the Wan 2.2 VAE: 16x spatial
    with pytest.raises(ValueError, match=r"multiples of \(32, 32\)"):
        ti2v.latent_shape(48, 64, 5)
    assert not [n for n, p in a14b.pipe.text_encoder.named_parameters() if p.requires_grad]
    names = {n.rsplit(".", 1)[-1] if not n.endswith("to_out.0") else "to_out.0"
             for n, _ in a14b.denoiser.named_modules()}
    assert set(a14b.default_lora_targets) <= names

    # each adapter refuses the other Wan generation's folders; bad expert choices are one line
    with pytest.raises(ValueError, match="load it as 'wan22'"):
        load_adapter("wan", dirs["a14b"])
    with pytest.raises(ValueError, match="load it as 'wan22'"):
        load_adapter("wan", dirs["ti2v"])
    with pytest.raises(ValueError, match="load it as 'wan'$"):
        load_adapter("wan22", str(build_wan(tmp_path / "wan21", unipc=False)))
    with pytest.raises(ValueError, match="train_experts must be one of both, high_noise, low_noise"):
        _load(dirs, "a14b", train_experts="low")
    with pytest.raises(ValueError, match="needs the two experts"):
        _load(dirs, "ti2v", train_experts="low_noise")


def test_model_config_train_experts(dirs):
    from align.config import ConfigError
    from align.models import ModelConfig, load_model

    with pytest.raises(ConfigError, match="model.train_experts: unknown expert choice 'low'"):
        ModelConfig(name="wan22", train_experts="low")
    with pytest.raises(ConfigError, match="model.train_experts: 'low_noise' needs a model with several experts"):
        ModelConfig(name="wan", train_experts="low_noise")
    adapter = load_model(ModelConfig(name="wan22", path=dirs["a14b"], device="cpu", train_experts="low_noise",
                                     max_sequence_length=SEQ))
    assert adapter.train_experts == "low_noise" and adapter.trained_expert_indices == (1,)
    assert not any(p.requires_grad for p in adapter.pipe.transformer.parameters())
    assert all(p.requires_grad for p in adapter.pipe.transformer_2.parameters())


# --- equality with the stock pipelines --------------------------------------------------------------
@pytest.mark.parametrize("guidance_scale_2", [None, 1.5])
def test_a14b_matches_pipeline(a14b, guidance_scale_2):
    """Euler with the adapter equals ``WanPipeline.__call__`` (experts switched at the boundary, the
    low-noise expert with guidance_scale_2); decoding equals its video output."""
    x = _noise(a14b, A14B_SIZE, seed=5)
    call = dict(prompt=PROMPTS[:1], negative_prompt="blurry", latents=x.clone(), num_inference_steps=STEPS,
                guidance_scale=3.0, guidance_scale_2=guidance_scale_2, max_sequence_length=SEQ, **A14B_SIZE)
    ref = a14b.pipe(**call, output_type="latent").frames
    cond = a14b.encode(PROMPTS[:1], "blurry", 3.0, guidance_scale_2=guidance_scale_2)
    assert cond.extra["guidance_scale_2"] == (3.0 if guidance_scale_2 is None else 1.5)
    schedule = a14b.schedule(STEPS, latent_shape=tuple(x.shape[1:]))
    assert [a14b.expert_at(t) for t in schedule.timesteps] == [0, 1, 1, 1]
    ours = euler(a14b, cond, x, schedule)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    if guidance_scale_2 is None:
        return
    other = euler(a14b, a14b.encode(PROMPTS[:1], "blurry", 3.0), x, schedule)
    assert not torch.allclose(other, ours, atol=1e-4), "guidance_scale_2 must matter"
    video = a14b.pipe(**call, output_type="pt").frames
    with torch.no_grad():
        torch.testing.assert_close(a14b.decode(ours), video, atol=1e-5, rtol=0)


def test_ti2v_text_to_video_matches_pipeline(ti2v):
    x = _noise(ti2v, TI2V_SIZE, seed=6)
    call = dict(prompt=PROMPTS[:1], negative_prompt="blurry", latents=x.clone(), num_inference_steps=3,
                guidance_scale=3.0, max_sequence_length=SEQ, **TI2V_SIZE)
    ref = ti2v.pipe(**call, output_type="latent").frames
    cond = ti2v.encode(PROMPTS[:1], "blurry", 3.0)
    assert "image_latents" not in cond.tensors and ti2v.expert_at(500.0) is None
    ours = euler(ti2v, cond, x, ti2v.schedule(3))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    video = ti2v.pipe(**call, output_type="pt").frames
    with torch.no_grad():
        torch.testing.assert_close(ti2v.decode(ours), video, atol=1e-5, rtol=0)


def test_ti2v_image_to_video_matches_pipeline(ti2v):
    """``WanImageToVideoPipeline`` with expand_timesteps: the first latent frame is the encoded image
    (timestep 0 on its tokens). The adapter's Euler loop, with the image frame put back by
    apply_condition, equals the pipeline's latents, and decoding equals its video."""
    image = _image()
    pipe = _i2v_pipeline(ti2v)
    x = _noise(ti2v, TI2V_SIZE, seed=7)
    call = dict(image=image[None], prompt=PROMPTS[:1], negative_prompt="blurry", latents=x.clone(),
                num_inference_steps=3, guidance_scale=3.0, max_sequence_length=SEQ, **TI2V_SIZE)
    ref = pipe(**call, output_type="latent").frames
    cond = ti2v.encode(PROMPTS[:1], "blurry", 3.0, images=[image])
    assert cond.tensors["image_latents"].shape == (1, 48, 1, 4, 4)
    assert torch.equal(cond.negative["image_latents"], cond.tensors["image_latents"])
    ours = ti2v.apply_condition(euler(ti2v, cond, x, ti2v.schedule(3)), cond)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    video = pipe(**call, output_type="pt").frames
    with torch.no_grad():
        torch.testing.assert_close(ti2v.decode(ours), video, atol=1e-5, rtol=0)

    # the image comes from the prompt as well (a JSONL prompt file's Prompt strings)
    from_prompt = ti2v.encode([Prompt(PROMPTS[0], image)], "blurry", 3.0)
    assert torch.equal(from_prompt.tensors["image_latents"], cond.tensors["image_latents"])
    with pytest.raises(ValueError, match="has no image"):
        ti2v.encode([Prompt(PROMPTS[0], image), PROMPTS[1]])


def test_an_image_of_another_size_is_resized_as_the_pipeline_resizes_it(ti2v, tmp_path):
    """A first frame of another size and aspect (a file, as a JSONL prompt names it) goes through
    the pipeline's own preprocessing: the same conditioning latent as WanImageToVideoPipeline's."""
    from PIL import Image

    pixels = (torch.rand(40, 48, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(tmp_path / "first.png")
    cond = ti2v.encode(PROMPTS[:1], "blurry", 3.0, images=[str(tmp_path / "first.png")])
    pipe = _i2v_pipeline(ti2v)
    processed = pipe.video_processor.preprocess(Image.open(tmp_path / "first.png"), height=TI2V_SIZE["height"],
                                                width=TI2V_SIZE["width"])
    with torch.no_grad():
        theirs = pipe.vae.encode(processed[:, :, None]).latent_dist.mean
    mean, std = ti2v._latent_stats(theirs)
    torch.testing.assert_close(cond.tensors["image_latents"], (theirs - mean) * (1.0 / std), atol=1e-5, rtol=0)


def test_image_frame_has_zero_velocity_and_no_gradient(ti2v):
    """The conditioned frame's velocity is zero whatever the latents hold there, so it gives the
    log-probs no gradient; the other frames do not see the latents' first frame either."""
    cond = ti2v.encode(PROMPTS[:1], guidance_scale=1.0, images=[_image()])
    x = _noise(ti2v, TI2V_SIZE, seed=8).requires_grad_(True)
    v = ti2v.predict(x, torch.tensor(700.0), cond)
    assert torch.count_nonzero(v[:, :, 0]) == 0 and torch.count_nonzero(v[:, :, 1:]) > 0
    v.square().sum().backward()
    assert torch.count_nonzero(x.grad[:, :, 0]) == 0 and torch.count_nonzero(x.grad[:, :, 1:]) > 0
    with torch.no_grad():
        moved = x.detach().clone()
        moved[:, :, 0] += 1.0
        assert torch.equal(ti2v.predict(moved, torch.tensor(700.0), cond), v.detach())


def test_text_to_video_checkpoint_refuses_images(a14b):
    with pytest.raises(ValueError, match="text-to-video only"):
        a14b.encode(PROMPTS[:1], images=[_image(size=32)])


# --- experts --------------------------------------------------------------------------------------
def _count_calls(adapter):
    counts = [0, 0]
    for index, expert in enumerate(adapter.denoiser.experts):
        expert.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1))
    return counts


def test_expert_switch_and_per_expert_guidance(a14b):
    cond = a14b.encode(PROMPTS, "blurry", 3.0, guidance_scale_2=2.0)
    x = _noise(a14b, A14B_SIZE, batch=2, seed=9)
    high, low = torch.tensor(900.0), torch.tensor(500.0)
    assert (a14b.expert_at(high), a14b.expert_at(875.0), a14b.expert_at(low)) == (0, 0, 1)
    counts = _count_calls(a14b)
    with torch.no_grad():
        a14b.predict(x, high, cond)
        assert counts == [1, 0]  # one CFG batch through the high-noise expert
        a14b.predict(x, low, cond)
        assert counts == [1, 1]
        with a14b.pinned_expert(0):
            a14b.predict(x, low, cond)
        assert counts == [2, 1]

        # each expert alone, and its own CFG scale
        tb = low.expand(2)
        u = a14b.denoiser(x, tb, cond.negative["prompt_embeds"], expert=1)
        c = a14b.denoiser(x, tb, cond.tensors["prompt_embeds"], expert=1)
        torch.testing.assert_close(a14b.predict(x, low, cond), u + 2.0 * (c - u), atol=1e-6, rtol=1e-5)
        tb = high.expand(2)
        u = a14b.denoiser(x, tb, cond.negative["prompt_embeds"], expert=0)
        c = a14b.denoiser(x, tb, cond.tensors["prompt_embeds"], expert=0)
        torch.testing.assert_close(a14b.predict(x, high, cond), u + 3.0 * (c - u), atol=1e-6, rtol=1e-5)

        # rows on both sides of the boundary: each row gets its expert and scale
        mixed = a14b.predict(x, torch.tensor([900.0, 500.0]), cond)
        torch.testing.assert_close(mixed[:1], a14b.predict(x[:1], high, cond.select([0])), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(mixed[1:], a14b.predict(x[1:], low, cond.select([1])), atol=1e-6, rtol=1e-5)


def test_rollout_records_experts_and_rescore_is_exact(a14b):
    """A flow_grpo rollout records the expert of every transition; re-scoring a transition (inside
    ``pinned_expert``) gives exactly its recorded log-prob, and pinning the other expert does not."""
    from align.sampling.rescore import rescore
    from align.sampling.rollout import RolloutConfig, rollout

    cond = a14b.encode(PROMPTS, "blurry", 3.0, guidance_scale_2=2.0)
    config = RolloutConfig(num_steps=STEPS, kernel="flow_grpo", guidance_scale=3.0)
    with torch.no_grad():
        result = rollout(a14b, cond, config, group_size=2, generator=torch.Generator().manual_seed(0), **A14B_SIZE)
        assert [t.expert for t in result.transitions] == [0, 1, 1, 1]
        for transition in result.transitions:
            again = rescore(a14b, transition, cond, result.schedule, config)
            assert torch.equal(again.log_prob, transition.log_prob), transition.step
        wrong = result.transitions[1]
        wrong.expert = 0
        assert not torch.allclose(rescore(a14b, wrong, cond, result.schedule, config).log_prob,
                                  result.transitions[1].log_prob)


# --- training one expert ------------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [True, False])
def test_training_the_low_noise_expert_leaves_the_other_bit_identical(dirs, tmp_path, lora):
    """One Flow-GRPO iteration (its rollout runs both experts; its PPO steps cover both) with
    model.train_experts=low_noise, LoRA or full fine-tuning: the high-noise expert's weights are
    bit-identical afterwards, the low-noise expert's changed."""
    from align.config import load_config
    from align.trainers import trainer_module

    adapter = _load(dirs, "a14b")
    high_before = {k: v.clone() for k, v in adapter.pipe.transformer.state_dict().items()}
    low_before = {k: v.clone() for k, v in adapter.pipe.transformer_2.state_dict().items()}
    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, None, [
        "model.name=wan22", "model.device=cpu", "model.height=32", "model.width=32", "model.num_frames=5",
        "model.train_experts=low_noise", "rewards=[jpeg_compressibility]", "iterations=1",
        "prompts=['a photo of a cat', 'a red car']", "prompts_per_iteration=2", "group_size=2",
        "eval_prompts=['a red car']", f"rollout.num_steps={STEPS}", "rollout.guidance_scale=3.0", "lora.rank=4",
        "lora.alpha=4", f"lora.enabled={str(lora).lower()}", "optim.lr=0.01", "eval.per_prompt=1",
        "eval.num_steps=2", "run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0",
        f"run.output_dir={tmp_path}"])
    module.train(config, adapter=adapter)
    assert adapter.train_experts == "low_noise"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in rows if "train/loss" in m)
    assert first["train/grad_norm"] > 0 and first["train/ratio_mean"] == 1.0
    high_after = adapter.pipe.transformer.state_dict()
    assert high_after.keys() == high_before.keys(), "no LoRA on the high-noise expert"
    assert all(torch.equal(high_after[k], v) for k, v in high_before.items())
    if lora:
        lora_b = [p for n, p in adapter.pipe.transformer_2.named_parameters() if "lora_B" in n]
        assert lora_b and any(torch.count_nonzero(p) for p in lora_b)
        assert not _tensor_names(tmp_path / "lora" / HIGH_NOISE_LORA_FILE)  # no high-noise weights
        assert _tensor_names(tmp_path / "lora" / LOW_NOISE_LORA_FILE)
    else:
        low_after = adapter.pipe.transformer_2.state_dict()
        assert any(not torch.equal(low_after[k], v) for k, v in low_before.items())


# --- LoRA -----------------------------------------------------------------------------------------------
def test_lora_on_both_experts_loads_in_the_stock_pipeline(a14b, dirs, tmp_path):
    """add_lora puts a LoRA on each expert; the export loads into a fresh stock ``WanPipeline``
    (``load_lora_weights(dir)`` for the high-noise expert, ``weight_name=LOW_NOISE_LORA_FILE,
    load_into_transformer_2=True`` for the low-noise one) and predicts as the trained adapter at
    both experts' timesteps; ``unload_lora_weights()`` restores the base model bit-exactly;
    ``disable_adapter`` gives the base model exactly."""
    from diffusers import WanPipeline

    cond = a14b.encode(PROMPTS[:1], "blurry", 3.0)
    x = _noise(a14b, A14B_SIZE)
    times = (torch.tensor(950.0), torch.tensor(400.0))
    trainable, base, tuned = assert_lora_attaches_and_disables(a14b, x, times, cond)
    assert {n.split(".")[0] for n in trainable} == {"transformer", "transformer_2"}
    export = a14b.export_lora(tmp_path / "lora")

    fresh = WanPipeline.from_pretrained(dirs["a14b"])
    fresh.load_lora_weights(str(export))  # the stock call: the high-noise expert
    reloaded = Wan22Adapter(fresh, max_sequence_length=SEQ)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.predict(x, times[0], cond), tuned[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(reloaded.predict(x, times[1], cond), base[1])
    fresh.load_lora_weights(str(export), weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)
    with torch.no_grad():
        for t, o in zip(times, tuned):
            torch.testing.assert_close(reloaded.predict(x, t, cond), o, atol=1e-5, rtol=1e-5)
    fresh.unload_lora_weights()
    with torch.no_grad():
        assert all(torch.equal(reloaded.predict(x, t, cond), b) for t, b in zip(times, base))

    # the adapter's own load_lora attaches both files, under a name
    again = _load(dirs, "a14b")
    again.load_lora(export, name="trained")
    assert again.lora_names() == ["trained"]
    with torch.no_grad():
        for t, o in zip(times, tuned):
            torch.testing.assert_close(again.predict(x, t, cond), o, atol=1e-5, rtol=1e-5)
        again.use_lora(None)
        assert all(torch.equal(again.predict(x, t, cond), b) for t, b in zip(times, base))


def test_low_noise_lora_export_and_reload(dirs, tmp_path):
    """A LoRA on the low-noise expert only: the export's default file holds no weights (the plain
    stock call loads nothing), the low-noise file loads into transformer_2; the project's load_lora
    reproduces the trained outputs."""
    from diffusers import WanPipeline

    trained = _load(dirs, "a14b", train_experts="low_noise")
    cond = trained.encode(PROMPTS[:1], "blurry", 3.0)
    x = _noise(trained, A14B_SIZE)
    times = (torch.tensor(950.0), torch.tensor(400.0))
    with torch.no_grad():
        base = [trained.predict(x, t, cond) for t in times]
    trained.add_lora(rank=4, alpha=8)
    assert not any("lora_" in n for n, _ in trained.pipe.transformer.named_parameters())
    perturb_lora(trained.denoiser)
    with torch.no_grad():
        tuned = [trained.predict(x, t, cond) for t in times]
    assert torch.equal(tuned[0], base[0]) and not torch.allclose(tuned[1], base[1], atol=1e-4)
    export = trained.export_lora(tmp_path / "lora")
    assert set(trained.lora_state()) and all(k.startswith("transformer_2.") for k in trained.lora_state())

    fresh = WanPipeline.from_pretrained(dirs["a14b"])
    fresh.load_lora_weights(str(export))
    fresh.load_lora_weights(str(export), weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)
    reloaded = Wan22Adapter(fresh, max_sequence_length=SEQ)
    with torch.no_grad():
        for t, o in zip(times, tuned):
            torch.testing.assert_close(reloaded.predict(x, t, cond), o, atol=1e-5, rtol=1e-5)

    again = _load(dirs, "a14b")
    again.load_lora(export)
    with torch.no_grad():
        for t, o in zip(times, tuned):
            torch.testing.assert_close(again.predict(x, t, cond), o, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one transformer"):
        _load(dirs, "ti2v").load_lora(export)


def test_ti2v_lora_loads_in_the_stock_pipeline(ti2v, dirs, tmp_path):
    from diffusers import WanPipeline

    cond = ti2v.encode(PROMPTS[:1], "blurry", 3.0, images=[_image()])
    x, t = _noise(ti2v, TI2V_SIZE), torch.tensor(700.0)
    _, base, tuned = assert_lora_attaches_and_disables(ti2v, x, t, cond)
    export = ti2v.export_lora(tmp_path / "lora")
    assert not (export / LOW_NOISE_LORA_FILE).exists()
    fresh = WanPipeline.from_pretrained(dirs["ti2v"])
    fresh.load_lora_weights(str(export))
    reloaded = Wan22Adapter(fresh, max_sequence_length=SEQ)
    assert_stock_pipeline_loads_the_lora(reloaded, export, x, t, cond, tuned, base=base, preloaded=True)


def test_attention_backend_through_dispatch(a14b):
    cond = a14b.encode(PROMPTS[:1], "blurry", 3.0)
    times = (torch.tensor(950.0), torch.tensor(400.0))  # both experts
    assert_dispatched_backend_predicts_the_same(a14b, _noise(a14b, A14B_SIZE), times, cond)
    for expert in a14b.denoiser.experts:
        processors = [m.processor for m in expert.modules() if getattr(m, "processor", None) is not None]
        assert processors and all(p._attention_backend == "_native_math" for p in processors)


@pytest.mark.parametrize("key", ["a14b", "ti2v"])
def test_bfloat16(dirs, key):
    """bfloat16 loading: predictions (both experts, the image frame) and videos come out float32."""
    adapter = _load(dirs, key, dtype=torch.bfloat16)
    assert adapter.dtype == torch.bfloat16
    size = A14B_SIZE if key == "a14b" else TI2V_SIZE
    images = None if key == "a14b" else [_image()]
    cond = adapter.encode(PROMPTS[:1], "blurry", 3.0, images=images)
    x = _noise(adapter, size)
    with torch.no_grad():
        outs = [adapter.predict(x, torch.tensor(t), cond) for t in (950.0, 400.0)]
        video = adapter.decode(adapter.apply_condition(x, cond))
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in outs)
    assert video.dtype == torch.float32 and video.shape == (1, 5, 3, size["height"], size["width"])
