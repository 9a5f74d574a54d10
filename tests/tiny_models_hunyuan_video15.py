"""Tiny random HunyuanVideo 1.5 pipelines (``HunyuanVideo15Pipeline`` and
``HunyuanVideo15ImageToVideoPipeline``) built in code, for offline CPU tests.

The parts are the real classes with tiny sizes:

* ``Qwen2_5_VLTextModel`` (hidden 32, two layers: the pipeline reads the third-last hidden state)
  with a real byte-level BPE ``Qwen2Tokenizer`` whose merges are learnt from the pipeline's own
  system message, so the chat-template prefix the pipeline crops (``prompt_template_encode_start_idx``
  = 108 tokens: ``<|im_start|>system\\n`` + system message + ``<|im_end|>\\n<|im_start|>user\\n``) is
  exactly that prefix, as with the released tokenizer;
* ``T5EncoderModel`` + ``ByT5Tokenizer`` (bytes, no vocabulary file) for the quoted glyph text;
* ``AutoencoderKLHunyuanVideo15`` with 8x spatial and 4x temporal compression and 4 latent channels;
* ``HunyuanVideo15Transformer3DModel`` taking 2 * 4 + 1 = 9 input channels (noisy latent, condition
  latent, condition mask), with ``target_size`` 32 (the i2v pipeline's size bucket of a 32 px image);
* ``FlowMatchEulerDiscreteScheduler`` (shift 5) and the ``ClassifierFreeGuidance`` guider;
* for image-to-video, ``SiglipVisionModel`` (32 px, 8 px patches: 16 image tokens) and its
  ``SiglipImageProcessor``.

32x32 videos of 5 frames have latents (4, 2, 4, 4).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

try:
    from tests.tiny_models import HIDDEN, _save
    from tests.tiny_models_qwen_image import qwen2_tokenizer
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import HIDDEN, _save
    from tiny_models_qwen_image import qwen2_tokenizer

LATENT_CHANNELS = 4
SIZE = 32
#: Qwen2.5-VL's chat template for text-only conversations (the pipeline calls apply_chat_template)
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
                 "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def hunyuan_tokenizer():
    """``Qwen2Tokenizer`` with the chat template, its merges learnt from the pipeline's system message."""
    from diffusers import HunyuanVideo15Pipeline

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    template = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"
    tokenizer = qwen2_tokenizer(template)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def qwen25_vl_text_model(tokenizer, *, hidden: int = HIDDEN, seed: int = 0):
    """A two-layer ``Qwen2_5_VLTextModel`` (head dim 16, multimodal RoPE sections summing to 8)."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    config = Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLTextModel(config).eval()


def byt5_encoder(tokenizer, *, hidden: int = HIDDEN, seed: int = 0):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=hidden, d_kv=8, d_ff=2 * hidden, num_layers=1, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, feed_forward_proj="gated-gelu",
    )).eval()


def tiny_hunyuan_vae(*, seed: int = 0):
    from diffusers import AutoencoderKLHunyuanVideo15

    torch.manual_seed(seed)
    return AutoencoderKLHunyuanVideo15(
        latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        spatial_compression_ratio=8, temporal_compression_ratio=4, scaling_factor=0.7,
    ).eval()


def tiny_hunyuan_transformer(*, image_embed_dim: int = HIDDEN, task_type: str = "t2v", use_meanflow: bool = False,
                             seed: int = 0):
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * LATENT_CHANNELS + 1, out_channels=LATENT_CHANNELS, num_attention_heads=2,
        attention_head_dim=16, num_layers=2, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=HIDDEN, text_embed_2_dim=HIDDEN, image_embed_dim=image_embed_dim, rope_axes_dim=(4, 6, 6),
        target_size=SIZE, task_type=task_type, use_meanflow=use_meanflow,
    ).eval()


def _parts(seed: int, task_type: str, use_meanflow: bool = False) -> dict:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler
    from transformers import ByT5Tokenizer

    tokenizer, tokenizer_2 = hunyuan_tokenizer(), ByT5Tokenizer()
    return dict(
        tokenizer=tokenizer, text_encoder=qwen25_vl_text_model(tokenizer, seed=seed + 1),
        tokenizer_2=tokenizer_2, text_encoder_2=byt5_encoder(tokenizer_2, seed=seed + 2),
        vae=tiny_hunyuan_vae(seed=seed + 3),
        transformer=tiny_hunyuan_transformer(task_type=task_type, use_meanflow=use_meanflow, seed=seed),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0),
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


def build_hunyuan_video15(directory, *, seed: int = 0) -> Path:
    """HunyuanVideo15Pipeline (text-to-video): Qwen2.5-VL + ByT5 text encoders, 9-channel transformer."""
    from diffusers import HunyuanVideo15Pipeline

    return _save(HunyuanVideo15Pipeline(**_parts(seed, "t2v")), directory)


def build_hunyuan_video15_i2v(directory, *, seed: int = 0, use_meanflow: bool = False) -> Path:
    """HunyuanVideo15ImageToVideoPipeline: the text-to-video parts plus a SigLIP image encoder whose
    16 patch tokens condition the transformer, and the first frame's VAE latent."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed + 4)
    image_encoder = SiglipVisionModel(SiglipVisionConfig(
        hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=1, num_attention_heads=2,
        image_size=SIZE, patch_size=8)).eval()
    feature_extractor = SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
    pipe = HunyuanVideo15ImageToVideoPipeline(**_parts(seed, "i2v", use_meanflow), image_encoder=image_encoder,
                                              feature_extractor=feature_extractor)
    return _save(pipe, directory)


BUILDERS = {"hunyuan_video15": build_hunyuan_video15, "hunyuan_video15_i2v": build_hunyuan_video15_i2v}
