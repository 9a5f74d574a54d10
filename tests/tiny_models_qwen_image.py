"""A tiny random Qwen-Image pipeline (``QwenImagePipeline``) built in code, for offline CPU tests.

The parts are the real classes with tiny sizes: a ``Qwen2_5_VLForConditionalGeneration`` text encoder
(hidden 32, two layers, a one-block vision tower the text-to-image path never runs), a real
byte-level BPE ``Qwen2Tokenizer``, an ``AutoencoderKLQwenImage`` (4x spatial compression, 4 latent
channels), a ``QwenImageTransformer2DModel`` over packed 2x2 latents and the
``FlowMatchEulerDiscreteScheduler`` configured as the released Qwen/Qwen-Image checkpoint ships it.

The tokenizer's merges are learnt offline from the pipeline's own prompt template and the shared test
words, so every word of the template's system prompt is one token: the template prefix the pipeline
drops (``prompt_template_encode_start_idx`` = 34 tokens: the system prompt and
``<|im_start|>user\\n``) is exactly that prefix, as with the released tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from tests.tiny_models import _WORDS, HIDDEN, _save
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import _WORDS, HIDDEN, _save

#: the scheduler of the released Qwen/Qwen-Image checkpoint (scheduler/scheduler_config.json)
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "invert_sigmas": False, "max_image_seq_len": 8192,
    "max_shift": 0.9, "num_train_timesteps": 1000, "shift": 1.0, "shift_terminal": 0.02,
    "stochastic_sampling": False, "time_shift_type": "exponential", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}
#: tokens the pipeline drops from the front of every encoded prompt (its template's system prompt)
TEMPLATE_DROP = 34
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: the vision tokens of the editing pipelines' templates (the image placeholder and its brackets)
VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
VOCAB_SIZE = 600


def qwen2_tokenizer(template: str, *, vision: bool = False):
    """A real ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer regex) whose merges are learnt
    from ``template`` (with its special tokens removed) and the shared test words; ``vision`` adds
    the vision tokens as special tokens (the editing pipelines' templates hold them)."""
    import json

    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.NFC()
    learner.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    text = template.format("")
    for special in SPECIAL_TOKENS + VISION_TOKENS:
        text = text.replace(special, "\n")
    corpus = [text] * 8 + [" ".join(_WORDS)] * 2
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    learner.train_from_iterator(corpus, trainer)
    model = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = model["vocab"]
    specials = list(SPECIAL_TOKENS[1:]) + (list(VISION_TOKENS) if vision else [])
    return Qwen2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=specials,
                          model_max_length=2048)


def qwen25_vl_text_encoder(tokenizer, *, hidden: int = HIDDEN, seed: int = 0):
    """A two-layer ``Qwen2_5_VLForConditionalGeneration`` (head dim 16, multimodal RoPE sections
    summing to 8) with a one-block vision tower."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer) + 3, "hidden_size": hidden, "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
            "fullatt_block_indexes": [0],
        },
        # the tokenizer's vision tokens, else ids past its vocabulary (text prompts never contain them)
        image_token_id=_token_id(tokenizer, "<|image_pad|>", len(tokenizer)), video_token_id=len(tokenizer) + 1,
        vision_start_token_id=_token_id(tokenizer, "<|vision_start|>", len(tokenizer) + 2),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _token_id(tokenizer, token: str, default: int) -> int:
    found = tokenizer.convert_tokens_to_ids(token)
    return default if found is None or found == tokenizer.unk_token_id else int(found)


def tiny_qwen_vae(z_dim: int = 4, *, seed: int = 0):
    """``AutoencoderKLQwenImage`` with two down-sampling stages (4x spatial) and per-channel
    latent statistics away from (0, 1), so the adapter's normalisation is exercised."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3][:z_dim], latents_std=[1.5, 0.8, 1.2, 2.0][:z_dim],
    ).eval()


def build_qwen_image(directory, *, seed: int = 0, guidance_embeds: bool = False) -> Path:
    """QwenImagePipeline: Qwen2.5-VL text encoder, Qwen-Image MMDiT over packed 2x2 latents of a
    4-channel, 4x VAE; 32 px images give a 4x4 grid of 16 tokens of 16 channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    vae = tiny_qwen_vae(seed=seed + 2)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=HIDDEN, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    # the tokenizer learns its merges from the template this diffusers version encodes with
    tokenizer = qwen2_tokenizer(pipe.prompt_template_encode)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=qwen25_vl_text_encoder(tokenizer, seed=seed + 1))
    return _save(pipe, directory)


def build_qwen_image_edit(directory, *, plus: bool = False, seed: int = 0) -> Path:
    """QwenImageEditPipeline (``plus``: QwenImageEditPlusPipeline, several source images): the Qwen-Image
    parts of :func:`build_qwen_image` with a ``Qwen2VLProcessor`` (the stock Qwen2-VL image processor:
    14 px patches merged 2 x 2, at least 56 x 56 pixels) whose tokenizer knows the vision tokens, so the
    Qwen2.5-VL encoder sees the source image."""
    from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pipeline_class = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    vae = tiny_qwen_vae(seed=seed + 2)
    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=HIDDEN, axes_dims_rope=(4, 6, 6),
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = pipeline_class(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, processor=None,
                          transformer=transformer)
    tokenizer = qwen2_tokenizer(pipe.prompt_template_encode, vision=True)
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor())
    pipe.register_modules(tokenizer=tokenizer, processor=processor,
                          text_encoder=qwen25_vl_text_encoder(tokenizer, seed=seed + 1))
    return _save(pipe, directory)
