"""LAION aesthetic predictor: CLIP ViT-L/14 image embedding -> MLP -> a score on a 1-10 scale.

The head (improved-aesthetic-predictor, ``sac+logos+ava1-l14-linearMSE.pth``) is
Linear(768, 1024) - Dropout(0.2) - Linear(1024, 128) - Dropout(0.2) - Linear(128, 64) - Dropout(0.1) -
Linear(64, 16) - Linear(16, 1), with no activations, applied to the L2-normalised image embedding of
OpenAI's CLIP ViT-L/14. Its state dict keys are ``layers.{0,2,4,6,7}.{weight,bias}``.

Preprocessing is CLIP's (224, bicubic, centre crop, OpenAI mean / std) done in torch, so the score is
differentiable with respect to the pixels (reward backprop, guidance).
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, register_reward
from rewards.clip import ClipBackbone, load_open_clip
from rewards.loading import check_state_dict, freeze, read_state_dict

#: the LAION head's hidden sizes after the input embedding
HEAD_SIZES = (1024, 128, 64, 16, 1)
HEAD_DROPOUTS = (0.2, 0.2, 0.1)


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP (keys ``layers.0/2/4/6/7``); input: an L2-normalised CLIP embedding."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        d0, d1, d2, d3, d4 = HEAD_SIZES
        p0, p1, p2 = HEAD_DROPOUTS
        self.embed_dim = embed_dim
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, d0), nn.Dropout(p0),
            nn.Linear(d0, d1), nn.Dropout(p1),
            nn.Linear(d1, d2), nn.Dropout(p2),
            nn.Linear(d2, d3),
            nn.Linear(d3, d4),
        )

    def forward(self, embedding: Tensor) -> Tensor:
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_head(path: str | Path, embed_dim: int | None = None) -> AestheticHead:
    """The head at ``path`` (a torch or safetensors state dict), checked key by key and shape by shape
    against :class:`AestheticHead` with ``embed_dim`` inputs (default: read from the file, 768 for the
    public ViT-L/14 heads); frozen, in eval mode."""
    state = read_state_dict(path, "LAION aesthetic head")
    if embed_dim is None:
        first = state.get("layers.0.weight")
        embed_dim = int(first.shape[1]) if first is not None and first.ndim == 2 else 768
    what = f"LAION aesthetic head (MLP {embed_dim}-1024-128-64-16-1, keys layers.0/2/4/6/7)"
    head = AestheticHead(embed_dim)
    check_state_dict(state, head.state_dict(), path, what)
    head.load_state_dict(state)
    return freeze(head)


@register_reward("aesthetic")
class AestheticReward(Reward):
    """LAION aesthetic score (about 1-10) of each image; videos: the mean over frames.

    Options: ``head_path`` (the ``.pth`` / ``.safetensors`` head), ``clip_model`` (open_clip name,
    config JSON or dict; default ``ViT-L-14``), ``clip_pretrained`` (a local checkpoint file, or an
    open_clip tag such as ``openai`` when online), ``dtype``, ``device``. ``backbone`` / ``head`` accept
    already built modules instead."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, head_path: str | Path | None = None, clip_model: str | dict = "ViT-L-14",
                 clip_pretrained: str | None = "openai", dtype: str = "float32", device: str = "cpu",
                 backbone: ClipBackbone | None = None, head: AestheticHead | None = None, weights=None) -> None:
        super().__init__(weights)
        if head is None and head_path is None:
            raise ConfigError("reward 'aesthetic' needs head_path: the LAION aesthetic head "
                              "(sac+logos+ava1-l14-linearMSE.pth, a state dict with keys layers.0/2/4/6/7)")
        self.backbone = backbone or load_open_clip(clip_model, clip_pretrained, dtype=dtype, device=device,
                                                   what="aesthetic CLIP backbone")
        dim = self.backbone.embed_dim
        if head is None:
            head = load_aesthetic_head(head_path)
        if head.embed_dim != dim:
            raise ConfigError(f"aesthetic head expects {head.embed_dim}-d CLIP embeddings but the backbone "
                              f"{self.backbone.name} gives {dim}-d")
        self.head = freeze(head).to(self.backbone.device)
        self.device = self.backbone.device

    def embed(self, images: Tensor) -> Tensor:
        return F.normalize(self.backbone.encode_image(images), dim=-1)

    def score(self, samples, prompts, **context):
        return {"score": self.head(self.embed(samples).to(self.head.layers[0].weight.dtype)).float()}
