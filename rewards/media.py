"""Sample files as tensors: an image (C, H, W) or a video (F, C, H, W), float in [0, 1] (scoring
files, preference pairs, reference sets)."""

from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov")


def load_sample(path: Path):
    """An image (C, H, W) or a video (F, C, H, W), float in [0, 1]; a file that cannot be decoded
    (corrupt, truncated, not an image) is a one-line ConfigError naming it."""
    from align.errors import ConfigError

    try:
        return _decode_sample(path)
    except Exception as err:  # noqa: BLE001 - PIL / imageio raise many kinds for a bad file
        kind = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ConfigError(f"{path}: not a readable {kind} ({problem})") from None


def _decode_sample(path: Path):
    import numpy as np
    import torch

    if path.suffix.lower() in VIDEO_SUFFIXES:
        import imageio.v3 as iio

        frames = np.asarray(iio.imread(path, index=None))
        if frames.ndim == 3:
            frames = frames[None]
        frames = frames[..., :3]
        return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255
