"""Tiny random models for the rewards, built in code: for tests, benchmarks and offline smoke runs.

They use the same classes and loaders as the real checkpoints (open_clip ``CLIP``, transformers
``CLIPModel`` with a real byte-level BPE tokenizer, ...), only with a few layers of width 32, so a
whole reward runs in milliseconds on a CPU. Their scores mean nothing.
"""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import torch


def tiny_open_clip_config(embed_dim: int = 32, image_size: int = 32, width: int = 32,
                          context_length: int = 16) -> dict:
    """An open_clip model config (same format as ``open_clip.get_model_config``): a ViT with one block
    of width 32 and patch 8 over ``image_size`` pixels; a one-block text tower over the real CLIP BPE
    vocabulary (49408)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": 1, "width": width, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width, "heads": 2, "layers": 1},
    }


def tiny_open_clip_checkpoint(path: str | Path, config: dict | None = None, seed: int = 0) -> Path:
    """Build a random open_clip model from ``config`` and save its state dict to ``path``."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.CLIP(**(config or tiny_open_clip_config()))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    return path


@lru_cache(maxsize=None)
def _bpe(num_merges: int) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The first ``num_merges`` merges of the CLIP BPE file that open_clip ships, and the matching
    vocabulary (byte alphabet, the same with ``</w>``, one token per merge, two special tokens)."""
    import open_clip
    from tokenizers import pre_tokenizers

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    merges: list[tuple[str, str]] = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        next(fh)  # version line
        for line in fh:
            pair = line.split()
            if len(pair) == 2:
                merges.append((pair[0], pair[1]))
            if len(merges) >= num_merges:
                break
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [a + "</w>" for a in alphabet] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return tuple(dict.fromkeys(tokens)), tuple(merges)


def tiny_clip_tokenizer(max_length: int = 16, num_merges: int = 2000):
    """A real transformers CLIP tokenizer over the first ``num_merges`` CLIP merges."""
    from transformers import CLIPTokenizer

    tokens, merges = _bpe(num_merges)
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=max_length)


def tiny_hf_clip(directory: str | Path, *, image_size: int = 32, hidden: int = 32, projection_dim: int = 32,
                 seed: int = 0, logit_scale: float = 2.6592) -> Path:
    """A transformers ``CLIPModel`` with its tokenizer and image processor saved to ``directory``
    (loadable by :func:`rewards.clip.load_hf_clip` exactly like a hub checkpoint)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tokenizer = tiny_clip_tokenizer()
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                  image_size=image_size, patch_size=8)
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim,
                        logit_scale_init_value=logit_scale)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                       do_center_crop=True, resample=3).save_pretrained(directory)
    return directory


def save_random_aesthetic_head(path: str | Path, embed_dim: int = 32, seed: int = 0) -> Path:
    """A random LAION-shaped aesthetic head over ``embed_dim`` inputs, saved as a torch state dict."""
    from rewards.aesthetic import AestheticHead

    torch.manual_seed(seed)
    head = AestheticHead(embed_dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), path)
    return path


#: timm keyword arguments of a one-block DINOv2-style ViT (patch 14, layer scale, width 32)
TINY_DINO = {"model": "vit_small_patch14_dinov2", "image_size": 28,
             "model_kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2}}


def tiny_dino_checkpoint(path: str | Path, image_size: int = 28, seed: int = 0) -> Path:
    """A random tiny DINOv2-style timm ViT saved as a state dict (loadable by :func:`rewards.dino.load_dino`
    with the options of :data:`TINY_DINO`)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TINY_DINO["model"], pretrained=False, num_classes=0, img_size=image_size,
                              **TINY_DINO["model_kwargs"])
    with torch.no_grad():  # DINOv2 starts its layer scales at 1e-5; a trained model has them near 1
        for name, param in model.named_parameters():
            if name.endswith("gamma"):
                param.fill_(1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


QWEN_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|image_pad|>", "<|video_pad|>")
#: a minimal Qwen-style chat template (images / videos as vision-start, pad, vision-end)
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_qwen2_vl(directory: str | Path, *, hidden: int = 32, seed: int = 0) -> Path:
    """A Qwen2-VL (transformers ``Qwen2VLForConditionalGeneration``) with one text and one vision block,
    a byte-level BPE tokenizer with Qwen's special tokens, and a ``Qwen2VLProcessor`` (images and videos
    of at most 56 x 56 pixels), saved to ``directory``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor)

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIAL_TOKENS[1:])})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    pixels = {"min_pixels": 28 * 28 * 4, "max_pixels": 56 * 56 * 4, "patch_size": 14, "temporal_patch_size": 2,
              "merge_size": 2}
    processor = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**pixels), tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(**pixels, cap_pixels_per_frame=True),
                                 chat_template=QWEN_CHAT_TEMPLATE)
    head_dim = hidden // 2
    section = [head_dim // 8, (head_dim // 2 - head_dim // 8) // 2]
    section.append(head_dim // 2 - sum(section))
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
                         bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                         pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=1, embed_dim=hidden, hidden_size=hidden, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


#: a tiny ImageReward: the released architecture at test width
TINY_IMAGE_REWARD = {
    "vision": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                   patch_size=8, layer_norm_eps=1e-6),
    "text": dict(vocab_size=64, hidden_size=32, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=40, layer_norm_eps=1e-12),
}


def tiny_bert_tokenizer(directory: str | Path) -> Path:
    """A real transformers BERT (WordPiece) tokenizer over a small vocabulary, saved to ``directory``."""
    from transformers import BertTokenizer

    words = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "car", "digit", "on", "sofa", "sign",
             "that", "says", "hello", "painting", "fox", "snow", "astronaut", "horse", "moon", "##s"]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(str(directory))
    return directory


def save_random_image_reward(path: str | Path, seed: int = 0, config: dict | None = None) -> Path:
    """A random :class:`rewards.image_reward.ImageRewardModel` saved in the public checkpoint's
    layout (``blip.visual_encoder.*`` timm-style keys, ``blip.text_encoder.*``, ``mlp.layers.*``), with
    the BLIP contrastive projections the reference model also saves (``blip.vision_proj`` /
    ``blip.text_proj``, 16 wide here; the score does not read them)."""
    from rewards.image_reward import ImageRewardModel, to_checkpoint_key

    torch.manual_seed(seed)
    model = ImageRewardModel(config or TINY_IMAGE_REWARD)
    state = {to_checkpoint_key(k): v.contiguous() for k, v in model.state_dict().items()}
    for name in ("vision", "text"):
        width = model.config[name]["hidden_size"]
        state[f"blip.{name}_proj.weight"] = torch.randn(16, width) * width ** -0.5
        state[f"blip.{name}_proj.bias"] = torch.zeros(16)
    path = Path(path)
    torch.save(state, path)
    return path


def save_random_hpsv3(path: str | Path, base_dir: str | Path, seed: int = 0) -> Path:
    """A random HPSv3 reward model over the Qwen2-VL config and processor in ``base_dir`` (e.g. from
    :func:`tiny_qwen2_vl`), saved as ``.safetensors`` in the release's layout (``visual.*``, ``model.*``,
    ``lm_head.weight``, ``rm_head.*``); loadable by :func:`rewards.hpsv3.load_hpsv3_model`."""
    from safetensors.torch import save_file

    from rewards.hpsv3 import build_hpsv3_model, to_release_key

    torch.manual_seed(seed)
    model = build_hpsv3_model(base_dir)
    with torch.no_grad():  # unit-scale weights: the head's output is of order one, not 1e-3
        for param in model.head.parameters():
            param.normal_(0.0, param.shape[-1] ** -0.5 if param.ndim > 1 else 0.1)
    state = {to_release_key(k): v.contiguous() for k, v in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"]
    state["lm_head.weight"] = torch.randn_like(embed) * 0.02
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path
