"""The shipped toy video model's figures at its default settings (10 Euler steps, CFG 3): how often
the shipped digit classifier finds the requested digit in a frame (read in a window centred on the
digit), and how often the video moves in the requested direction (centre-of-mass displacement).

    python scripts/check_toy_video.py [--per-cell 2] [--strip strip.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(adapter, per_cell: int = 2, seed: int = 0):
    """(frame digit accuracy, direction accuracy, videos, prompts) over every digit x direction,
    colours rotating, ``per_cell`` videos each."""
    import torch

    from pipelines.toy import COLOURS
    from pipelines.toy_video import DIRECTIONS, video_prompt
    from rewards.digit_classifier import load_digit_classifier
    from rewards.toy_video import centred_crops, predict_directions

    cells = [(d, m) for d in range(10) for m in DIRECTIONS]
    prompts = [video_prompt(d, COLOURS[(i + k) % len(COLOURS)], m) for k in range(per_cell)
               for i, (d, m) in enumerate(cells)]
    cond = adapter.encode(prompts)
    from align.sampling.rollout import RolloutConfig, rollout

    with torch.no_grad():
        out = rollout(adapter, cond, RolloutConfig(num_steps=adapter.default_steps, kernel="ode"),
                      generator=torch.Generator().manual_seed(seed))
        videos = adapter.decode(out.samples)
        digits = torch.tensor([d for _ in range(per_cell) for d, _ in cells])
        frames = centred_crops(videos.flatten(0, 1), 10.0)
        predicted = load_digit_classifier()(frames).argmax(-1).reshape(len(prompts), -1)
    digit_accuracy = float((predicted == digits[:, None]).float().mean())
    wanted = [m for _ in range(per_cell) for _, m in cells]
    direction_accuracy = sum(a == b for a, b in zip(predict_directions(videos), wanted)) / len(wanted)
    return digit_accuracy, direction_accuracy, videos, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=2)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--strip", default=None, help="write a frame strip of the first 16 videos here")
    args = parser.parse_args()

    from pipelines.toy_video import load_toy_video_adapter

    adapter = load_toy_video_adapter(args.model_path)
    digit, direction, videos, prompts = measure(adapter, args.per_cell)
    print(f"{len(prompts)} videos: requested digit in {digit:.1%} of frames, requested direction in "
          f"{direction:.1%} of videos")
    if args.strip:
        from align.media import write_strip

        write_strip(videos, args.strip)
        print(f"frame strip: {args.strip} ({', '.join(prompts[:4])}, ...)")


if __name__ == "__main__":
    main()
