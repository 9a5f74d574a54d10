"""OCR reward: does the image show the text the prompt quotes?

``score = 1 - min(d, n) / n`` where ``n`` is the length of the target (the quoted text of the prompt:
``'a sign that says "Open 24 Hours"'`` -> ``Open 24 Hours``) and ``d`` the Levenshtein edit distance
between the target and the recognised text (every detected line above ``min_confidence``, in reading
order). By default both are lower-cased and spaces are dropped, so layout does not matter, only
spelling. Scores are in [0, 1]; a prompt with no quoted text is flagged invalid (``_valid`` False,
the value NaN), not scored 0.

The engine is RapidOCR on onnxruntime (``rapidocr-onnxruntime``, whose package ships the PP-OCR
detection / recognition weights, so nothing is downloaded). Not differentiable.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from align.errors import ConfigError
from rewards.base import Reward, register_reward

_QUOTED = re.compile(r'"([^"]+)"|\u201c([^\u201d]+)\u201d')


def quoted_text(prompt: str) -> str | None:
    """The text between double quotes (straight or curly) in ``prompt``; several quoted parts are joined
    with a space; None when there is none."""
    parts = [a or b for a, b in _QUOTED.findall(prompt)]
    parts = [p.strip() for p in parts if p.strip()]
    return " ".join(parts) if parts else None


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_accuracy(target: str, recognised: str, *, case_sensitive: bool = False, ignore_spaces: bool = True) -> float:
    """1 - min(edit distance, len(target)) / len(target), after the same normalisation of both."""
    def norm(s: str) -> str:
        s = s if case_sensitive else s.lower()
        return re.sub(r"\s+", "", s) if ignore_spaces else " ".join(s.split())

    t, r = norm(target), norm(recognised)
    if not t:
        raise ValueError("empty OCR target")
    return 1.0 - min(edit_distance(t, r), len(t)) / len(t)


def to_uint8_bgr(image: Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 BGR (OpenCV order, as the engine expects)."""
    x = image.detach().float().clamp(0, 1)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    rgb = (x * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return np.ascontiguousarray(rgb[..., ::-1])


def build_engine(threads: int | None = None, det_limit_side_len: int | None = None, **options):
    """A RapidOCR engine (weights shipped inside the package). ``options`` go to ``RapidOCR``."""
    try:
        from rapidocr_onnxruntime import RapidOCR
    except ImportError as err:
        raise ConfigError("reward 'ocr' needs the rapidocr-onnxruntime package "
                          f"(pip install 'align-diffusion[ocr]'): {err}") from None
    kwargs = dict(options)
    if threads is not None:
        kwargs["intra_op_num_threads"] = int(threads)
        kwargs["inter_op_num_threads"] = 1
    if det_limit_side_len is not None:
        kwargs["det_limit_side_len"] = int(det_limit_side_len)
    return RapidOCR(**kwargs)


@register_reward("ocr")
class OcrReward(Reward):
    """Text-rendering accuracy against the prompt's quoted text, in [0, 1].

    Options: ``min_confidence`` (drop recognised lines below it, 0.5), ``case_sensitive`` (False),
    ``ignore_spaces`` (True), ``threads`` (onnxruntime threads; None = its default),
    ``det_limit_side_len`` (detector input size; smaller is faster, the engine's default 736), ``engine``
    (a ready engine: any callable ``(bgr uint8 array) -> (lines, timings)`` where each line is
    ``(box, text, confidence)``). The texts recognised in the last batch are kept in ``last_texts``."""

    differentiable = False
    dimensions = ("score",)

    def __init__(self, min_confidence: float = 0.5, case_sensitive: bool = False, ignore_spaces: bool = True,
                 threads: int | None = None, det_limit_side_len: int | None = None, engine=None,
                 weights=None) -> None:
        super().__init__(weights)
        if not 0 <= min_confidence <= 1:
            raise ConfigError(f"ocr min_confidence must be in [0, 1], got {min_confidence}")
        self.min_confidence = float(min_confidence)
        self.case_sensitive, self.ignore_spaces = bool(case_sensitive), bool(ignore_spaces)
        self.engine = engine or build_engine(threads, det_limit_side_len)
        self.last_texts: list[str | None] = []

    def recognise(self, image: Tensor) -> str:
        lines, _ = self.engine(to_uint8_bgr(image))
        kept = [line for line in (lines or []) if float(line[2]) >= self.min_confidence]
        # reading order: top to bottom, then left to right (box = four corner points)
        kept.sort(key=lambda line: (round(min(p[1] for p in line[0]) / 8), min(p[0] for p in line[0])))
        return " ".join(str(line[1]) for line in kept)

    def score(self, samples: Tensor, prompts: Sequence[str], **context):
        scores, valid, texts = [], [], []
        for image, prompt in zip(samples, prompts):
            target = quoted_text(prompt)
            if target is None:
                scores.append(float("nan")), valid.append(False), texts.append(None)
                continue
            text = self.recognise(image)
            texts.append(text)
            scores.append(ocr_accuracy(target, text, case_sensitive=self.case_sensitive,
                                       ignore_spaces=self.ignore_spaces))
            valid.append(True)
        self.last_texts = texts
        out = {"score": torch.tensor(scores, dtype=torch.float32, device=samples.device)}
        if not all(valid):
            out["_valid"] = torch.tensor(valid, dtype=torch.bool, device=samples.device)
        return out
