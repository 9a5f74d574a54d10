"""OCR reward: target parsing, the accuracy formula, and the real RapidOCR engine on rendered text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from align.config import ConfigError
from rewards import build_reward
from rewards.ocr import edit_distance, ocr_accuracy, quoted_text

ROOT = Path(__file__).resolve().parents[1]
OCR_PROMPTS = ROOT.parent / "shared" / "assets" / "ocr_test_prompts.txt"


def test_quoted_text():
    assert quoted_text('a neon sign that says "Open 24 Hours" at night') == "Open 24 Hours"
    assert quoted_text("a book titled \u201cDeep Sea\u201d") == "Deep Sea"
    assert quoted_text('"Fresh" and "Tasty" stickers') == "Fresh Tasty"
    assert quoted_text("a cat") is None and quoted_text('empty ""') is None


@pytest.mark.skipif(not OCR_PROMPTS.is_file(), reason=f"{OCR_PROMPTS} not found (shared/assets is only on the "
                                                        "project's machines)")
def test_every_shipped_ocr_prompt_has_a_target():
    prompts = [p for p in OCR_PROMPTS.read_text(encoding="utf-8").splitlines() if p.strip()]
    assert len(prompts) > 1000
    assert all(quoted_text(p) for p in prompts)


def test_edit_distance_and_accuracy():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "abc") == 0
    assert ocr_accuracy("Hello World", "hello world") == 1.0          # case and spaces ignored
    assert ocr_accuracy("Hello World", "HelloWorld") == 1.0
    assert ocr_accuracy("Hello", "Hallo") == pytest.approx(0.8)
    assert ocr_accuracy("Hi", "a very long wrong text") == 0.0        # distance clipped at len(target)
    assert ocr_accuracy("Hello", "hello", case_sensitive=True) == pytest.approx(0.8)
    assert ocr_accuracy("a b", "ab", ignore_spaces=False) == pytest.approx(2 / 3)


class ScriptedEngine:
    """Stands in for the OCR engine in the formula tests: returns fixed lines, bottom line first."""

    def __init__(self, lines):
        self.lines = lines

    def __call__(self, image):
        return self.lines, [0.0]


def test_reading_order_confidence_and_invalid_prompts():
    lines = [([[0, 40], [50, 40], [50, 60], [0, 60]], "World", 0.9),
             ([[0, 0], [50, 0], [50, 20], [0, 20]], "Hello", 0.95),
             ([[60, 0], [90, 0], [90, 20], [60, 20]], "noise", 0.2)]
    reward = build_reward({"name": "ocr", "engine": ScriptedEngine(lines)})
    out = reward(torch.zeros(2, 3, 64, 64), ['"Hello World"', "no quoted text"])
    assert reward.last_texts == ["Hello World", None]
    assert out.total[0] == 1.0 and out.valid.tolist() == [True, False]
    assert not reward.differentiable
    with pytest.raises(ConfigError, match="min_confidence"):
        build_reward({"name": "ocr", "min_confidence": 2, "engine": ScriptedEngine([])})


def _render(text: str, size=(256, 64)) -> torch.Tensor:
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.transforms.functional import to_tensor

    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.load_default(size=30)
    except TypeError:  # Pillow < 10.1: a small bitmap font, upscaled below
        font = ImageFont.load_default()
    draw.text((8, 14), text, fill="black", font=font)
    return to_tensor(image)


def test_real_engine_reads_rendered_text():
    pytest.importorskip("rapidocr_onnxruntime", reason="rapidocr-onnxruntime is not installed (extra 'ocr')")
    reward = build_reward({"name": "ocr", "threads": 1, "det_limit_side_len": 128})
    x = torch.stack([_render("Hello World"), _render("Open Late"), torch.ones(3, 64, 256)])
    out = reward(x, ['a sign that says "Hello World"', 'a shop sign "Closed Now"', 'a blank wall "Nothing"'])
    assert out.total.shape == (3,)
    assert out.total[0] >= 0.9, reward.last_texts
    assert out.total[1] < 0.6 and out.total[2] == 0.0
    assert out.valid is None
