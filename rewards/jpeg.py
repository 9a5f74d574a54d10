"""Weight-free rewards: JPEG compressibility and incompressibility.

size = kilobytes of the image saved as JPEG at quality 95; compressibility = -size,
incompressibility = +size. Videos are scored frame by frame and averaged.
"""

from __future__ import annotations

import io

import torch
from torchvision.transforms.functional import to_pil_image

from rewards.base import Reward, register_reward


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Size in kB of each image (B, C, H, W) in [0, 1] saved as JPEG at ``quality``."""
    sizes = []
    for image in images.detach().float().clamp(0, 1).cpu():
        buffer = io.BytesIO()
        to_pil_image(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000.0)
    return torch.tensor(sizes)


@register_reward("jpeg_compressibility")
class JpegCompressibility(Reward):
    dimensions = ("score",)

    def __init__(self, quality: int = 95, weights=None):
        super().__init__(weights)
        self.quality = quality

    def score(self, samples, prompts, **context):
        return {"score": -jpeg_size_kb(samples, self.quality).to(samples.device)}


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(JpegCompressibility):
    def score(self, samples, prompts, **context):
        return {"score": jpeg_size_kb(samples, self.quality).to(samples.device)}
