"""The shipped toy video model's figures at its default settings (10 Euler steps, CFG 3), over every
digit x direction with the colours rotating:

* the independent digit judge (``frame_judge``: trained on digits neither the model nor the reward
  classifier saw) -- the fraction of frames in which it reads the requested digit, and the same
  figure on the training data's own videos (the judge's ceiling);
* the reward classifier (``frame_digit``'s) -- the same fraction by the classifier the rewards use;
* direction -- the fraction of videos whose digit moves the requested way (centre-of-mass displacement).

    python scripts/check_toy_video.py [--per-cell 2] [--strip strip.png]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclass
class VideoFigures:
    #: frames of the model's videos in which the judge reads the requested digit
    judge_frames: float
    #: frames of the training data's videos in which the judge reads their digit
    judge_data_frames: float
    #: frames of the model's videos in which the reward classifier reads the requested digit
    classifier_frames: float
    #: videos whose digit moves the requested way
    direction: float


def cell_prompts(per_cell: int) -> tuple[list[str], list[int], list[str]]:
    """Every digit x direction ``per_cell`` times, the colours rotating: (prompts, digits, directions)."""
    from pipelines.toy import COLOURS
    from pipelines.toy_video import DIRECTIONS, video_prompt

    cells = [(d, m) for k in range(per_cell) for d in range(10) for m in DIRECTIONS]
    prompts = [video_prompt(d, COLOURS[i % len(COLOURS)], m) for i, (d, m) in enumerate(cells)]
    return prompts, [d for d, _ in cells], [m for _, m in cells]


def data_videos(count: int, seed: int = 0):
    """``count`` videos of the model's training data (the train split's digits, random colours,
    directions in turn) and their digits."""
    import torch

    from pipelines.toy import COLOURS, digit_split
    from pipelines.toy_video import DIRECTIONS, moving_digits

    images, labels, _, _ = digit_split()
    g = torch.Generator().manual_seed(seed)
    pick = torch.randperm(len(labels), generator=g)[:count]
    colours = torch.randint(0, len(COLOURS), (count,), generator=g)
    moves = [list(DIRECTIONS)[i % 4] for i in range(count)]
    return moving_digits(images[pick], colours, moves, generator=g), labels[pick]


def measure(adapter, per_cell: int = 2, seed: int = 0):
    """(:class:`VideoFigures`, videos, prompts) of the adapter's ODE samples at its default settings."""
    import torch

    from align.sampling.rollout import RolloutConfig, rollout
    from rewards import build_reward
    from rewards.digit_classifier import load_digit_classifier
    from rewards.toy_video import digit_windows, predict_directions

    prompts, digits, moves = cell_prompts(per_cell)
    judge = build_reward("frame_judge")
    with torch.no_grad():
        out = rollout(adapter, adapter.encode(prompts), RolloutConfig(num_steps=adapter.default_steps, kernel="ode"),
                      generator=torch.Generator().manual_seed(seed))
        videos = adapter.decode(out.samples)
        classified = load_digit_classifier()(digit_windows(videos)).argmax(-1).reshape(len(prompts), -1)
        data, labels = data_videos(len(prompts), seed)
    wanted = torch.tensor(digits)[:, None]
    figures = VideoFigures(
        judge_frames=float((judge.frame_digits(videos) == wanted).float().mean()),
        judge_data_frames=float((judge.frame_digits(data) == labels[:, None]).float().mean()),
        classifier_frames=float((classified == wanted).float().mean()),
        direction=sum(a == b for a, b in zip(predict_directions(videos), moves)) / len(moves))
    return figures, videos, prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-cell", type=int, default=2)
    parser.add_argument("--model-path", default=None)
    parser.add_argument("--strip", default=None, help="write a frame strip of the first 16 videos here")
    args = parser.parse_args()

    from pipelines.toy_video import load_toy_video_adapter

    figures, videos, prompts = measure(load_toy_video_adapter(args.model_path), args.per_cell)
    print(f"{len(prompts)} videos, {videos.shape[1]} frames each:")
    print(f"judge: requested digit in {figures.judge_frames:.1%} of frames "
          f"(the training data's videos: {figures.judge_data_frames:.1%})")
    print(f"reward classifier: requested digit in {figures.classifier_frames:.1%} of frames")
    print(f"direction: requested direction in {figures.direction:.1%} of videos")
    if args.strip:
        from align.media import write_strip

        write_strip(videos[:16], args.strip)
        print(f"frame strip: {args.strip} ({', '.join(prompts[:4])}, ...)")


if __name__ == "__main__":
    main()
