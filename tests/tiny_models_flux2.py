"""Tiny random FLUX.2 pipelines built in code, for tests that run offline on a CPU.

``build_flux2`` builds a real ``Flux2Pipeline`` (FLUX.2 [dev]): a Mistral3 text encoder (a Mistral
language model with a Pixtral vision tower) behind a ``PixtralProcessor``, an ``AutoencoderKLFlux2``
and a ``Flux2Transformer2DModel`` with the guidance embedding. ``build_flux2_klein`` builds a real
``Flux2KleinPipeline``: a Qwen3 causal LM behind a Qwen2 tokenizer, the same VAE and a transformer
without the guidance embedding. Both are saved with ``save_pretrained`` and load back through the
adapters' ``from_pretrained``.

The tokenizers are byte-level BPEs trained here on a small fixed corpus (the pipeline's system
message included, so a prompt takes few tokens), with chat templates in the format of the released
tokenizers. The text encoders are narrow (hidden 32) but as deep as the released ones' hidden-state
layers the pipelines read ((10, 20, 30) for Mistral, (9, 18, 27) for Qwen3), so the adapters run
with the pipelines' defaults.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

try:
    from tests.tiny_models import _WORDS, HIDDEN, _save
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import _WORDS, HIDDEN, _save

#: text tokens per prompt the tests use (the system message and chat markup take part of them)
MAX_SEQUENCE_LENGTH = 128
#: the deepest hidden-state layer each pipeline reads by default
MISTRAL_LAYERS = 30
QWEN3_LAYERS = 27

MISTRAL_SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                   "[IMG]", "[IMG_BREAK]", "[IMG_END]"]
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Mistral Small's instruct format: [SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]; message
# contents are lists of {"type": "text", "text": ...} parts (as format_input builds them) or strings
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

# Qwen3's ChatML format; enable_thinking=False closes an empty think block after the generation prompt
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


# --- tokenizers ---------------------------------------------------------------------------------
def _corpus() -> list[str]:
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

    words = " ".join(_WORDS)
    return [SYSTEM_MESSAGE, words, words.capitalize(), "user assistant system", "a photo of a cat",
            "a red car on a street at night"]


@lru_cache(maxsize=None)
def _byte_level_bpe(special: tuple[str, ...], vocab_size: int = 600) -> str:
    """A byte-level BPE trained on the fixed corpus, as the JSON of a ``tokenizers.Tokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer.to_str()


def mistral_tokenizer():
    """A Mistral-style tokenizer (tokenizers backend): byte-level BPE, <s> / </s> / <pad>, the image
    and instruct control tokens."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(_byte_level_bpe(tuple(MISTRAL_SPECIAL)))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=4096, chat_template=MISTRAL_CHAT_TEMPLATE)


def pixtral_processor():
    """FLUX.2 [dev]'s ``tokenizer`` component: a ``PixtralProcessor`` over :func:`mistral_tokenizer`."""
    from transformers import PixtralImageProcessor, PixtralProcessor

    image_processor = PixtralImageProcessor(size={"longest_edge": 64}, patch_size=8)
    return PixtralProcessor(image_processor=image_processor, tokenizer=mistral_tokenizer(), patch_size=8,
                            spatial_merge_size=2, chat_template=MISTRAL_CHAT_TEMPLATE)


def qwen3_tokenizer():
    """A Qwen2 tokenizer (byte-level BPE, ChatML special tokens) with a Qwen3-style chat template."""
    import json

    from transformers import Qwen2Tokenizer

    model = json.loads(_byte_level_bpe(tuple(QWEN_SPECIAL)))["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return Qwen2Tokenizer(vocab=dict(model["vocab"]), merges=merges, extra_special_tokens=QWEN_SPECIAL[1:],
                          model_max_length=4096, chat_template=QWEN3_CHAT_TEMPLATE)


# --- text encoders ------------------------------------------------------------------------------
def mistral3_text_encoder(processor, *, layers: int = MISTRAL_LAYERS, hidden: int = HIDDEN, seed: int = 0):
    """Mistral3ForConditionalGeneration: a narrow ``layers``-deep Mistral LM, a one-layer Pixtral tower."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    tokenizer = processor.tokenizer
    text = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, sliding_window=None,
    )
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=64, patch_size=8)
    config = Mistral3Config(text_config=text, vision_config=vision, image_token_index=processor.image_token_id,
                            spatial_merge_size=2)
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def qwen3_text_encoder(tokenizer, *, layers: int = QWEN3_LAYERS, hidden: int = HIDDEN, seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, head_dim=hidden // 2, max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(config).eval()


# --- VAE, transformer, scheduler ----------------------------------------------------------------
def tiny_flux2_vae(latent_channels: int = 4, *, seed: int = 0):
    """AutoencoderKLFlux2 with two blocks (2x spatial compression); its batch-norm statistics of the
    patchified latents are set away from (0, 1), so the latent normalisation is exercised."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=4, sample_size=32,
    ).eval()
    channels = vae.bn.num_features
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.2 * torch.randn(channels, generator=generator))
        vae.bn.running_var.copy_(0.5 + torch.rand(channels, generator=generator))
    return vae


def tiny_flux2_transformer(in_channels: int, joint_attention_dim: int, *, guidance_embeds: bool, seed: int = 0):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=joint_attention_dim, timestep_guidance_channels=32,
        mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def flux2_scheduler():
    """FLUX.2's scheduler: dynamic shifting (the pipelines compute mu themselves)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=256,
                                           max_image_seq_len=4096, base_shift=0.5, max_shift=1.15)


# --- pipelines ----------------------------------------------------------------------------------
def build_flux2(directory, *, seed: int = 0) -> Path:
    """Flux2Pipeline (FLUX.2 [dev]): Mistral3 + PixtralProcessor, guidance-embedded transformer over
    packed 2x2-patchified latents; 32 px images are 8 x 8 = 64 tokens of 16 channels."""
    from diffusers import Flux2Pipeline

    processor = pixtral_processor()
    text_encoder = mistral3_text_encoder(processor, seed=seed + 1)
    vae = tiny_flux2_vae(4, seed=seed + 2)
    transformer = tiny_flux2_transformer(4 * vae.config.latent_channels, 3 * HIDDEN, guidance_embeds=True,
                                         seed=seed)
    pipe = Flux2Pipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=processor,
                         transformer=transformer)
    return _save(pipe, directory)


def build_flux2_klein(directory, *, is_distilled: bool = False, seed: int = 0) -> Path:
    """Flux2KleinPipeline: Qwen3 + Qwen2 tokenizer, transformer without the guidance embedding; real
    CFG against the empty prompt unless ``is_distilled`` (the step-distilled klein checkpoints)."""
    from diffusers import Flux2KleinPipeline

    tokenizer = qwen3_tokenizer()
    text_encoder = qwen3_text_encoder(tokenizer, seed=seed + 1)
    vae = tiny_flux2_vae(4, seed=seed + 2)
    transformer = tiny_flux2_transformer(4 * vae.config.latent_channels, 3 * HIDDEN, guidance_embeds=False,
                                         seed=seed)
    pipe = Flux2KleinPipeline(scheduler=flux2_scheduler(), vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                              transformer=transformer, is_distilled=is_distilled)
    return _save(pipe, directory)


BUILDERS = {"flux2": build_flux2, "flux2_klein": build_flux2_klein,
            "flux2_klein_distilled": lambda directory: build_flux2_klein(directory, is_distilled=True)}
