"""Writing samples: one PNG per image (MP4 per video), grid.png, and strip.png of videos."""

from __future__ import annotations

from pathlib import Path

import torch


def write_strip(videos: torch.Tensor, path: str | Path, scale: int = 4, max_rows: int = 16) -> Path:
    """strip.png: one row per video (up to ``max_rows``), its frames left to right, upscaled ``scale``
    times (nearest) so small videos can be seen; a 1-pixel gap between frames and rows."""
    from torchvision.transforms.functional import to_pil_image

    videos = videos[:max_rows].float().clamp(0, 1)  # (N, F, C, H, W)
    n, f, c, h, w = videos.shape
    canvas = torch.full((c, n * (h + 1) + 1, f * (w + 1) + 1), 0.25)
    for i in range(n):
        for j in range(f):
            canvas[:, 1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w] = videos[i, j]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    to_pil_image(canvas).save(path)
    return Path(path)


#: grids show every sample at least this many pixels high (small ones enlarged, nearest neighbour)
GRID_MIN_PIXELS = 96


def display_scale(height: int) -> int:
    """The integer factor that shows a sample of ``height`` pixels at least GRID_MIN_PIXELS high."""
    return max(1, -(-GRID_MIN_PIXELS // max(1, height)))


def write_samples(pixels: torch.Tensor, prompts: list[str], out: str | Path, columns: int, fps: int = 8) -> Path:
    """One PNG per image (MP4 per video, at their own size), and grid.png of all images (first frames
    for videos), small ones enlarged without smoothing (:func:`display_scale`); videos also get
    strip.png, every frame of each video in a row."""
    from diffusers.utils import export_to_video, make_image_grid
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    firsts = []
    with open(out / "prompts.txt", "w") as index:
        for i, (sample, prompt) in enumerate(zip(pixels, prompts)):
            if sample.ndim == 4:  # (F, C, H, W)
                frames = [to_pil_image(f) for f in sample]
                export_to_video(frames, str(out / f"{i:04d}.mp4"), fps=fps)
                firsts.append(frames[0])
                index.write(f"{i:04d}.mp4\t{prompt}\n")
            else:
                image = to_pil_image(sample)
                image.save(out / f"{i:04d}.png")
                firsts.append(image)
                index.write(f"{i:04d}.png\t{prompt}\n")
    columns = max(1, min(columns, len(firsts)))
    rows = -(-len(firsts) // columns)
    firsts += [firsts[0].copy().point(lambda _: 0)] * (rows * columns - len(firsts))
    grid = make_image_grid(firsts, rows=rows, cols=columns)
    scale = display_scale(firsts[0].height)
    if scale > 1:  # small images (the toy model's 16 px) are enlarged without smoothing, to be seen
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.NEAREST)
    grid.save(out / "grid.png")
    if pixels.ndim == 5:
        write_strip(pixels, out / "strip.png")
    return out / "grid.png"
