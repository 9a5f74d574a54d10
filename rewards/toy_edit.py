"""Rewards of the embedded editing default (``toy_edit``: instructions on coloured 16 x 16 digits,
``pipelines.toy_edit``). Each prompt is an instruction carrying its source image.

* ``edit_instruction`` -- the trained reward, differentiable: how well the edit does what its
  instruction asks (:func:`pipelines.toy_edit.parse_edit`): a recolour scores the palette
  probability of the new colour (as the ``colour`` reward); "thicker" scores
  ``sigmoid((ink(edit) - ink(source)) / ink_scale)`` and "thinner" the same with the sign flipped
  (ink: the mean stroke intensity, ``rewards.toy.mean_ink``); a new digit scores the reward
  classifier's probability of it; the empty instruction scores ``1 - mean |edit - source|``.
* ``edit_judge`` -- the held-out check, 0 / 1 per attribute, read by the independent digit judge
  (``rewards/digit_judge.py``) that no reward trains against:

  - ``instruction``: the edit did what was asked: the stroke colour's nearest palette colour is the
    new one; the ink grew (or shrank) by at least ``ink_margin``; the judge reads the new digit;
    (empty instruction: everything below kept);
  - ``preservation``: the fraction of the attributes the instruction keeps that the edit kept: the
    digit (the judge reads the source's digit in both), the colour (the same nearest palette colour),
    the position (ink centroids within ``position_tolerance`` pixels; ``digit_position_tolerance``
    for a new digit, whose shape moves its centroid: up to 2.9 px between the data's own pairs).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from rewards.base import Reward, register_reward
from rewards.edit import edit_sources


def _edits(prompts: Sequence[str]) -> list[tuple[str, object]]:
    from pipelines.toy_edit import parse_edit

    return [parse_edit(p) for p in prompts]


def ink_centroid(images: Tensor) -> Tensor:
    """(B, 2) ink-weighted mean (row, column) of images (B, C, H, W), the ink the per-pixel maximum
    over channels."""
    ink = images.float().amax(dim=1)
    rows = torch.arange(ink.shape[-2], dtype=ink.dtype, device=ink.device)[:, None]
    cols = torch.arange(ink.shape[-1], dtype=ink.dtype, device=ink.device)[None, :]
    total = ink.sum(dim=(-2, -1)).clamp_min(1e-6)
    return torch.stack([(ink * rows).sum(dim=(-2, -1)) / total, (ink * cols).sum(dim=(-2, -1)) / total], dim=-1)


def nearest_colour(images: Tensor) -> Tensor:
    """(B,) index in :data:`pipelines.toy.COLOURS` of the palette colour nearest each image's stroke colour."""
    from pipelines.toy import palette_tensor
    from rewards.digit_classifier import stroke_colour

    palette = palette_tensor().to(images.device)
    return (stroke_colour(images)[:, None, :] - palette[None]).pow(2).sum(-1).argmin(-1)


@register_reward("edit_instruction")
class EditInstruction(Reward):
    """The toy edit's instruction following (module docstring). Options: ``temperature`` (the colour
    softmax), ``ink_scale`` (the ink change that scores sigmoid(1))."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, temperature: float = 0.02, ink_scale: float = 0.05, weights=None) -> None:
        super().__init__(weights)
        from align.errors import ConfigError

        if temperature <= 0 or ink_scale <= 0:
            raise ConfigError(f"edit_instruction: temperature and ink_scale must be > 0, got {temperature}, {ink_scale}")
        self.temperature, self.ink_scale = float(temperature), float(ink_scale)

    def score(self, samples, prompts, **context):
        from rewards.digit_classifier import colour_probability, load_digit_classifier
        from rewards.toy import mean_ink

        sources = edit_sources(prompts, samples, self.name)
        edits = _edits(prompts)
        grow = (mean_ink(samples) - mean_ink(sources)) / self.ink_scale
        colours = [value if kind == "colour" else "white" for kind, value in edits]
        by_colour = colour_probability(samples.float(), colours, self.temperature)
        digits = torch.tensor([value if kind == "digit" else 0 for kind, value in edits], device=samples.device)
        probs = load_digit_classifier(device=samples.device)(samples).softmax(dim=-1)
        by_digit = probs.gather(1, digits[:, None]).squeeze(1)
        kept = 1 - (samples.float() - sources).abs().mean(dim=(1, 2, 3))
        table = {"colour": by_colour, "thicker": torch.sigmoid(grow), "thinner": torch.sigmoid(-grow),
                 "digit": by_digit, "keep": kept}
        rows = torch.arange(len(edits), device=samples.device)
        stacked = torch.stack([table[kind] for kind in ("colour", "thicker", "thinner", "digit", "keep")], dim=1)
        which = torch.tensor([("colour", "thicker", "thinner", "digit", "keep").index(kind) for kind, _ in edits],
                             device=samples.device)
        return {"score": stacked[rows, which]}


@register_reward("edit_judge")
class EditJudge(Reward):
    """The toy edit's held-out judge (module docstring). Options: ``ink_margin`` (the ink change that
    counts as thicker / thinner), ``position_tolerance`` and ``digit_position_tolerance`` (pixels),
    ``judge_path``."""

    differentiable = False
    dimensions = ("instruction", "preservation")

    def __init__(self, ink_margin: float = 0.05, position_tolerance: float = 1.5,
                 digit_position_tolerance: float = 3.0, judge_path: str | None = None, device: str = "cpu",
                 weights=None) -> None:
        super().__init__(weights)
        from rewards.digit_judge import load_digit_judge

        self.ink_margin, self.position_tolerance = float(ink_margin), float(position_tolerance)
        self.digit_position_tolerance = float(digit_position_tolerance)
        self.judge_path = judge_path
        self.judge = load_digit_judge(judge_path, device=device)

    def to(self, device) -> "EditJudge":
        from rewards.digit_judge import load_digit_judge

        self.judge = load_digit_judge(self.judge_path, device=device)
        return self

    @torch.no_grad()
    def score(self, samples, prompts, **context):
        from pipelines.toy import COLOURS
        from rewards.toy import mean_ink

        samples = samples.float()
        sources = edit_sources(prompts, samples, self.name)
        device = next(self.judge.parameters()).device
        read_edit = self.judge(samples.to(device)).argmax(-1).to(samples.device)
        read_source = self.judge(sources.to(device)).argmax(-1).to(samples.device)
        colour_edit, colour_source = nearest_colour(samples), nearest_colour(sources)
        ink_change = mean_ink(samples) - mean_ink(sources)
        moved = (ink_centroid(samples) - ink_centroid(sources)).norm(dim=-1)
        edits = _edits(prompts)
        tolerance = torch.tensor([self.digit_position_tolerance if kind == "digit" else self.position_tolerance
                                  for kind, _ in edits], device=samples.device)
        same = {"digit": read_edit == read_source, "colour": colour_edit == colour_source,
                "position": moved <= tolerance}
        instruction, preservation = [], []
        for i, (kind, value) in enumerate(edits):
            done = {"colour": lambda: bool(colour_edit[i] == COLOURS.index(value)),
                    "thicker": lambda: bool(ink_change[i] >= self.ink_margin),
                    "thinner": lambda: bool(ink_change[i] <= -self.ink_margin),
                    "digit": lambda: bool(read_edit[i] == value),
                    "keep": lambda: all(bool(same[k][i]) for k in same)}[kind]()
            kept = [k for k in same if k != {"colour": "colour", "digit": "digit"}.get(kind)]
            instruction.append(float(done))
            preservation.append(sum(float(same[k][i]) for k in kept) / len(kept))
        return {"instruction": torch.tensor(instruction, device=samples.device),
                "preservation": torch.tensor(preservation, device=samples.device)}
