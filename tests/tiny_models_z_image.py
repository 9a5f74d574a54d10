"""Tiny random Z-Image pipelines (``ZImagePipeline``) built in code, for offline CPU tests.

The parts are the real classes with tiny sizes: a two-layer ``Qwen3Model`` text encoder (hidden 32),
a real byte-level BPE ``Qwen2Tokenizer`` with a Qwen3-style chat template (the pipeline wraps every
prompt in it with ``apply_chat_template(..., enable_thinking=True)``), a FLUX-like ``AutoencoderKL``
(16 latent channels, here 2x spatial compression, with a scaling and a shift factor), a
``ZImageTransformer2DModel`` and a ``FlowMatchEulerDiscreteScheduler``.

Two variants, told apart (as the released checkpoints are) only by the folder name: the base model
(a resolution-dependent dynamic shift, so the schedule's ``mu`` is exercised) and the distilled
``...-turbo`` model (the static shift 3 of the released Z-Image-Turbo scheduler).
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from tests.tiny_models import _WORDS, HIDDEN, _save, tiny_vae
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import _WORDS, HIDDEN, _save, tiny_vae

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 500
#: latent channels of Z-Image's (FLUX) VAE
LATENT_CHANNELS = 16

#: a Qwen3-style chat template: turns in <|im_start|> / <|im_end|>, and an empty think block after the
#: assistant header only when thinking is switched off (Z-Image encodes with enable_thinking=True)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)

#: the scheduler of the released Tongyi-MAI/Z-Image-Turbo checkpoint (static shift)
TURBO_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "use_dynamic_shifting": False, "shift": 3.0}
#: a resolution-dependent shift (mu from the image sequence length), sized for 32 px test images
DYNAMIC_SCHEDULER_CONFIG = {"num_train_timesteps": 1000, "use_dynamic_shifting": True, "shift": 3.0,
                            "base_image_seq_len": 16, "max_image_seq_len": 256, "base_shift": 0.5,
                            "max_shift": 1.15}


def qwen3_tokenizer():
    """A real ``Qwen2Tokenizer`` (byte-level BPE, Qwen2's pre-tokenizer regex, the chat template
    above) whose merges are learnt offline from the template's words and the shared test words."""
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
    corpus = ["user\nassistant\n<think>\n\n</think>\n\n"] * 4 + [" ".join(_WORDS)] * 2
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    learner.train_from_iterator(corpus, trainer)
    model = json.loads(learner.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=model["vocab"], merges=merges, extra_special_tokens=list(SPECIAL_TOKENS[1:]),
                          chat_template=CHAT_TEMPLATE, model_max_length=2048)


def qwen3_text_encoder(tokenizer, *, hidden: int = HIDDEN, seed: int = 0):
    """A two-layer ``Qwen3Model`` (two query heads of 16, one key / value head)."""
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=2048,
        rms_norm_eps=1e-6, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return Qwen3Model(config).eval()


def tiny_z_image_transformer(*, seed: int = 0):
    """``ZImageTransformer2DModel``: dim 32 in two heads of 16 (RoPE axes 4 + 6 + 6), one refiner
    block per stream, two main blocks, 2x2 patches of 16 channels, captions of width 32."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=HIDDEN, n_layers=2,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=HIDDEN,
        rope_theta=256.0, t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
    ).eval()
    # the released weights are trained; zero-initialised pad tokens and final layer would hide
    # padding mistakes and make every prediction the same, so give every parameter a random value
    with torch.no_grad():
        for param in transformer.parameters():
            if torch.count_nonzero(param) == 0:
                param.normal_(std=0.5)
    return transformer


def build_z_image(directory, *, distilled: bool = False, seed: int = 0) -> Path:
    """ZImagePipeline with tiny parts; 32 px images give (16, 16, 16) latents, 8x8 tokens.
    ``distilled``: the scheduler of Z-Image-Turbo (static shift 3) instead of a dynamic shift; name
    the folder ``...turbo`` for the adapter to take it as the distilled model."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    tokenizer = qwen3_tokenizer()
    text_encoder = qwen3_text_encoder(tokenizer, seed=seed + 1)
    vae = tiny_vae(LATENT_CHANNELS, scaling_factor=0.36, shift_factor=0.12, seed=seed + 2)
    transformer = tiny_z_image_transformer(seed=seed)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        TURBO_SCHEDULER_CONFIG if distilled else DYNAMIC_SCHEDULER_CONFIG)
    pipe = ZImagePipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          transformer=transformer)
    return _save(pipe, directory)
