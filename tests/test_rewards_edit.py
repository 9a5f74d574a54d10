"""The edit rewards' closed forms: ``preservation`` (pixels, greyscale, outside a mask, DINO features),
``edit_score``'s weighted combination, and the toy editing default's ``edit_instruction`` and held-out
``edit_judge`` on edits whose answers are known."""

from __future__ import annotations

import pytest
import torch

from align.config import ConfigError
from pipelines.base import Prompt
from rewards import build_reward
from rewards.base import RewardError
from rewards.tiny import TINY_DINO, tiny_dino_checkpoint


def _quarter_edit():
    """A black 16 x 16 source and its edit with the top-left quarter set to 0.5 (all channels)."""
    source = torch.zeros(3, 16, 16)
    edit = source.clone()
    edit[:, :8, :8] = 0.5
    return source, edit


def _mask(rows, cols):
    mask = torch.zeros(1, 16, 16)
    mask[:, rows, cols] = 1.0
    return mask


def test_pixel_preservation_closed_forms():
    source, edit = _quarter_edit()
    reward = build_reward("preservation")
    # 1 - 0.5 x (64 / 256) over the whole image; 1 when the changed quarter is the editable region;
    # 1 - 0.5 x 64 / 192 when another quarter is
    prompts = [Prompt("brighten", source), Prompt("brighten", source, mask=_mask(slice(0, 8), slice(0, 8))),
               Prompt("brighten", source, mask=_mask(slice(8, 16), slice(8, 16)))]
    out = reward(edit.expand(3, -1, -1, -1), prompts)
    torch.testing.assert_close(out.total, torch.tensor([0.875, 1.0, 1 - 0.5 * 64 / 192]))
    # use_mask: false scores the whole image whatever the prompts say
    whole = build_reward({"name": "preservation", "use_mask": False})(edit.expand(3, -1, -1, -1), prompts)
    torch.testing.assert_close(whole.total, torch.full((3,), 0.875))
    # differentiable: the gradient of -mean|e - s| / 3 channels... is -sign / (3 x 256) on every pixel
    sample = edit[None].clone().requires_grad_(True)
    reward(sample, prompts[:1]).total.sum().backward()
    torch.testing.assert_close(sample.grad[0, :, :8, :8], torch.full((3, 8, 8), -1 / (3 * 256)))


def test_greyscale_preservation_ignores_a_recolour():
    red, blue = torch.zeros(3, 16, 16), torch.zeros(3, 16, 16)
    red[0, 4:12, 6:10] = 1.0
    blue[2, 4:12, 6:10] = 1.0
    prompts = [Prompt("make it blue", red)]
    assert build_reward({"name": "preservation", "greyscale": True})(blue[None], prompts).total.item() == 1.0
    # in colour, two of three channels differ on the 32 stroke pixels: 1 - (2/3) x 32 / 256
    colour = build_reward("preservation")(blue[None], prompts).total.item()
    assert colour == pytest.approx(1 - 2 / 3 * 32 / 256)
    with pytest.raises(ConfigError, match="greyscale compares pixels"):
        build_reward({"name": "preservation", "greyscale": True, "features": "dino"})
    with pytest.raises(RewardError, match="prompt 0 .* has no source image"):
        build_reward("preservation")(blue[None], ["make it blue"])


def test_dino_preservation_is_one_for_an_unchanged_image(tmp_path):
    ckpt = tiny_dino_checkpoint(tmp_path / "dino.pth")
    reward = build_reward({"name": "preservation", "features": "dino", "checkpoint": str(ckpt), "image_size": 28,
                           "model": TINY_DINO["model"], "model_kwargs": TINY_DINO["model_kwargs"]})
    source = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    other = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = reward(torch.stack([source, other]), [Prompt("keep", source), Prompt("keep", source)])
    assert out.total[0].item() == pytest.approx(1.0, abs=1e-5) and out.total[1] < 0.999
    # outside a mask that covers the whole image, both are black: identical
    full = Prompt("anything", source, mask=torch.ones(1, 16, 16))
    assert reward(other[None], [full]).total.item() == pytest.approx(1.0, abs=1e-5)


def test_edit_score_weighs_instruction_and_preservation():
    source, edit = _quarter_edit()
    reward = build_reward({"name": "edit_score", "instruction": "edit_instruction", "weights":
                           {"instruction": 2.0, "preservation": 0.5}})
    prompt = [Prompt("", source)]  # the empty instruction: keep the source, scored 1 - mean |e - s|
    out = reward(edit[None], prompt)
    assert set(out.scores) == {"instruction", "preservation"}
    torch.testing.assert_close(out.scores["instruction"], torch.tensor([0.875]))
    torch.testing.assert_close(out.scores["preservation"], torch.tensor([0.875]))
    torch.testing.assert_close(out.total, torch.tensor([2.0 * 0.875 + 0.5 * 0.875]))
    with pytest.raises(ConfigError, match="needs base_url"):  # the default instruction: a VLM critique
        build_reward("edit_score")


def _held_out_pairs(kind, count=6):
    import random

    from pipelines.toy import digit_split
    from pipelines.toy_edit import edit_pairs

    _, _, images, labels = digit_split()
    source, target, instructions, _ = edit_pairs(images, labels, count, torch.Generator().manual_seed(3),
                                                 random.Random(3), mix={kind: 1.0})
    return source, target, [Prompt(text, image) for text, image in zip(instructions, source)]


def test_toy_edit_instruction_known_values():
    reward = build_reward("edit_instruction")
    source, _, _ = _held_out_pairs("thicker", 2)
    # an unchanged image: "thicker" and "thinner" score sigmoid(0) = 1/2, the empty instruction 1
    out = reward(source, [Prompt("make it thicker", source[0]), Prompt("make it thinner", source[1])])
    torch.testing.assert_close(out.total, torch.tensor([0.5, 0.5]))
    assert reward(source[:1], [Prompt("", source[0])]).total.item() == 1.0
    # the data's own targets score high on every kind, their sources low
    for kind in ("colour", "thicker", "thinner", "digit"):
        source, target, prompts = _held_out_pairs(kind)
        assert reward(target, prompts).total.mean() > 0.85, kind
        assert reward(source, prompts).total.mean() <= 0.5, kind  # unchanged ink: exactly 1/2


def test_toy_edit_judge_on_known_edits():
    from pipelines.toy_edit import shift_images

    judge = build_reward("edit_judge")
    for kind in ("colour", "thicker", "thinner", "digit"):
        source, target, prompts = _held_out_pairs(kind)
        done = judge(target, prompts).scores
        assert done["instruction"].mean() == 1.0, kind
        assert done["preservation"].mean() >= 5 / 6, kind
        undone = judge(source, prompts).scores  # the source itself: nothing done, everything kept
        assert undone["instruction"].sum() == 0 and undone["preservation"].mean() == 1.0, kind
    # a recolour moved by 3 pixels keeps the digit (1 of its 2 kept attributes) but not the position
    source, target, prompts = _held_out_pairs("colour", 4)
    moved = shift_images(target, torch.full((4,), 3), torch.zeros(4, dtype=torch.long))
    scores = judge(moved, prompts).scores
    assert scores["preservation"].max() <= 0.5 and scores["instruction"].mean() == 1.0
