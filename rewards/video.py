"""Frame-level video dimensions that need no VLM: one CLIP pass per frame, plus pixel statistics.

For a video (B, F, C, H, W) in [0, 1] with prompt p and CLIP image embeddings e_1..e_F (normalised):

* ``aesthetic`` -- mean over frames of the LAION aesthetic head on e_f (1-10 scale);
* ``text_alignment`` -- mean over frames of cos(e_f, text embedding of p);
* ``temporal_consistency`` -- mean over t of cos(e_t, e_{t+1}) (1 for a still video);
* ``motion_smoothness`` -- 1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2| over pixels and inner frames: how
  well each frame is predicted by linear interpolation of its neighbours (1 for still or uniformly
  moving content, lower for jitter and flicker). The frame-interpolation idea of VBench's motion
  smoothness, with the linear interpolator in place of a learned one, so it needs no weights.

All four are differentiable in the pixels and returned as named dimensions that trainers and the demo
weight (``weights={"text_alignment": 2.0, ...}``). Images (B, C, H, W) count as one-frame videos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import ConfigError, unknown_name_error
from rewards.aesthetic import AestheticHead, load_aesthetic_head
from rewards.base import Reward, register_reward
from rewards.clip import ClipBackbone, load_open_clip
from rewards.loading import freeze

VIDEO_DIMENSIONS = ("aesthetic", "text_alignment", "temporal_consistency", "motion_smoothness")


def temporal_consistency(features: Tensor) -> Tensor:
    """(B, F, D) embeddings -> (B,) mean cosine similarity of consecutive frames (1 when F == 1)."""
    if features.shape[1] < 2:
        return features.new_ones(features.shape[0])
    e = F.normalize(features, dim=-1)
    return (e[:, 1:] * e[:, :-1]).sum(-1).mean(1)


def motion_smoothness(videos: Tensor) -> Tensor:
    """(B, F, C, H, W) in [0, 1] -> (B,) 1 - mean |x_t - (x_{t-1} + x_{t+1}) / 2| (1 when F < 3)."""
    if videos.shape[1] < 3:
        return videos.new_ones(videos.shape[0])
    x = videos.float()
    residual = x[:, 1:-1] - 0.5 * (x[:, :-2] + x[:, 2:])
    return 1.0 - residual.abs().mean(dim=(1, 2, 3, 4))


@register_reward("video_frames")
class VideoFrameReward(Reward):
    """Per-frame aesthetic, text alignment, temporal consistency and motion smoothness of videos.

    Options: ``dims`` (a subset of the four; default all, or all but ``aesthetic`` without a head),
    ``head_path`` (LAION aesthetic head), ``clip_model`` / ``clip_pretrained`` (one CLIP for every
    dimension; default OpenAI ViT-L/14, the aesthetic head's backbone), ``frame_stride`` (embed every
    k-th frame; 1), ``dtype``, ``device``; ``backbone`` / ``head`` take built modules."""

    differentiable = True
    handles_video = True
    dimensions = VIDEO_DIMENSIONS

    def __init__(self, dims: Sequence[str] | None = None, head_path: str | Path | None = None,
                 clip_model: str | dict = "ViT-L-14", clip_pretrained: str | None = "openai", frame_stride: int = 1,
                 dtype: str = "float32", device: str = "cpu", backbone: ClipBackbone | None = None,
                 head: AestheticHead | None = None, weights=None) -> None:
        has_head = head is not None or head_path is not None
        if dims is None:
            dims = VIDEO_DIMENSIONS if has_head else VIDEO_DIMENSIONS[1:]
        dims = tuple(dims)
        for d in dims:
            if d not in VIDEO_DIMENSIONS:
                raise unknown_name_error("video_frames dimension", d, VIDEO_DIMENSIONS)
        if not dims:
            raise ConfigError("video_frames: dims is empty")
        if "aesthetic" in dims and not has_head:
            raise ConfigError("video_frames: the aesthetic dimension needs head_path (the LAION aesthetic head)")
        if frame_stride < 1:
            raise ConfigError(f"video_frames: frame_stride must be >= 1, got {frame_stride}")
        self.dimensions = dims
        super().__init__(weights)
        self.frame_stride = int(frame_stride)
        needs_clip = any(d in dims for d in ("aesthetic", "text_alignment", "temporal_consistency"))
        self.backbone = None
        if needs_clip:
            self.backbone = backbone or load_open_clip(clip_model, clip_pretrained, dtype=dtype, device=device,
                                                       what="video_frames CLIP backbone")
        self.head = None
        if "aesthetic" in dims:
            head = head or load_aesthetic_head(head_path)
            if head.embed_dim != self.backbone.embed_dim:
                raise ConfigError(f"aesthetic head expects {head.embed_dim}-d CLIP embeddings but the backbone "
                                  f"{self.backbone.name} gives {self.backbone.embed_dim}-d")
            self.head = freeze(head).to(self.backbone.device)
        self.device = self.backbone.device if self.backbone is not None else torch.device(device)

    def score(self, samples: Tensor, prompts: Sequence[str], **context):
        videos = samples if samples.ndim == 5 else samples[:, None]
        b, f = videos.shape[:2]
        out: dict[str, Tensor] = {}
        if self.backbone is not None:
            frames = videos[:, ::self.frame_stride]
            k = frames.shape[1]
            emb = self.backbone.encode_image(frames.flatten(0, 1)).reshape(b, k, -1)
            unit = F.normalize(emb, dim=-1)
            if "aesthetic" in self.dimensions:
                out["aesthetic"] = self.head(unit.to(self.head.layers[0].weight.dtype)).float().mean(1)
            if "text_alignment" in self.dimensions:
                text = F.normalize(self.backbone.encode_text(list(prompts)), dim=-1).to(unit.device)
                out["text_alignment"] = (unit * text[:, None]).sum(-1).mean(1)
            if "temporal_consistency" in self.dimensions:
                out["temporal_consistency"] = temporal_consistency(unit)
        if "motion_smoothness" in self.dimensions:
            out["motion_smoothness"] = motion_smoothness(videos).to(self.device)
        return out
