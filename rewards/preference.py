"""Text-image preference rewards built on CLIP, each at the scale of its paper.

* ``clip_score`` -- CLIPScore (Hessel et al. 2021): ``2.5 * max(cos(image, text), 0)`` with OpenAI's
  CLIP ViT-B/32 (about 0.6-0.9 for matching pairs).
* ``pickscore`` -- PickScore (Kirstain et al. 2023): ``logit_scale.exp() * cos`` of a fine-tuned
  CLIP-H (transformers ``CLIPModel`` ``yuvalkirstain/PickScore_v1`` with the processor of
  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``); about 18-24, with logit_scale.exp() = 100.
* ``hpsv2`` -- HPSv2 / v2.1 (Wu et al. 2023): ``cos`` of an open_clip ViT-H-14 whose weights are the
  HPS checkpoint (``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, a ``{"state_dict": ...}``);
  preprocessing resizes the longest side to 224 and pads (as HPS does); about 0.2-0.35. Layout and score
  are checked against the published ``hpsv2`` package's model and ``score``.

All three are differentiable in the pixels (torch preprocessing, frozen models); text embeddings are
cached per prompt.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from align.errors import ConfigError
from rewards.base import Reward, register_reward
from rewards.clip import ClipBackbone, load_hf_clip, load_open_clip


class _ClipReward(Reward):
    differentiable = True
    dimensions = ("score",)

    def __init__(self, backbone: ClipBackbone, weights=None) -> None:
        super().__init__(weights)
        self.backbone = backbone
        self.device = backbone.device

    def cosine(self, samples: Tensor, prompts) -> Tensor:
        return self.backbone.cosine(samples, list(prompts))


@register_reward("clip_score")
class ClipScore(_ClipReward):
    """CLIPScore = w * max(cos, 0), w = 2.5. Options: ``clip_model`` (default ``ViT-B-32``),
    ``clip_pretrained`` (local file or open_clip tag, default ``openai``), ``w``, ``dtype``, ``device``."""

    def __init__(self, clip_model: str | dict = "ViT-B-32", clip_pretrained: str | None = "openai", w: float = 2.5,
                 dtype: str = "float32", device: str = "cpu", backbone: ClipBackbone | None = None,
                 weights=None) -> None:
        backbone = backbone or load_open_clip(clip_model, clip_pretrained, dtype=dtype, device=device,
                                              what="CLIPScore backbone")
        super().__init__(backbone, weights)
        self.w = float(w)

    def score(self, samples, prompts, **context):
        return {"score": self.w * self.cosine(samples, prompts).clamp_min(0)}


@register_reward("pickscore")
class PickScore(_ClipReward):
    """PickScore = logit_scale.exp() * cos(image, text). Options: ``model_path`` (transformers
    CLIPModel directory or hub name), ``processor_path`` (tokenizer + image processor; default the
    CLIP-H processor PickScore uses), ``dtype``, ``device``."""

    def __init__(self, model_path: str | Path = "yuvalkirstain/PickScore_v1",
                 processor_path: str | Path | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
                 dtype: str = "float32", device: str = "cpu", backbone: ClipBackbone | None = None,
                 weights=None) -> None:
        backbone = backbone or load_hf_clip(model_path, processor_path, dtype=dtype, device=device,
                                            what="PickScore model")
        super().__init__(backbone, weights)

    def score(self, samples, prompts, **context):
        cos = self.cosine(samples, prompts)
        return {"score": self.backbone.logit_scale().to(cos.device) * cos}


@register_reward("hpsv2")
class HPSv2(_ClipReward):
    """HPSv2 = cos(image, text) of an open_clip ViT-H-14 with the HPS checkpoint. Options:
    ``checkpoint`` (HPS_v2_compressed.pt or HPS_v2.1_compressed.pt), ``clip_model`` (default
    ``ViT-H-14``), ``resize_mode`` (``longest``: HPS's resize-and-pad), ``dtype``, ``device``."""

    def __init__(self, checkpoint: str | Path | None = None, clip_model: str | dict = "ViT-H-14",
                 resize_mode: str = "longest", dtype: str = "float32", device: str = "cpu",
                 backbone: ClipBackbone | None = None, weights=None) -> None:
        if backbone is None:
            if checkpoint is None:
                raise ConfigError("reward 'hpsv2' needs checkpoint: HPS_v2_compressed.pt or HPS_v2.1_compressed.pt "
                                  "(an open_clip ViT-H-14 state dict)")
            backbone = load_open_clip(clip_model, checkpoint, dtype=dtype, device=device, resize_mode=resize_mode,
                                      what="HPSv2 model")
        super().__init__(backbone, weights)

    def score(self, samples, prompts, **context):
        return {"score": self.cosine(samples, prompts)}


__all__ = ["ClipScore", "HPSv2", "PickScore"]
