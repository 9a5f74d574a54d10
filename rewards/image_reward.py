"""ImageReward (Xu et al. 2023): a BLIP image encoder, a BERT-style text encoder whose layers
cross-attend to the image tokens, and an MLP head on the text encoder's first-token output;
the score is normalised as in the paper, (r - 0.16717) / 1.03334 (about 0 on average, higher is
preferred). Built from transformers parts (``BlipVisionModel``, ``BlipTextModel``) and loaded from
the public checkpoint (``ImageReward.pt``: keys ``blip.visual_encoder.*`` in the timm ViT layout,
``blip.text_encoder.*``, ``mlp.layers.*``; BLIP's contrastive ``blip.vision_proj`` / ``blip.text_proj``,
which the score does not read, are skipped), every key and shape checked (a one-line error names what
does not fit); the layout and the score are checked against the published ``image-reward`` package.
Differentiable in the pixels (torch preprocessing: bicubic resize to 224, centre crop, CLIP normalisation).

Reward ``image_reward``. Options: ``checkpoint`` (the ``.pt`` / ``.safetensors`` file),
``tokenizer_path`` (a BERT tokenizer folder or hub name, default ``bert-base-uncased``; BLIP's
[DEC] / [ENC] tokens are added), ``config`` ("large": the released model; or a dict with
``vision`` / ``text`` config fields), ``first_token`` ("cls", or "enc": BLIP's [ENC] in place of
[CLS], as its image-text matching head reads), ``dtype``, ``device``.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, register_reward
from rewards.clip import clip_preprocess
from rewards.loading import check_state_dict, freeze, parse_dtype, read_state_dict

#: the paper's normalisation of the raw head output
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
#: prompt tokens, as the released model reads them
MAX_TEXT_TOKENS = 35
#: the released model: BLIP ViT-L/16 at 224 and a BERT-base text encoder cross-attending to it
LARGE = {
    "vision": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                   image_size=224, patch_size=16, layer_norm_eps=1e-6),
    "text": dict(vocab_size=30524, hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072,
                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, layer_norm_eps=1e-12),
}
#: public checkpoint key prefix <-> this module's key prefix ({i}: a layer number); the vision tower
#: is timm-style in the checkpoint
KEY_PREFIXES = [
    ("blip.visual_encoder.cls_token", "visual_encoder.embeddings.class_embedding"),
    ("blip.visual_encoder.pos_embed", "visual_encoder.embeddings.position_embedding"),
    ("blip.visual_encoder.patch_embed.proj.", "visual_encoder.embeddings.patch_embedding."),
    ("blip.visual_encoder.blocks.{i}.norm1.", "visual_encoder.encoder.layers.{i}.layer_norm1."),
    ("blip.visual_encoder.blocks.{i}.norm2.", "visual_encoder.encoder.layers.{i}.layer_norm2."),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.", "visual_encoder.encoder.layers.{i}.self_attn.qkv."),
    ("blip.visual_encoder.blocks.{i}.attn.proj.", "visual_encoder.encoder.layers.{i}.self_attn.projection."),
    ("blip.visual_encoder.blocks.{i}.mlp.", "visual_encoder.encoder.layers.{i}.mlp."),
    ("blip.visual_encoder.norm.", "visual_encoder.post_layernorm."),
    ("blip.text_encoder.", "text_encoder."),
]
#: checkpoint keys the reward does not use: the text encoder's pooler, position-id buffers, and BLIP's
#: image-text contrastive projections (``blip.vision_proj`` / ``blip.text_proj``), which the reference
#: model holds (and saves) but its score never reads
UNUSED = re.compile(r"(^text_encoder\.pooler\.|position_ids$|^blip\.(vision|text)_proj\.)")


def _renamed(key: str, pairs) -> str:
    """``key`` with the first matching (source, target) prefix template replaced."""
    for source, target in pairs:
        pattern = "^" + re.escape(source).replace(re.escape("{i}"), r"(\d+)")
        match = re.match(pattern, key)
        if match:
            return target.replace("{i}", match.group(1) if match.groups() else "") + key[match.end():]
    return key


def to_module_key(key: str) -> str:
    return _renamed(key, KEY_PREFIXES)


def to_checkpoint_key(key: str) -> str:
    """The inverse of :func:`to_module_key` (to write a checkpoint in the public layout)."""
    return _renamed(key, [(target, source) for source, target in KEY_PREFIXES])


class RewardHead(nn.Module):
    """The released head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with dropout between the first four
    (``layers.{0,2,4,6,7}`` hold the weights)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                                    nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, features: Tensor) -> Tensor:
        return self.layers(features).squeeze(-1)


class ImageRewardModel(nn.Module):
    """Image tokens from the BLIP ViT; the prompt's tokens attend to themselves and (cross-attention)
    to the image tokens; the head reads the first token's output. Returns the raw (unnormalised) score."""

    def __init__(self, config: dict) -> None:
        from transformers import BlipTextConfig, BlipVisionConfig, BlipVisionModel
        from transformers.models.blip.modeling_blip_text import BlipTextModel

        super().__init__()
        self.config = {"vision": dict(config["vision"]), "text": dict(config["text"])}
        self.visual_encoder = BlipVisionModel(BlipVisionConfig(**self.config["vision"]))
        self.text_encoder = BlipTextModel(BlipTextConfig(**self.config["text"]), add_pooling_layer=False)
        self.mlp = RewardHead(self.config["text"]["hidden_size"])

    @property
    def image_size(self) -> int:
        return int(self.config["vision"]["image_size"])

    def forward(self, pixels: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image_tokens = self.visual_encoder(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.long, device=image_tokens.device)
        text = self.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                 encoder_hidden_states=image_tokens, encoder_attention_mask=image_mask)
        return self.mlp(text.last_hidden_state[:, 0, :].float())


def load_image_reward_model(checkpoint: str | Path, config: dict | str = "large") -> ImageRewardModel:
    """An :class:`ImageRewardModel` with the weights of a checkpoint in the public layout; a
    missing, unexpected or misshapen key is a one-line error naming it."""
    config = LARGE if config == "large" else config
    if not isinstance(config, dict) or not {"vision", "text"} <= set(config):
        raise ConfigError("image_reward: config must be 'large' or a mapping with 'vision' and 'text' fields")
    model = ImageRewardModel(config)
    what = "ImageReward checkpoint"
    state = {to_module_key(k): v for k, v in read_state_dict(checkpoint, what).items()}
    state = {k: v for k, v in state.items() if not UNUSED.search(k)}
    expected = {k: v for k, v in model.state_dict().items() if not UNUSED.search(k)}
    check_state_dict(state, expected, checkpoint, what)
    model.load_state_dict(state, strict=False)
    return model


def blip_tokenizer(path: str | Path):
    """A BERT tokenizer with BLIP's extra tokens: [DEC] as the beginning of text, [ENC]."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(path))
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


@register_reward("image_reward")
class ImageReward(Reward):
    """ImageReward, normalised as in its paper (module docstring for the options)."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, checkpoint: str | Path | None = None, tokenizer_path: str | Path = "bert-base-uncased",
                 config: dict | str = "large", first_token: str = "cls", dtype: str = "float32",
                 device: str = "cpu", model: ImageRewardModel | None = None, weights=None) -> None:
        super().__init__(weights)
        if model is None:
            if checkpoint is None:
                raise ConfigError("reward 'image_reward' needs checkpoint (the ImageReward.pt file)")
            model = load_image_reward_model(checkpoint, config)
        if first_token not in ("cls", "enc"):
            raise ConfigError(f"image_reward: first_token must be 'cls' or 'enc', got {first_token!r}")
        self.model = freeze(model).to(parse_dtype(dtype))
        self.model.mlp.float()  # the head reads float32 features whatever the encoders' dtype
        self.tokenizer = blip_tokenizer(tokenizer_path)
        vocab = self.model.config["text"]["vocab_size"]
        if len(self.tokenizer) > vocab:
            raise ConfigError(f"image_reward: the tokenizer at {tokenizer_path} has {len(self.tokenizer)} tokens "
                              f"with BLIP's, the text encoder {vocab}")
        self.first_token = first_token
        self.dtype = parse_dtype(dtype)
        self.to(device)

    def tokens(self, prompts) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TEXT_TOKENS,
                               return_tensors="pt")
        ids = batch["input_ids"].clone()
        if self.first_token == "enc":
            ids[:, 0] = self.tokenizer.convert_tokens_to_ids("[ENC]")
        return ids.to(self.device), batch["attention_mask"].to(self.device)

    def score(self, samples, prompts, **context):
        pixels = clip_preprocess(samples.float(), size=self.model.image_size).to(self.device, self.dtype)
        ids, mask = self.tokens(prompts)
        raw = self.model(pixels, ids, mask)
        return {"score": (raw.float() - REWARD_MEAN) / REWARD_STD}
