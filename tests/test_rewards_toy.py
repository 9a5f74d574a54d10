"""Toy rewards (digit, colour, stroke thickness) on real coloured digits of the toy data set."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.config import ConfigError
from pipelines.toy import COLOURS, colour_digits, digit_split, toy_prompt
from rewards import build_reward


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def batch():
    """16 held-out digits, coloured, with the prompts that describe them."""
    _, _, images, labels = digit_split()
    images, labels = images[:16], labels[:16]
    colour_ids = torch.arange(16) % len(COLOURS)
    x = colour_digits(images, colour_ids, size=32)
    prompts = [toy_prompt(int(d), COLOURS[int(c)]) for d, c in zip(labels, colour_ids)]
    return x, labels, colour_ids, prompts


def test_registered_and_differentiable():
    for name in ("digit", "colour", "stroke_thickness"):
        reward = build_reward(name)
        assert reward.differentiable and reward.dimensions == ("score",)


def test_digit_reward_reads_the_requested_digit(batch):
    x, labels, colour_ids, prompts = batch
    reward = build_reward("digit")
    right = reward(x, prompts).total
    wrong_prompts = [toy_prompt((int(d) + 3) % 10, COLOURS[int(c)]) for d, c in zip(labels, colour_ids)]
    wrong = reward(x, wrong_prompts).total
    assert right.shape == (16,) and ((right >= 0) & (right <= 1)).all()
    assert right.mean() > 0.7 and (right > wrong).float().mean() > 0.9
    # number words and prompts that name no digit (the top probability) are understood
    words = reward(x[:2], [toy_prompt(int(labels[i]), "red", word=True) for i in range(2)]).total
    torch.testing.assert_close(words, right[:2])
    anything = reward(x[:4], ["something"] * 4).total
    assert (anything >= right[:4] - 1e-6).all()


def test_colour_reward_prefers_the_requested_colour(batch):
    x, labels, colour_ids, prompts = batch
    reward = build_reward("colour")
    right = reward(x, prompts).total
    other = [toy_prompt(int(d), COLOURS[(int(c) + 1) % len(COLOURS)]) for d, c in zip(labels, colour_ids)]
    wrong = reward(x, other).total
    assert (right > wrong).all() and right.mean() > 0.8
    torch.testing.assert_close(reward(x[:2], ["a digit 3", "7"]).total, torch.ones(2))  # no colour named
    with pytest.raises(ConfigError, match="temperature"):
        build_reward({"name": "colour", "temperature": 0})


def test_stroke_thickness_tracks_ink(batch):
    x = batch[0]
    thick = F.max_pool2d(x, 3, stride=1, padding=1)  # dilated strokes
    reward = build_reward("stroke_thickness")
    assert (reward(thick, batch[3]).total > reward(x, batch[3]).total).all()
    thinner = build_reward({"name": "stroke_thickness", "thinner": True})
    torch.testing.assert_close(thinner(x, batch[3]).total, -reward(x, batch[3]).total)
    target = build_reward({"name": "stroke_thickness", "target": 0.0})
    torch.testing.assert_close(target(x, batch[3]).total, -reward(x, batch[3]).total)
    with pytest.raises(ConfigError, match="target"):
        build_reward({"name": "stroke_thickness", "target": 2})


@pytest.mark.parametrize("name", ["digit", "colour", "stroke_thickness"])
def test_gradients_batch_independence_and_video(batch, name):
    x, _, _, prompts = batch
    reward = build_reward(name)
    xs = x[:4].clone().requires_grad_(True)
    total = reward(xs, prompts[:4]).total
    total.sum().backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0
    singles = torch.cat([reward(x[i:i + 1], prompts[i:i + 1]).total for i in range(4)])
    torch.testing.assert_close(total.detach(), singles, atol=1e-6, rtol=1e-5)
    video = x[:4].reshape(2, 2, 3, 32, 32)
    out = reward(video, prompts[:2])
    assert out.total.shape == (2,)
    first = reward(video[0], [prompts[0]] * 2).total.mean()
    torch.testing.assert_close(out.total[0], first)


def test_digit_gradient_ascent_raises_the_probability(batch):
    """The reward moves: a few gradient steps on the pixels raise P(requested digit)."""
    x, labels, colour_ids, _ = batch
    reward = build_reward("digit")
    target = [toy_prompt((int(labels[0]) + 1) % 10, "red")]
    img = x[:1].clone().requires_grad_(True)
    start = reward(img, target).total.item()
    opt = torch.optim.Adam([img], lr=0.05)
    for _ in range(10):
        opt.zero_grad()
        (-reward(img.clamp(0, 1), target).total.sum()).backward()
        opt.step()
    assert reward(img.detach().clamp(0, 1), target).total.item() > start + 0.1
