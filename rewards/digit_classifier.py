"""Digit classifier reward for the embedded toy model.

A small CNN (trained by ``scripts/train_digit_classifier.py`` on the coloured scikit-learn digits, with
shift / rotation / colour / blur / noise augmentation) whose weights ship in
``rewards/assets/digit_classifier.safetensors``. Preprocessing is plain differentiable torch, so the
probabilities can be back-propagated into the generator (reward backprop):

* :func:`digit_probability` -- the probability of the requested digit for images (B, 3, H, W) in [0, 1]
  of any size and any stroke colour (strokes on a dark background);
* :func:`colour_probability` -- how well the mean stroke colour matches a palette colour;
* :func:`parse_prompt` -- the digit and colour a prompt asks for (``"a red digit 7"`` -> ``(7, "red")``);
* :func:`digit_reward` -- digit probability (optionally times colour probability) per prompt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipelines.toy import COLOURS, DIGIT_WORDS, PALETTE, ToyTokenizer

#: the shipped weights
CLASSIFIER_WEIGHTS = Path(__file__).resolve().parent / "assets" / "digit_classifier.safetensors"
#: the classifier's input resolution
INPUT_SIZE = 16


def parse_prompt(prompt: str) -> tuple[int | None, str | None]:
    """The digit (numeral or number word) and palette colour a prompt asks for; ``None`` where absent.
    ``parse_prompt("a red digit 7") == (7, "red")``, ``parse_prompt("the number seven") == (7, None)``."""
    digit = colour = None
    for word in ToyTokenizer.split(prompt):
        if digit is None and word in DIGIT_WORDS:
            digit = DIGIT_WORDS[word]
        elif colour is None and word in PALETTE:
            colour = word
    return digit, colour


def to_intensity(images: Tensor, size: int = INPUT_SIZE) -> Tensor:
    """(B, 3, H, W) in [0, 1] -> (B, 1, size, size) stroke intensity (the per-pixel maximum over the
    channels, so every saturated colour looks the same); differentiable."""
    x = images.float()
    if x.shape[1] == 3:
        x = x.amax(dim=1, keepdim=True)
    elif x.shape[1] != 1:
        raise ValueError(f"expected 1 or 3 channels, got {tuple(images.shape)}")
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        if h >= size and w >= size and h % size == 0 and w % size == 0:
            x = F.adaptive_avg_pool2d(x, size)
        else:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                              antialias=h > size or w > size)
    return x


class DigitClassifier(nn.Module):
    """Small CNN over 1 x 16 x 16 stroke intensities -> 10 digit logits. ``forward`` takes RGB (or grey)
    images in [0, 1] of any size and does the preprocessing itself."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),                                   # 8 x 8
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.AvgPool2d(2),                                   # 4 x 4
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(2 * w * 16, 128), nn.SiLU(),
                                  nn.Linear(128, 10))

    def forward(self, images: Tensor) -> Tensor:
        x = to_intensity(images) * 2 - 1
        return self.head(self.features(x))


_CACHE: dict[tuple[str, str, str], nn.Module] = {}


def load_frozen(model_cls: type[nn.Module], path: Path, device: str | torch.device, script: str) -> nn.Module:
    """``model_cls`` with the safetensors weights at ``path``, frozen, in eval mode, cached per file
    and device (the toy rewards' small models); a missing file names the ``script`` that trains it."""
    from safetensors.torch import load_file

    key = (model_cls.__name__, str(path), str(torch.device(device)))
    if key not in _CACHE:
        if not path.exists():
            raise FileNotFoundError(f"no {model_cls.__name__} weights at {path} (train them with {script})")
        model = model_cls()
        model.load_state_dict(load_file(str(path)))
        model.requires_grad_(False)
        _CACHE[key] = model.to(device).eval()
    return _CACHE[key]


def load_digit_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped classifier (or the safetensors file at ``path``), frozen, in eval mode; cached."""
    return load_frozen(DigitClassifier, Path(path) if path is not None else CLASSIFIER_WEIGHTS, device,
                       "scripts/train_digit_classifier.py")


def _digit_tensor(digits: int | Sequence[int] | Tensor, batch: int, device) -> Tensor:
    d = torch.as_tensor(digits, dtype=torch.long, device=device)
    return d.expand(batch) if d.ndim == 0 else d


def digit_probability(images: Tensor, digits: int | Sequence[int] | Tensor,
                      classifier: DigitClassifier | None = None) -> Tensor:
    """Classifier probability (B,) of digit ``digits[i]`` in image ``images[i]`` ((B, 3, H, W) in [0, 1]);
    differentiable with respect to ``images``."""
    classifier = classifier or load_digit_classifier(device=images.device)
    probs = classifier(images).softmax(dim=-1)
    d = _digit_tensor(digits, images.shape[0], images.device)
    return probs.gather(1, d[:, None]).squeeze(1)


def predict_digits(images: Tensor, classifier: DigitClassifier | None = None) -> Tensor:
    """The most likely digit (B,) of each image."""
    classifier = classifier or load_digit_classifier(device=images.device)
    with torch.no_grad():
        return classifier(images).argmax(dim=-1)


def stroke_colour(images: Tensor) -> Tensor:
    """Mean stroke colour (B, 3) of images in [0, 1], weighted by stroke intensity and rescaled so its
    largest channel is 1 (comparable with :data:`~pipelines.toy.PALETTE`)."""
    x = images.float()
    w = x.amax(dim=1, keepdim=True) ** 2
    mean = (x * w).sum(dim=(2, 3)) / w.sum(dim=(2, 3)).clamp_min(1e-6)
    return mean / mean.amax(dim=1, keepdim=True).clamp_min(1e-6)


def colour_probability(images: Tensor, colours: str | Sequence[str], temperature: float = 0.02) -> Tensor:
    """Softmax over the palette of ``-|stroke colour - palette colour|^2 / temperature``, read at the
    requested colour (B,); differentiable."""
    colours = [colours] * images.shape[0] if isinstance(colours, str) else list(colours)
    palette = torch.tensor([PALETTE[c] for c in COLOURS], device=images.device)
    dist = (stroke_colour(images)[:, None, :] - palette[None]).pow(2).sum(-1)
    probs = (-dist / temperature).softmax(dim=-1)
    idx = torch.tensor([COLOURS.index(c) for c in colours], device=images.device)
    return probs.gather(1, idx[:, None]).squeeze(1)


def digit_reward(images: Tensor, prompts: Sequence[str], use_colour: bool = False) -> Tensor:
    """Per-prompt reward (B,): the probability of the prompt's digit (the classifier's top probability
    when the prompt names none), times the colour probability when ``use_colour`` and a colour is named."""
    parsed = [parse_prompt(p) for p in prompts]
    classifier = load_digit_classifier(device=images.device)
    probs = classifier(images).softmax(dim=-1)
    top = probs.amax(dim=-1)
    digits = torch.tensor([d if d is not None else 0 for d, _ in parsed], device=images.device)
    has_digit = torch.tensor([d is not None for d, _ in parsed], device=images.device)
    reward = torch.where(has_digit, probs.gather(1, digits[:, None]).squeeze(1), top)
    if use_colour:
        named = [c or COLOURS[0] for _, c in parsed]
        has_colour = torch.tensor([c is not None for _, c in parsed], device=images.device)
        reward = reward * torch.where(has_colour, colour_probability(images, named), torch.ones_like(reward))
    return reward
