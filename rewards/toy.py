"""Toy rewards for the embedded default model (coloured digits on a dark background).

They are cheap and differentiable, so every trainer has a reward that moves on a CPU in minutes:

* ``digit`` -- the shipped digit classifier's probability of the digit the prompt asks for
  (``"a red digit 7"`` -> P(7)); a prompt naming no digit scores the top probability (any clear digit).
* ``colour`` -- how well the mean stroke colour matches the colour the prompt asks for: a softmax over
  the palette of ``-|stroke colour - palette colour|^2 / temperature`` read at the requested colour;
  a prompt naming no colour scores 1 (neutral).
* ``digit_judge`` -- the held-out check of ``digit``: 1 when an independent judge (another model family,
  trained on another split of the digits: ``rewards/digit_judge.py``) reads the requested digit, else 0;
  its mean is the judge's accuracy. The embedded default's held-out reward.
* ``stroke_thickness`` -- mean ink: the mean over pixels of the stroke intensity (the per-pixel maximum
  over the channels), in [0, 1]; ``thinner=True`` negates it, ``target`` scores ``-|ink - target|``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from align.errors import ConfigError
from rewards.base import Reward, register_reward

# the classifier module (and the toy pipeline it reads its palette from) is imported when a toy reward
# is built, so `import rewards` stays light


def _dc():
    from rewards import digit_classifier

    return digit_classifier


@register_reward("digit")
class DigitReward(Reward):
    """P(requested digit) from the shipped classifier (or the safetensors file ``classifier_path``)."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, classifier_path: str | Path | None = None, device: str = "cpu", weights=None) -> None:
        super().__init__(weights)
        self.classifier_path = classifier_path
        self.classifier = _dc().load_digit_classifier(classifier_path, device=device)
        self.device = torch.device(device)

    def to(self, device) -> "DigitReward":
        # the loader caches one frozen classifier per (file, device), shared by every user: load the
        # one for the new device rather than moving the shared instance in place
        self.classifier = _dc().load_digit_classifier(self.classifier_path, device=device)
        self.device = torch.device(device)
        return self

    def score(self, samples, prompts, **context):
        digits = [_dc().parse_prompt(p)[0] for p in prompts]
        probs = self.classifier(samples.to(self.device)).softmax(dim=-1)
        idx = torch.tensor([d if d is not None else 0 for d in digits], device=probs.device)
        named = torch.tensor([d is not None for d in digits], device=probs.device)
        requested = probs.gather(1, idx[:, None]).squeeze(1)
        return {"score": torch.where(named, requested, probs.amax(dim=-1))}


@register_reward("digit_judge")
class DigitJudgeReward(Reward):
    """1 when the independent judge's most likely digit is the requested one (a prompt naming no digit:
    the judge and the reward classifier agree), else 0; ``judge_path`` loads other judge weights."""

    differentiable = False
    dimensions = ("accuracy",)

    def __init__(self, judge_path: str | Path | None = None, device: str = "cpu", weights=None) -> None:
        super().__init__(weights)
        from rewards.digit_judge import load_digit_judge

        self.judge_path = judge_path
        self.judge = load_digit_judge(judge_path, device=device)

    def to(self, device) -> "DigitJudgeReward":
        from rewards.digit_judge import load_digit_judge

        self.judge = load_digit_judge(self.judge_path, device=device)
        return self

    def score(self, samples, prompts, **context):
        with torch.no_grad():
            judged = self.judge(samples.to(next(self.judge.parameters()).device)).argmax(dim=-1).cpu()
        digits = [_dc().parse_prompt(p)[0] for p in prompts]
        if any(d is None for d in digits):
            classified = _dc().predict_digits(samples.float().cpu(), _dc().load_digit_classifier())
            digits = [int(c) if d is None else d for d, c in zip(digits, classified)]
        return {"accuracy": (judged == torch.tensor(digits)).float().to(samples.device)}


@register_reward("colour")
class ColourReward(Reward):
    """Palette probability of the requested colour; ``temperature`` sharpens (smaller) or softens it;
    ``colour`` scores one palette colour whatever the prompt says (a style measure, e.g. how blue the
    samples of Adv-GRPO's blue references are)."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, temperature: float = 0.02, colour: str | None = None, weights=None) -> None:
        super().__init__(weights)
        if temperature <= 0:
            raise ConfigError(f"colour reward temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        if colour is not None:
            from pipelines.toy import COLOURS

            if colour not in COLOURS:
                from align.errors import unknown_name_error

                raise unknown_name_error("colour of reward 'colour'", colour, COLOURS)
        self.colour = colour

    def score(self, samples, prompts, **context):
        colours = [self.colour or _dc().parse_prompt(p)[1] for p in prompts]
        named = torch.tensor([c is not None for c in colours], device=samples.device)
        probs = _dc().colour_probability(samples.float(), [c or "white" for c in colours], self.temperature)
        return {"score": torch.where(named, probs, torch.ones_like(probs))}


def mean_ink(images: Tensor) -> Tensor:
    """Mean stroke intensity (B,) of images (B, C, H, W) in [0, 1]; differentiable almost everywhere."""
    return images.float().amax(dim=1).mean(dim=(-2, -1))


@register_reward("stroke_thickness")
class StrokeThickness(Reward):
    """Mean ink (thicker strokes score higher); ``thinner`` flips the sign; ``target`` in [0, 1] scores
    ``-|ink - target|`` instead."""

    differentiable = True
    dimensions = ("score",)

    def __init__(self, thinner: bool = False, target: float | None = None, weights=None) -> None:
        super().__init__(weights)
        if target is not None and not 0 <= target <= 1:
            raise ConfigError(f"stroke_thickness target must be in [0, 1], got {target}")
        self.thinner, self.target = bool(thinner), target

    def score(self, samples, prompts, **context):
        ink = mean_ink(samples)
        if self.target is not None:
            return {"score": -(ink - self.target).abs()}
        return {"score": -ink if self.thinner else ink}
