"""An independent digit judge for the embedded toy model: the held-out check of the digit reward.

The trained reward (``digit``) is a small CNN on 16 x 16 stroke intensities, trained on the train part
of scikit-learn's digits. A generator fine-tuned against it can learn that CNN's quirks instead of
the digits (reward hacking). The judge is another model family on another view and another split of
the data: a multilayer perceptron over the 8 x 8 area-pooled, brightness-normalised intensity (the
digits' native resolution), trained by ``scripts/train_digit_judge.py`` on the *held-out* part of
``pipelines.toy.digit_split`` (the part neither the toy model nor the classifier saw). Its weights
ship in ``rewards/assets/digit_judge.safetensors``. The reward it gives is its accuracy: 1 when its
most likely digit is the digit the prompt asks for, else 0.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: the shipped weights
JUDGE_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digit_judge.safetensors"
#: the judge's input: the digits' native 8 x 8 grid
JUDGE_SIZE = 8


def judge_input(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 64): the per-pixel channel maximum, area-pooled to 8 x 8 and
    divided by its brightest pixel (so a dim stroke reads like a bright one)."""
    x = images.float()
    x = x.amax(dim=1, keepdim=True) if x.shape[1] == 3 else x
    x = F.adaptive_avg_pool2d(x, JUDGE_SIZE).flatten(1)
    return x / x.amax(dim=1, keepdim=True).clamp_min(0.05)


class DigitJudge(nn.Module):
    """MLP 64 -> hidden -> hidden -> 10 digit logits over :func:`judge_input`."""

    def __init__(self, hidden: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(JUDGE_SIZE * JUDGE_SIZE, hidden), nn.ReLU(), nn.Dropout(0.1),
                                 nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, images: Tensor) -> Tensor:
        return self.net(judge_input(images) * 2 - 1)


def load_digit_judge(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitJudge:
    """The shipped judge (or the safetensors file at ``path``), frozen, in eval mode; cached."""
    from rewards.digit_classifier import load_frozen

    return load_frozen(DigitJudge, Path(path) if path is not None else JUDGE_WEIGHTS, device,
                       "scripts/train_digit_judge.py")
