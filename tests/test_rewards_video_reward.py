"""VideoReward-style VLM reward with a tiny random Qwen2-VL: loading, scores, Bradley-Terry-with-ties
training; and the critique reward's local transformers back end on the same tiny VLM."""

from __future__ import annotations

import math

import pytest
import torch

from align.config import ConfigError
from rewards import build_reward
from rewards.loading import CheckpointError
from rewards.tiny import tiny_qwen2_vl
from rewards.video_reward import (HEAD_FILE, VideoRewardModel, btt_log_likelihood, btt_loss,
                                  load_video_reward_model)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return tiny_qwen2_vl(tmp_path_factory.mktemp("qwen") / "vlm")


@pytest.fixture(scope="module")
def trained_dir(vlm_dir, tmp_path_factory):
    """A fresh reward model (new head, reward tokens added) saved as a VideoReward directory."""
    model = load_video_reward_model(vlm_dir, require_head=False, max_frames=4)
    return model.save_pretrained(tmp_path_factory.mktemp("videoreward") / "rm")


def test_btt_likelihood():
    sa, sb = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.1, 0.5, 2.0])
    theta = 5.0
    probs = sum(btt_log_likelihood(sa, sb, torch.full((3,), lab), theta).exp() for lab in (1.0, -1.0, 0.0))
    torch.testing.assert_close(probs, torch.ones(3))  # the three outcomes are a distribution
    x, y = sa.exp(), sb.exp()
    torch.testing.assert_close(btt_log_likelihood(sa, sb, torch.ones(3), theta).exp(), x / (x + theta * y))
    tie = (theta ** 2 - 1) * x * y / ((x + theta * y) * (theta * x + y))
    torch.testing.assert_close(btt_log_likelihood(sa, sb, torch.zeros(3), theta).exp(), tie)
    labels = torch.tensor([1.0, float("nan"), 0.0])
    expected = -(btt_log_likelihood(sa, sb, torch.ones(3))[0] + btt_log_likelihood(sa, sb, torch.zeros(3))[2]) / 2
    torch.testing.assert_close(btt_loss(sa, sb, labels), expected)
    with pytest.raises(ValueError):
        btt_log_likelihood(sa, sb, labels, theta=1.0)


def test_load_score_and_round_trip(vlm_dir, trained_dir, tmp_path):
    reward = build_reward({"name": "video_reward", "model_path": str(trained_dir), "max_frames": 4})
    assert reward.dimensions == ("VQ", "MQ", "TA") and not reward.differentiable
    torch.manual_seed(0)
    videos = torch.rand(3, 5, 3, 40, 48)
    prompts = ["a cat", "a dog running on the beach", "x"]
    out = reward(videos, prompts)
    assert all(out.scores[d].shape == (3,) for d in ("VQ", "MQ", "TA"))
    torch.testing.assert_close(out.total, out.scores["VQ"] + out.scores["MQ"] + out.scores["TA"])
    # batch independence (sequences of different lengths are padded in one batch)
    singles = torch.cat([reward(videos[i:i + 1], prompts[i:i + 1]).total for i in range(3)])
    torch.testing.assert_close(out.total, singles, atol=1e-4, rtol=1e-4)
    # the head round-trips through the directory; images are one-frame videos
    again = build_reward({"name": "video_reward", "model_path": str(trained_dir), "max_frames": 4})
    torch.testing.assert_close(again(videos, prompts).total, out.total)
    assert reward(torch.rand(2, 3, 32, 32), prompts[:2]).total.shape == (2,)
    # errors name the file
    with pytest.raises(CheckpointError, match=rf"no head at .*{HEAD_FILE}"):
        build_reward({"name": "video_reward", "model_path": str(vlm_dir)})
    # a missing local folder is refused before the reward's constructor runs (rewards.registry)
    with pytest.raises(CheckpointError, match=r"^video_reward.model_path: file not found: .*missing$"):
        build_reward({"name": "video_reward", "model_path": str(tmp_path / "missing")})
    with pytest.raises(ConfigError, match="needs model_path"):
        build_reward({"name": "video_reward"})


def test_bradley_terry_with_ties_training(trained_dir):
    """Bright videos are preferred on VQ, dark ones on TA, and MQ is always a tie: a few updates make
    the scores follow the labels."""
    model = load_video_reward_model(trained_dir, max_frames=2)
    g = torch.Generator().manual_seed(0)
    bright = 0.6 + 0.4 * torch.rand(4, 2, 3, 28, 28, generator=g)
    dark = 0.4 * torch.rand(4, 2, 3, 28, 28, generator=g)
    prompts = ["a video"] * 4
    labels = torch.tensor([[1.0, 0.0, -1.0]] * 4)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = [model.train_step(opt, bright, dark, prompts, labels) for _ in range(25)]
    assert losses[-1] < 0.6 * losses[0]
    with torch.no_grad():
        sb, sd = model(bright, prompts), model(dark, prompts)
    assert (sb[:, 0] > sd[:, 0]).all() and (sb[:, 2] < sd[:, 2]).all()
    assert (sb[:, 1] - sd[:, 1]).abs().mean() < (sb[:, 0] - sd[:, 0]).abs().mean()  # ties pull MQ together


def test_critique_with_local_transformers_vlm(vlm_dir):
    """The transformers back end generates with the VLM's chat template; a random model writes no score,
    which is flagged rather than scored 0."""
    reward = build_reward({"name": "critique", "backend": "transformers", "model_path": str(vlm_dir),
                           "max_tokens": 6, "concurrency": 1, "dims": ["overall"]})
    out = reward(torch.rand(2, 3, 28, 28), ["a cat", "a dog"])
    assert out.valid.tolist() == [False, False] and math.isnan(out.total[0])
    assert all(isinstance(t, str) for t in reward.last_texts) and reward.report["unparsed"] == 2
    with pytest.raises(ConfigError, match="needs model_path"):
        build_reward({"name": "critique", "backend": "transformers"})


def test_head_shape_mismatch(vlm_dir, tmp_path):
    from safetensors.torch import save_file

    bad = tmp_path / "head.safetensors"
    save_file({"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}, str(bad))
    with pytest.raises(CheckpointError, match=r"head.safetensors does not fit: weight has shape \[1, 64\], "
                                              r"expected \[1, 32\]"):
        load_video_reward_model(vlm_dir, head_path=bad)
    assert isinstance(load_video_reward_model(vlm_dir, require_head=False), VideoRewardModel)
