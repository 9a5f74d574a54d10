"""Reward throughput on CPU: images per second of every registered reward at batch 8, tiny models.

    python bench/rewards.py                      # every reward, batch 8, 64 px
    python bench/rewards.py --only aesthetic digit --batch 16 --size 128 --threads 2

Model-based rewards use the tiny random models of ``rewards.tiny`` (the real loaders, a few layers of
width 32), so the numbers measure the reward code path (preprocessing, text caching, parsing, HTTP)
rather than a real backbone. Videos (``video_frames``) count frames; the critique reward talks to a
real local server process (``rewards.chat_server --scripted``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS = ["a red digit 7", 'a shop sign that says "Open Late"', "a blue digit 3 on a dark background",
           "a photo of a cat", "a green digit 0", "a yellow digit 5", 'a poster reading "Hello"', "a white digit 9"]


def _text_images(n: int, size: int) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import to_tensor

    out = []
    for i in range(n):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        try:
            font = ImageFont.load_default(size=max(10, size // 6))
        except TypeError:
            font = ImageFont.load_default()
        draw.text((4, size // 3), ["Open Late", "Hello"][i % 2], fill="black", font=font)
        out.append(to_tensor(image))
    return torch.stack(out)


class _Server:
    """``python -m rewards.chat_server --scripted`` on a free local port, for the critique reward."""

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "rewards.chat_server", "--scripted", "--port", "0",
                                      "--max-seconds", "600"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"chat server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{int(line.split()[1])}/v1"
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def build_all(tmp: Path, server_url: str | None) -> dict:
    """name -> (reward, samples kind): tiny-model specs for every built-in reward."""
    from rewards import build_reward
    from rewards.tiny import (TINY_DINO, save_random_aesthetic_head, tiny_dino_checkpoint, tiny_hf_clip,
                              tiny_open_clip_checkpoint, tiny_open_clip_config)

    cfg = tiny_open_clip_config()
    ckpt = str(tiny_open_clip_checkpoint(tmp / "clip.safetensors", cfg))
    head = str(save_random_aesthetic_head(tmp / "head.pth", embed_dim=32))
    hf = str(tiny_hf_clip(tmp / "hf_clip"))
    dino = str(tiny_dino_checkpoint(tmp / "dino.pth"))
    clip = {"clip_model": cfg, "clip_pretrained": ckpt}
    specs = {
        "aesthetic": ({"name": "aesthetic", "head_path": head, **clip}, "image"),
        "clip_score": ({"name": "clip_score", **clip}, "image"),
        "pickscore": ({"name": "pickscore", "model_path": hf, "processor_path": None}, "image"),
        "hpsv2": ({"name": "hpsv2", "clip_model": cfg, "checkpoint": ckpt}, "image"),
        "jpeg_compressibility": ({"name": "jpeg_compressibility"}, "image"),
        "jpeg_incompressibility": ({"name": "jpeg_incompressibility"}, "image"),
        "ocr": ({"name": "ocr", "threads": 1, "det_limit_side_len": 128}, "text"),
        "digit": ({"name": "digit"}, "image"),
        "colour": ({"name": "colour"}, "image"),
        "stroke_thickness": ({"name": "stroke_thickness"}, "image"),
        "video_frames": ({"name": "video_frames", "head_path": head, **clip}, "video"),
        "dino_similarity": ({"name": "dino_similarity", "checkpoint": dino, **TINY_DINO}, "image"),
        "adv_dino": ({"name": "adv_dino", "checkpoint": dino, "hidden": 32, **TINY_DINO}, "image"),
        "noise_aware": ({"name": "noise_aware", "teacher": "digit"}, "image"),
        "latent_prm": ({"name": "latent_prm", "in_channels": 3, "width": 32}, "latent"),
        "ode_completion": ({"name": "ode_completion", "reward": "digit"}, "image"),
        "critique": ({"name": "critique", "base_url": server_url, "model": "critic", "dims": ["visual quality",
                                                                                               "overall"]}, "image"),
        "video_reward": ({"name": "video_reward", "tiny": True}, "video"),
    }
    built = {}
    for name, (spec, kind) in specs.items():
        if spec.get("base_url", "") is None:
            continue
        try:
            reward = build_reward(spec)
            if name in ("dino_similarity", "adv_dino"):  # 16 reference images
                reward.set_references(torch.rand(16, 3, 28, 28, generator=torch.Generator().manual_seed(1)))
            built[name] = (reward, kind)
        except Exception as err:  # a reward that cannot be built here (optional package missing)
            print(f"skip {name}: {type(err).__name__}: {str(err).splitlines()[0]}", file=sys.stderr)
    return built


def time_reward(reward, kind: str, batch: int, size: int, frames: int, min_seconds: float) -> tuple[float, float]:
    """(items per second, seconds per batch); items are frames for videos."""
    g = torch.Generator().manual_seed(0)
    prompts = (PROMPTS * (batch // len(PROMPTS) + 1))[:batch]
    context = {}
    if kind == "video":
        samples = torch.rand(batch, frames, 3, size, size, generator=g)
    elif kind == "text":
        samples = _text_images(batch, size)
    else:
        samples = torch.rand(batch, 3, size, size, generator=g)
    if kind == "latent":
        context = {"latents": torch.randn(batch, 3, size // 4, size // 4, generator=g), "sigma": torch.rand(batch)}
    with torch.no_grad():
        reward(samples, prompts, **context)  # warm-up (caches, lazy init)
        calls, start = 0, time.perf_counter()
        while True:
            reward(samples, prompts, **context)
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds and calls >= 2:
                break
    per_batch = elapsed / calls
    items = batch * (frames if kind == "video" else 1)
    return items / per_batch, per_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--frames", type=int, default=4, help="frames per video")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seconds", type=float, default=1.0, help="minimum timed seconds per reward")
    parser.add_argument("--only", nargs="*", help="reward names to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp, _Server() as server:
        rewards = build_all(Path(tmp), server.url)
        if args.only:
            rewards = {k: v for k, v in rewards.items() if k in args.only}
        rows, rates = [], {}
        for name, (reward, kind) in rewards.items():
            rate, per_batch = time_reward(reward, kind, args.batch, args.size, args.frames, args.seconds)
            unit = "frames/s" if kind == "video" else "images/s"
            rows.append((name, "yes" if reward.differentiable else "no", ",".join(reward.dimensions), f"{rate:,.1f}",
                         unit, f"{per_batch * 1000:,.1f}"))
            rates[name] = rate
    header = ("reward", "diff", "dimensions", "rate", "unit", "ms/batch")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"CPU, torch {torch.__version__}, {args.threads} thread(s), batch {args.batch}, {args.size} px"
          f" (videos: {args.frames} frames), tiny random models")
    fmt = "  ".join("{:<%d}" % w if i < 3 or i == 4 else "{:>%d}" % w for i, w in enumerate(widths))
    print(fmt.format(*header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row))
    slowest = min(rates, key=rates.get)
    print(f"slowest_reward_items_per_second={rates[slowest]:.1f} ({slowest})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
