"""Tiny random diffusers pipelines built in code, for tests that must run offline on a CPU.

Each ``build_*`` function constructs a real diffusers pipeline (real tokenizers, real text encoders,
VAE, denoiser and scheduler classes, all with tiny random weights), saves it with
``save_pretrained`` into ``directory`` and returns that directory, so tests load it back through the
adapters' ``from_pretrained`` exactly as a user loads a hub checkpoint.

Tokenizers are real: the CLIP tokenizer is a byte-level BPE over the first merges of the vocabulary
that ``open_clip`` ships, and the T5 / UMT5 tokenizers are small unigram models, so prompt strings
go through each pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import gzip
import os
import string
from functools import lru_cache
from pathlib import Path

import torch

#: sizes shared by the builders
HIDDEN = 32
CLIP_MAX_LENGTH = 16
T5_MAX_LENGTH = 16
NUM_MERGES = 1000

_WORDS = (
    "a an the of and in on with at to photo picture painting drawing image of cat dog bird horse "
    "fish car tree house city street red green blue yellow black white small large big old young "
    "happy sitting running flying standing beautiful cute astronaut riding sky sea mountain forest "
    "night day sun moon snow rain high quality detailed blurry ugly low"
).split()


# --- tokenizers ---------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _clip_vocab(num_merges: int = NUM_MERGES) -> tuple[dict[str, int], list[tuple[str, str]]]:
    import open_clip
    from tokenizers import pre_tokenizers

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        fh.readline()  # version header
        merges = []
        for line in fh:
            parts = line.split()
            if len(parts) == 2:
                merges.append((parts[0], parts[1]))
            if len(merges) == num_merges:
                break
    # byte-level alphabet (the characters the ByteLevel pre-tokenizer emits), then the same with
    # the end-of-word marker, then one token per merge, then the two special tokens
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in tokens:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def clip_tokenizer(max_length: int = CLIP_MAX_LENGTH):
    """A real byte-level BPE CLIP tokenizer with a vocabulary of about 1500 tokens."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=max_length)


def _unigram_pieces() -> list[tuple[str, float]]:
    # T5's sentencepiece conventions: pad 0, eos 1, unk 2; "▁" marks the start of a word
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -8.0) for c in chars]
    pieces += [("\u2581" + c, -7.0) for c in chars]
    pieces += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(_WORDS)]
    seen, out = set(), []
    for p in pieces:
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


def t5_tokenizer(max_length: int = T5_MAX_LENGTH):
    """A real unigram T5 tokenizer (tokenizers backend) with a few hundred pieces."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=_unigram_pieces(), extra_ids=0, model_max_length=max_length)


# --- text encoders ------------------------------------------------------------------------------
def clip_text_encoder(tokenizer, *, projection: bool, hidden: int = HIDDEN, projection_dim: int = HIDDEN,
                      seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length, projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    torch.manual_seed(seed)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def t5_text_encoder(tokenizer, *, umt5: bool = False, hidden: int = HIDDEN, seed: int = 0):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kwargs = dict(vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1,
                  num_heads=4, relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
                  eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    if umt5:
        return UMT5EncoderModel(UMT5Config(**kwargs)).eval()
    return T5EncoderModel(T5Config(**kwargs)).eval()


def tiny_vae(latent_channels: int = 4, *, scaling_factor: float = 0.5, shift_factor: float | None = None,
             latents_mean=None, latents_std=None, seed: int = 0):
    """AutoencoderKL with two blocks: 2x spatial compression."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32, scaling_factor=scaling_factor,
        shift_factor=shift_factor, latents_mean=latents_mean, latents_std=latents_std,
    ).eval()


def _save(pipe, directory) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pipe.save_pretrained(directory)
    return directory


# --- pipelines ----------------------------------------------------------------------------------
def build_sd3(directory, *, with_t5: bool = False, seed: int = 0, dual_attention_layers: tuple = ()) -> Path:
    """StableDiffusion3Pipeline: two CLIP encoders (+ optional T5), SD3 transformer, 32 px images;
    ``dual_attention_layers``: the blocks with SD3.5-Medium's second self-attention (``attn2``)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    te = clip_text_encoder(tok, projection=True, seed=seed + 1)
    te2 = clip_text_encoder(tok2, projection=True, seed=seed + 2)
    tok3 = t5_tokenizer() if with_t5 else None
    te3 = t5_text_encoder(tok3, hidden=2 * HIDDEN, seed=seed + 3) if with_t5 else None
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=2 * HIDDEN, caption_projection_dim=HIDDEN,
        pooled_projection_dim=2 * HIDDEN, pos_embed_max_size=16, dual_attention_layers=tuple(dual_attention_layers),
    ).eval()
    vae = tiny_vae(4, scaling_factor=1.5, shift_factor=0.06, seed=seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
    )
    return _save(pipe, directory)


def build_flux(directory, *, guidance_embeds: bool = True, seed: int = 0, kontext: bool = False) -> Path:
    """FluxPipeline (``kontext``: FluxKontextPipeline, the same components): CLIP (pooled) + T5, FLUX
    transformer over packed 2x2 latents, 32 px images."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxPipeline, FluxTransformer2DModel

    tok, tok2 = clip_tokenizer(), t5_tokenizer()
    te = clip_text_encoder(tok, projection=False, seed=seed + 1)
    te2 = t5_text_encoder(tok2, seed=seed + 2)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=HIDDEN, pooled_projection_dim=HIDDEN,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()
    vae = tiny_vae(4, scaling_factor=0.4, shift_factor=0.1, seed=seed + 3)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
        base_shift=0.5, max_shift=1.15,
    )
    pipeline_class = FluxKontextPipeline if kontext else FluxPipeline
    pipe = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=te, tokenizer=tok, text_encoder_2=te2,
                          tokenizer_2=tok2, transformer=transformer)
    return _save(pipe, directory)


def build_wan(directory, *, seed: int = 0, unipc: bool = True) -> Path:
    """WanPipeline (text-to-video): UMT5 encoder, Wan transformer, causal 3D VAE (8x spatial, 4x time)."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler,
                           WanPipeline, WanTransformer3DModel)

    tok = t5_tokenizer()
    te = t5_text_encoder(tok, umt5=True, seed=seed + 1)
    z = 4
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3][:z], latents_std=[1.5, 0.8, 1.2, 2.0][:z],
    ).eval()
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=z, out_channels=z,
        text_dim=HIDDEN, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()
    if unipc:  # what the released Wan 2.1 checkpoints ship
        scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                            flow_shift=3.0)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=scheduler, transformer=transformer)
    return _save(pipe, directory)


def _tiny_unet(cross_attention_dim: int, *, sdxl: bool, seed: int):
    from diffusers import UNet2DConditionModel

    kwargs = {}
    if sdxl:
        kwargs = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=6 * 8 + HIDDEN)
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=(2, 4), norm_num_groups=8,
        use_linear_projection=True, **kwargs,
    ).eval()


def _ddpm_scheduler_config(prediction_type: str) -> dict:
    # the values of the released SD / SDXL scheduler configs (loaded with ``from_config`` as a
    # ``scheduler_config.json`` is: keys the class does not take are kept in its config)
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def build_sd(directory, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """StableDiffusionPipeline (SD 1.x / 2.x layout): one CLIP encoder, UNet, PNDM scheduler."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tok = clip_tokenizer()
    te = clip_text_encoder(tok, projection=False, seed=seed + 1)
    unet = _tiny_unet(HIDDEN, sdxl=False, seed=seed)
    vae = tiny_vae(4, scaling_factor=0.18215, seed=seed + 2)
    scheduler = PNDMScheduler.from_config({**_ddpm_scheduler_config(prediction_type), "skip_prk_steps": True})
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, directory)


def build_sdxl(directory, *, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """StableDiffusionXLPipeline: two CLIP encoders, UNet with text_time added conditioning."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    te = clip_text_encoder(tok, projection=False, seed=seed + 1)
    te2 = clip_text_encoder(tok2, projection=True, seed=seed + 2)
    unet = _tiny_unet(2 * HIDDEN, sdxl=True, seed=seed)
    vae = tiny_vae(4, scaling_factor=0.13025, seed=seed + 3)
    scheduler = EulerDiscreteScheduler.from_config({**_ddpm_scheduler_config(prediction_type),
                                                    "timestep_spacing": "leading"})
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok,
                                     tokenizer_2=tok2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=False)
    return _save(pipe, directory)


BUILDERS = {"sd3": build_sd3, "flux": build_flux, "wan": build_wan, "sd": build_sd, "sdxl": build_sdxl}


def model_dir_cache(root, builders: dict):
    """``get(name) -> directory``: builds model ``name`` with ``builders[name](root / name)`` the
    first time it is asked for, then returns the same directory (a module fixture's cache)."""
    cache: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in cache:
            cache[name] = str(builders[name](Path(root) / name))
        return cache[name]

    return get


# --- Qwen-Image, FLUX.2, Z-Image, Wan 2.2, HunyuanVideo 1.5 (builders in tests/tiny_models_<family>.py) -
#: case -> (adapter name, "module:builder", builder kwargs, size overrides, guidance of the rollout,
#: tasks). The folder a case is built in is named after the case (Z-Image-Turbo is told by its name).
FAMILY_CASES: dict[str, tuple] = {
    "qwen_image": ("qwen_image", "tiny_models_qwen_image:build_qwen_image", {}, (32, 32, None), 4.0, "t2i"),
    "flux2": ("flux2", "tiny_models_flux2:build_flux2", {}, (32, 32, None), 4.0, "t2i"),
    "flux2_klein": ("flux2_klein", "tiny_models_flux2:build_flux2_klein", {}, (32, 32, None), 3.0, "t2i"),
    "z_image": ("z_image", "tiny_models_z_image:build_z_image", {}, (32, 32, None), 4.0, "t2i"),
    "z_image_turbo": ("z_image", "tiny_models_z_image:build_z_image", {"distilled": True}, (32, 32, None), 1.0,
                      "t2i"),
    "wan22_a14b": ("wan22", "tiny_models_wan22:build_wan22_a14b", {}, (32, 32, 5), 3.0, "t2v"),
    "wan22_ti2v": ("wan22", "tiny_models_wan22:build_wan22_ti2v", {}, (64, 64, 5), 3.0, "t2v"),
    "wan22_i2v": ("wan22", "tiny_models_wan22:build_wan22_ti2v", {}, (64, 64, 5), 3.0, "i2v"),
    "hunyuan_video15": ("hunyuan_video15", "tiny_models_hunyuan_video15:build_hunyuan_video15", {}, (32, 32, 5), 3.0,
                        "t2v"),
    "hunyuan_video15_i2v": ("hunyuan_video15_i2v", "tiny_models_hunyuan_video15:build_hunyuan_video15_i2v", {},
                            (32, 32, 5), 3.0, "i2v"),
    "flux_kontext": ("flux_kontext", "tiny_models:build_flux", {"kontext": True}, (32, 32, None), 2.5, "edit"),
    "flux2_edit": ("flux2", "tiny_models_flux2:build_flux2", {}, (32, 32, None), 4.0, "edit"),
    "qwen_image_edit": ("qwen_image_edit", "tiny_models_qwen_image:build_qwen_image_edit", {}, (32, 32, None), 4.0,
                        "edit"),
    "qwen_image_edit_plus": ("qwen_image_edit", "tiny_models_qwen_image:build_qwen_image_edit", {"plus": True},
                             (32, 32, None), 4.0, "edit"),
}
#: the side of the sources the tiny editing stand-ins see (64 px: FLUX.2's pipeline takes no smaller
#: reference; the released editing models bring theirs to about 1024^2 pixels)
EDIT_SOURCE_SIZE = 64


def build_family(case: str, root) -> Path:
    """Build the tiny stand-in of ``FAMILY_CASES[case]`` in ``root / case`` and return the folder."""
    import importlib

    _, target, kwargs, *_ = FAMILY_CASES[case]
    module_name, function = target.split(":")
    try:
        module = importlib.import_module(f"tests.{module_name}")
    except ImportError:  # tests/ on sys.path
        module = importlib.import_module(module_name)
    return getattr(module, function)(Path(root) / case, **kwargs)


def family_overrides(case: str) -> list[str]:
    """The config overrides a tiny stand-in needs: its size (and frames; an editing model's source size)."""
    from align.models import SOURCE_SIZE_MODELS

    height, width, frames = FAMILY_CASES[case][3]
    sources = [f"model.source_size={EDIT_SOURCE_SIZE}"] if FAMILY_CASES[case][0] in SOURCE_SIZE_MODELS else []
    return [f"model.height={height}", f"model.width={width}"] + ([f"model.num_frames={frames}"] if frames else []) \
        + sources


def write_family_prompts(case: str, prompts, folder) -> list[str]:
    """For a case whose task takes an image (i2v, edit): a JSONL prompt file in ``folder`` giving each
    prompt one image (the first frame, or the source: 64 x 64 for editing), and the overrides that
    read it as the run's prompts and evaluation prompts; [] for text-only cases."""
    import json

    from PIL import Image

    task = FAMILY_CASES[case][5]
    if task not in ("i2v", "edit"):
        return []
    side = EDIT_SOURCE_SIZE if task == "edit" else FAMILY_CASES[case][3][0]
    Image.new("RGB", (side, side), (200, 40, 40)).save(Path(folder) / "first.png")
    file = Path(folder) / "prompts.jsonl"
    file.write_text("".join(json.dumps({"prompt": p, "image": "first.png"}) + "\n" for p in prompts))
    return [f"prompt_file={file}", f"eval_prompt_file={file}"]


# --- shared checks of the adapter tests ---------------------------------------------------------
def load_quietly(name: str, path, **kwargs):
    """``load_adapter(name, path, **kwargs)`` with the pipeline's progress bar switched off."""
    from pipelines.registry import load_adapter

    adapter = load_adapter(name, str(path), **kwargs)
    adapter.pipe.set_progress_bar_config(disable=True)
    return adapter


def euler(adapter, cond, x, schedule):
    """The plain Euler loop of the flow pipelines over ``schedule`` (no gradients): the final latents."""
    with torch.no_grad():
        for i in range(len(schedule)):
            x = x + (schedule.levels[i + 1] - schedule.levels[i]) * adapter.predict(x, schedule.timesteps[i], cond)
    return x


def perturb_lora(module, seed: int = 3) -> None:
    """Draw every ``lora_B`` of ``module`` from N(0, 0.5^2) (seeded): a LoRA that changes the model."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)


def _at_each(t, fn) -> list:
    # ``t`` is one timestep or a tuple of them (one per expert of a multi-expert model)
    return [fn(s) for s in (t if isinstance(t, (tuple, list)) else (t,))]


def _as_given(t, values: list):
    return values if isinstance(t, (tuple, list)) else values[0]


def assert_lora_attaches_and_disables(adapter, x, t, cond, rank: int = 4, alpha: float = 8):
    """``add_lora`` makes the LoRA weights (and only those) trainable, and a fresh LoRA (lora_B at zero)
    changes nothing; perturbed (:func:`perturb_lora`) it changes the prediction, ``disable_adapter``
    gives the base model exactly and the LoRA is on again after the context. ``t``: a timestep or a
    tuple of them. Returns (trainable parameter names, base, tuned) predictions (lists for a tuple)."""
    with torch.no_grad():
        base = _at_each(t, lambda s: adapter.predict(x, s, cond))
    adapter.add_lora(rank=rank, alpha=alpha)
    trainable = [n for n, p in adapter.denoiser.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(adapter.trainable_parameters()) == len(trainable)
    lora_b = [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b), "gaussian init keeps lora_B at zero"
    with torch.no_grad():
        fresh = _at_each(t, lambda s: adapter.predict(x, s, cond))
        assert all(torch.equal(f, b) for f, b in zip(fresh, base)), "a fresh LoRA must not change the model"
        perturb_lora(adapter.denoiser)
        tuned = _at_each(t, lambda s: adapter.predict(x, s, cond))
        with adapter.disable_adapter():
            reference = _at_each(t, lambda s: adapter.predict(x, s, cond))
        again = _at_each(t, lambda s: adapter.predict(x, s, cond))
    assert all(not torch.allclose(o, b, atol=1e-4) for o, b in zip(tuned, base)), "the LoRA matters"
    assert all(torch.equal(r, b) for r, b in zip(reference, base)), "disable_adapter gives the base model exactly"
    assert all(torch.equal(a, o) for a, o in zip(again, tuned)), "adapters are re-enabled after the context"
    return trainable, _as_given(t, base), _as_given(t, tuned)


def assert_stock_pipeline_loads_the_lora(stock, export, x, t, cond, tuned, *, base=None, preloaded=False,
                                         reloaded=None, load=None, unload=None):
    """``stock`` wraps a fresh stock diffusers pipeline: loading the exported LoRA folder with the
    pipeline's own ``load_lora_weights`` (or ``load(folder)``) makes it predict ``tuned`` (the trained
    adapter's prediction), and ``unload_lora_weights`` (or ``unload()``) restores its base prediction
    bit for bit, which is ``base`` (the trained adapter's before its LoRA) when given. ``preloaded``:
    ``stock`` was built over the pipeline after it loaded the folder (a user's order; ``base`` needed).
    ``reloaded``: a freshly loaded adapter whose own ``load_lora`` must reproduce ``tuned`` as well."""
    pipe = stock.pipe
    load = load or (lambda folder: pipe.load_lora_weights(str(folder)))
    unload = unload or pipe.unload_lora_weights
    with torch.no_grad():
        if preloaded:
            assert base is not None, "a pipeline wrapped after loading the LoRA compares with base"
            before = base
        else:
            before = stock.predict(x, t, cond)
            load(export)
        loaded = stock.predict(x, t, cond)
        unload()
        unloaded = stock.predict(x, t, cond)
    assert not torch.allclose(loaded, before, atol=1e-4), "the LoRA matters"
    torch.testing.assert_close(loaded, tuned, rtol=1e-5, atol=1e-5)
    assert torch.equal(unloaded, before), "unloading the LoRA restores the base model"
    if base is not None:
        assert torch.equal(before, base), "the stock pipeline's base model is the adapter's"
    if reloaded is not None:
        reloaded.load_lora(export)
        with torch.no_grad():
            torch.testing.assert_close(reloaded.predict(x, t, cond), tuned, rtol=1e-5, atol=1e-5)


def assert_dispatched_backend_predicts_the_same(adapter, x, t, cond, backend: str = "_native_math", *,
                                                every: bool = True):
    """``apply_attention_backend(adapter, backend)`` puts every attention processor of the denoiser on
    diffusers' dispatch with that backend (``every=False``: at least one, for a denoiser that also has
    legacy processors outside the dispatch), and the predictions stay within 1e-5 of the default
    backend's. ``t``: a timestep or a tuple of them."""
    from align.attention import apply_attention_backend

    with torch.no_grad():
        native = _at_each(t, lambda s: adapter.predict(x, s, cond))
        apply_attention_backend(adapter, backend)
        processors = [m.processor for m in adapter.base_denoiser.modules() if getattr(m, "processor", None) is not None]
        on_backend = [getattr(p, "_attention_backend", None) == backend for p in processors]
        assert processors and (all(on_backend) if every else any(on_backend))
        dispatched = _at_each(t, lambda s: adapter.predict(x, s, cond))
    for d, n in zip(dispatched, native):
        torch.testing.assert_close(d, n, atol=1e-5, rtol=0)
