"""Rewards of the embedded video default (digits that move; ``pipelines.toy_video``).

Videos are (B, F, 3, H, W) in [0, 1]; every function is plain differentiable torch.

* ``motion`` -- dimensions ``direction``: the displacement of the digit's centre of mass (stroke
  intensity weighted) from the first frame to the last, projected on the direction the prompt asks
  for ("... moving left") and divided by the clip's full travel (1: a full crossing the right way,
  -1: the wrong way; a prompt naming no direction scores the distance moved in any direction), and
  ``smoothness``: minus the mean deviation of the per-frame steps from their mean step, in units of
  that mean step's length for a full crossing (0: constant velocity).
* ``frame_digit`` -- the mean over frames of the shipped digit classifier's probability of the
  requested digit, each frame read in a window of the digit's size centred on its centre of mass
  (the classifier was trained on digits that fill the image).
* ``consistency`` -- the digit staying itself across the clip: dimensions ``identity``, the mean over
  frames of the cosine similarity between the frame's window (stroke intensity, centred on the
  digit) and the clip's mean window, and ``colour``, one minus the mean distance of each frame's
  stroke colour from the clip's mean stroke colour in units of ``colour_tolerance`` (0.1 of the
  colour scale: a clip whose colours spread that far scores 0, one that flickers between two
  palette colours far below).
* ``frame_judge`` -- the held-out check of ``frame_digit``: the fraction of frames in which the
  independent digit judge (``rewards/digit_judge.py``: another model family, trained on the digits
  neither the video model nor the classifier saw) reads the requested digit in the same window.
  The embedded video default's held-out reward.

The frame-level dimensions of ``video_frames`` (temporal consistency, motion smoothness of CLIP
features) apply to these videos as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward


def _videos(samples: Tensor, who: str) -> Tensor:
    if samples.ndim != 5:
        raise RewardError(f"reward {who!r} scores videos (B, F, C, H, W), got shape {tuple(samples.shape)}")
    return samples.float()


def centre_of_mass(videos: Tensor, eps: float = 1e-6) -> Tensor:
    """(B, F, C, H, W) -> (B, F, 2) the intensity-weighted (x, y) pixel centre of every frame
    (intensity = the maximum over channels)."""
    ink = videos.amax(dim=2)  # (B, F, H, W)
    h, w = ink.shape[-2:]
    ys = torch.arange(h, dtype=ink.dtype, device=ink.device)
    xs = torch.arange(w, dtype=ink.dtype, device=ink.device)
    mass = ink.sum(dim=(-2, -1)) + eps
    cx = (ink.sum(dim=-2) * xs).sum(-1) / mass
    cy = (ink.sum(dim=-1) * ys).sum(-1) / mass
    return torch.stack([cx, cy], dim=-1)


def direction_score(com: Tensor, directions: list, travel: float) -> Tensor:
    """(B,) displacement first -> last frame projected on each unit direction (dx, dy) / ``travel``;
    None: the displacement's length / travel."""
    disp = com[:, -1] - com[:, 0]
    scores = []
    for i, d in enumerate(directions):
        if d is None:
            scores.append(disp[i].norm())
        else:
            scores.append(disp[i, 0] * d[0] + disp[i, 1] * d[1])
    return torch.stack(scores) / travel


def smoothness_score(com: Tensor, travel: float) -> Tensor:
    """(B,) minus the mean distance of the per-frame steps from their mean, in units of the step of
    a full crossing at constant speed (travel / (F - 1))."""
    steps = com[:, 1:] - com[:, :-1]
    deviation = (steps - steps.mean(dim=1, keepdim=True)).norm(dim=-1).mean(dim=1)
    return -deviation / (travel / steps.shape[1])


def predict_directions(videos: Tensor) -> list[str]:
    """The direction each video moves in: the one of ``left/right/up/down`` the centre of mass's
    displacement from the first frame to the last projects on most."""
    from pipelines.toy_video import DIRECTIONS

    disp = centre_of_mass(_videos(videos, "predict_directions"))
    disp = disp[:, -1] - disp[:, 0]
    units = torch.tensor(list(DIRECTIONS.values()), dtype=disp.dtype, device=disp.device)
    names = list(DIRECTIONS)
    return [names[i] for i in (disp @ units.T).argmax(-1).tolist()]


@register_reward("motion")
class MotionReward(Reward):
    """Direction and smoothness of the digit's motion; ``travel`` (pixels of a full crossing) defaults
    to the toy video's."""

    differentiable = True
    handles_video = True
    dimensions = ("direction", "smoothness")

    def __init__(self, travel: float | None = None, weights=None) -> None:
        super().__init__(weights)
        from pipelines.toy_video import TRAVEL

        self.travel = float(travel or TRAVEL)

    def score(self, samples, prompts, **context):
        from pipelines.toy_video import DIRECTIONS, parse_direction

        com = centre_of_mass(_videos(samples, self.name))
        wanted = [DIRECTIONS.get(parse_direction(p)) if parse_direction(p) else None for p in prompts]
        return {"direction": direction_score(com, wanted, self.travel), "smoothness": smoothness_score(com, self.travel)}


def centred_crops(frames: Tensor, size: float, out: int = 16) -> Tensor:
    """(N, C, H, W) -> (N, C, out, out): a ``size``-pixel window centred on each frame's centre of
    mass, bilinear (differentiable in the pixels and the centre)."""
    n, c, h, w = frames.shape
    com = centre_of_mass(frames[:, None])[:, 0]  # (N, 2)
    theta = torch.zeros(n, 2, 3, dtype=frames.dtype, device=frames.device)
    theta[:, 0, 0], theta[:, 1, 1] = size / w, size / h
    theta[:, 0, 2] = (2 * com[:, 0] + 1) / w - 1  # pixel centre -> normalised coordinate
    theta[:, 1, 2] = (2 * com[:, 1] + 1) / h - 1
    grid = F.affine_grid(theta, (n, c, out, out), align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@register_reward("frame_digit")
class FrameDigitReward(Reward):
    """Mean over frames of P(requested digit) from the shipped digit classifier, each frame read in a
    window of ``window`` pixels (the toy video's digit size) centred on the digit."""

    differentiable = True
    handles_video = True
    dimensions = ("score",)

    def __init__(self, window: float | None = None, device: str = "cpu", weights=None) -> None:
        super().__init__(weights)
        from pipelines.toy_video import DIGIT_SIZE
        from rewards.digit_classifier import load_digit_classifier

        self.window = float(window or DIGIT_SIZE)
        self.classifier = load_digit_classifier(device=device)
        self.device = torch.device(device)

    def to(self, device) -> "FrameDigitReward":
        from rewards.digit_classifier import load_digit_classifier

        self.classifier = load_digit_classifier(device=device)  # the loader's shared, cached instance
        self.device = torch.device(device)
        return self

    def frame_probabilities(self, videos: Tensor, prompts) -> Tensor:
        """(B, F) probability of each prompt's digit in each frame (the most likely digit's when the
        prompt names none)."""
        from rewards.digit_classifier import parse_prompt

        videos = _videos(videos, self.name).to(self.device)
        b, f = videos.shape[:2]
        probs = self.classifier(digit_windows(videos, self.window)).softmax(-1).reshape(b, f, 10)
        digits = [parse_prompt(p)[0] for p in prompts]
        idx = torch.tensor([d if d is not None else 0 for d in digits], device=probs.device)
        named = torch.tensor([d is not None for d in digits], device=probs.device)
        requested = probs.gather(2, idx[:, None, None].expand(b, f, 1)).squeeze(-1)
        return torch.where(named[:, None], requested, probs.amax(-1))

    def score(self, samples, prompts, **context):
        return {"score": self.frame_probabilities(samples, prompts).mean(dim=1)}


def digit_windows(videos: Tensor, window: float | None = None) -> Tensor:
    """(B, F, C, H, W) -> (B F, C, 16, 16): each frame's window of ``window`` pixels (the toy video's
    digit size) centred on the digit, as ``frame_digit`` and ``frame_judge`` read it."""
    from pipelines.toy_video import DIGIT_SIZE

    return centred_crops(videos.flatten(0, 1), float(window or DIGIT_SIZE))


@register_reward("consistency")
class ConsistencyReward(Reward):
    """The digit keeping its shape (``identity``) and its colour (``colour``) from frame to frame;
    both 1 for a clip whose frames show the same glyph in the same colour. ``colour_tolerance``: the
    mean colour distance that scores 0 (stroke colours rescaled to a largest channel of 1)."""

    differentiable = True
    handles_video = True
    dimensions = ("identity", "colour")

    def __init__(self, window: float | None = None, colour_tolerance: float = 0.1, weights=None) -> None:
        super().__init__(weights)
        if colour_tolerance <= 0:
            raise ConfigError(f"consistency colour_tolerance must be > 0, got {colour_tolerance}")
        self.window, self.colour_tolerance = window, float(colour_tolerance)

    def score(self, samples, prompts, **context):
        from rewards.digit_classifier import stroke_colour

        videos = _videos(samples, self.name)
        b, f = videos.shape[:2]
        shapes = digit_windows(videos, self.window).amax(dim=1).reshape(b, f, -1)  # stroke intensity
        identity = F.cosine_similarity(shapes, shapes.mean(dim=1, keepdim=True), dim=-1, eps=1e-6).mean(dim=1)
        colours = stroke_colour(videos.flatten(0, 1)).reshape(b, f, 3)
        spread = (colours - colours.mean(dim=1, keepdim=True)).norm(dim=-1).mean(dim=1)
        return {"identity": identity, "colour": 1 - spread / self.colour_tolerance}


@register_reward("frame_judge")
class FrameJudgeReward(Reward):
    """Fraction of frames whose window the independent digit judge reads as the requested digit (a
    prompt naming no digit: the digit the reward classifier reads in that frame)."""

    differentiable = False
    handles_video = True
    dimensions = ("accuracy",)

    def __init__(self, window: float | None = None, judge_path=None, device: str = "cpu", weights=None) -> None:
        super().__init__(weights)
        from rewards.digit_judge import load_digit_judge

        self.window, self.judge_path = window, judge_path
        self.judge = load_digit_judge(judge_path, device=device)
        self.device = torch.device(device)

    def to(self, device) -> "FrameJudgeReward":
        from rewards.digit_judge import load_digit_judge

        self.judge = load_digit_judge(self.judge_path, device=device)  # the loader's shared, cached instance
        self.device = torch.device(device)
        return self

    def frame_digits(self, videos: Tensor) -> Tensor:
        """(B, F) the judge's digit in every frame."""
        videos = _videos(videos, self.name).to(self.device)
        with torch.no_grad():
            return self.judge(digit_windows(videos, self.window)).argmax(-1).reshape(videos.shape[:2])

    def score(self, samples, prompts, **context):
        from rewards.digit_classifier import load_digit_classifier, parse_prompt, predict_digits

        judged = self.frame_digits(samples)
        wanted = torch.tensor([-1 if (d := parse_prompt(p)[0]) is None else d for p in prompts], device=judged.device)
        wanted = wanted[:, None].expand_as(judged)
        if bool((wanted < 0).any()):
            windows = digit_windows(_videos(samples, self.name).to(self.device), self.window)
            read = predict_digits(windows, load_digit_classifier(device=self.device)).reshape(judged.shape)
            wanted = torch.where(wanted < 0, read, wanted)
        return {"accuracy": (judged == wanted).float().mean(dim=1).to(samples.device)}
