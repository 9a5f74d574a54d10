"""Rewards of image edits: each reads the edited samples and, from each prompt
(:class:`pipelines.base.Prompt` of an edit prompt file), the source image the edit started from and,
where given, the mask of the region the edit may change.

* ``preservation`` -- how much of the source an edit keeps, outside the mask when the prompt has one:
  ``features: pixels`` scores ``1 - sum_p k_p |e_p - s_p| / sum_p k_p`` (mean over channels of the
  absolute difference, k the kept pixels: 1 - mask, or 1 everywhere), ``greyscale: true`` compares
  the per-pixel maxima over channels instead (a recolour keeps everything); ``features: dino`` /
  ``clip`` score the cosine of the two images' DINOv2 CLS / CLIP image embeddings, the editable
  region blacked out in both. Differentiable.
* ``edit_score`` -- instruction following and preservation in one score: ``instruction`` (any reward
  spec; by default the critique reward in its edit mode, which shows a VLM the source and the edit)
  and ``preservation`` (a spec of the reward above), weighted by ``weights``. Each is reported as a
  dimension; as a held-out reward it catches an edit that ignores its source.

The critique reward's edit mode (``critique`` with ``mode: edit``) lives in :mod:`rewards.critique`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import ConfigError
from rewards.base import CombinedReward, Reward, RewardError, register_reward


@lru_cache(maxsize=256)
def _load_file(path: str, height: int, width: int, grey: bool) -> Tensor:
    from pipelines.base import load_image

    image = load_image(path, height, width)
    return image.amax(0, keepdim=True) if grey else image


def _as_image(image, height: int, width: int, grey: bool = False) -> Tensor:
    """A path (cached), PIL image or tensor in [0, 1] -> (C, height, width), C = 1 when ``grey``."""
    from pathlib import Path

    from pipelines.base import load_image

    if isinstance(image, (str, Path)):
        return _load_file(str(image), height, width, grey)
    if isinstance(image, Tensor) and image.ndim == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = load_image(image, height, width)
    return image.amax(0, keepdim=True) if grey else image


def edit_sources(prompts: Sequence[str], like: Tensor, who: str) -> Tensor:
    """The source image of each prompt (its ``.image``, the first of several) at the size of
    ``like`` (B, C, H, W): (B, 3, H, W) in [0, 1] on its device. A prompt without one is a
    RewardError naming ``who``."""
    height, width = like.shape[-2:]
    sources = []
    for i, prompt in enumerate(prompts):
        image = getattr(prompt, "image", None)
        if image is None:
            raise RewardError(f"reward {who!r} judges edits: prompt {i} ({str(prompt)!r}) has no source image "
                              "(an edit prompt file: {\"prompt\": ..., \"image\": ...})")
        sources.append(_as_image(image[0] if isinstance(image, (list, tuple)) else image, height, width))
    return torch.stack(sources).to(like.device, like.dtype)


def edit_masks(prompts: Sequence[str], like: Tensor) -> Tensor | None:
    """The editable region of each prompt (its ``.mask``: white = editable) at the size of ``like``:
    (B, 1, H, W) in [0, 1], zeros (nothing editable) for prompts without one; None when no prompt
    has a mask."""
    if all(getattr(p, "mask", None) is None for p in prompts):
        return None
    height, width = like.shape[-2:]
    empty = torch.zeros(1, height, width)
    masks = [empty if getattr(p, "mask", None) is None else _as_image(p.mask, height, width, grey=True)
             for p in prompts]
    return torch.stack(masks).to(like.device, like.dtype)


def kept_difference(edits: Tensor, sources: Tensor, kept: Tensor | None = None) -> Tensor:
    """Mean absolute difference (B,) over the kept pixels: ``sum_p k_p |e_p - s_p| / sum_p k_p``
    with the difference averaged over channels (k = 1 everywhere when ``kept`` is None; a row
    with nothing kept scores 0)."""
    diff = (edits - sources).abs().mean(dim=1, keepdim=True)
    if kept is None:
        return diff.mean(dim=(1, 2, 3))
    return (diff * kept).sum(dim=(1, 2, 3)) / kept.sum(dim=(1, 2, 3)).clamp_min(1e-6)


@register_reward("preservation")
class Preservation(Reward):
    """What an edit keeps of its source (module docstring). Options: ``features`` (pixels, dino or
    clip), ``greyscale`` (pixels: compare stroke intensity, colour-blind), ``use_mask`` (default true:
    score outside the prompt's mask when it has one); dino: ``model``, ``checkpoint`` (a local file,
    or "hub"), ``image_size``, ``model_kwargs``; clip: ``clip_model``, ``clip_pretrained``; ``dtype``,
    ``device``."""

    differentiable = True
    dimensions = ("similarity",)
    FEATURES = ("pixels", "dino", "clip")

    def __init__(self, features: str = "pixels", greyscale: bool = False, use_mask: bool = True,
                 model: str = "vit_base_patch14_dinov2", checkpoint: str | None = "hub", image_size: int = 224,
                 model_kwargs: dict | None = None, clip_model: str | dict = "ViT-B-32",
                 clip_pretrained: str | None = "openai", dtype: str = "float32", device: str = "cpu",
                 weights=None) -> None:
        super().__init__(weights)
        from align.errors import check_choice

        check_choice("preservation features", features, self.FEATURES, "feature space")
        if greyscale and features != "pixels":
            raise ConfigError("preservation: greyscale compares pixels; it needs features: pixels")
        self.features, self.greyscale, self.use_mask = features, bool(greyscale), bool(use_mask)
        self.backbone = None
        if features == "dino":
            from rewards.dino import load_dino

            self.backbone = load_dino(model, checkpoint, image_size=image_size, dtype=dtype, device=device,
                                      what="preservation DINOv2 backbone", **(model_kwargs or {}))
        elif features == "clip":
            from rewards.clip import load_open_clip

            self.backbone = load_open_clip(clip_model, clip_pretrained, dtype=dtype, device=device,
                                           what="preservation CLIP backbone")
        self.device = torch.device(device)

    def _embed(self, images: Tensor) -> Tensor:
        if self.features == "dino":
            return self.backbone.tokens(images)[0]
        return self.backbone.encode_image(images)

    def score(self, samples, prompts, **context):
        sources = edit_sources(prompts, samples, self.name)
        editable = edit_masks(prompts, samples) if self.use_mask else None
        kept = None if editable is None else 1 - editable
        if self.features == "pixels":
            edits = samples.float()
            if self.greyscale:
                edits, sources = edits.amax(1, keepdim=True), sources.amax(1, keepdim=True)
            return {"similarity": 1 - kept_difference(edits, sources.float(), kept)}
        if kept is not None:
            samples, sources = samples * kept, sources * kept
        with torch.no_grad():
            source_features = self._embed(sources)
        return {"similarity": F.cosine_similarity(self._embed(samples.float()), source_features, dim=-1)}


@register_reward("edit_score")
class EditScore(CombinedReward):
    """``weights["instruction"]`` x instruction following + ``weights["preservation"]`` x preservation
    (module docstring). ``instruction``: a reward spec (default: the critique reward in edit mode, which
    needs ``base_url`` and ``model`` of an OpenAI-compatible VLM server, or ``backend: transformers``
    and ``model_path``); ``preservation``: a spec of the ``preservation`` reward (default pixels)."""

    name = "edit_score"

    @classmethod
    def spec_differentiable(cls, spec: dict) -> bool:
        """Differentiable when both parts are (the default instruction, a VLM critique, is not)."""
        from rewards.registry import reward_class

        parts = [spec.get("instruction") or "critique", spec.get("preservation") or "preservation"]
        parts = [{"name": part} if isinstance(part, str) else dict(part) for part in parts]
        return all(reward_class(part["name"]).spec_differentiable(part) for part in parts)

    def __init__(self, instruction: str | dict | None = None, preservation: str | dict | None = None,
                 weights: dict[str, float] | None = None) -> None:
        from rewards.registry import build_reward

        instruction = instruction if instruction is not None else {"name": "critique", "mode": "edit"}
        preservation = preservation if preservation is not None else {"name": "preservation"}
        super().__init__({"instruction": build_reward(instruction), "preservation": build_reward(preservation)},
                         weights)
