"""Frame-level video dimensions (aesthetic, text alignment, temporal consistency, motion smoothness)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.config import ConfigError
from rewards import build_reward
from rewards.tiny import save_random_aesthetic_head, tiny_open_clip_checkpoint, tiny_open_clip_config
from rewards.video import motion_smoothness, temporal_consistency

PROMPTS = ["a cat running", "a car driving at night", "waves on a beach"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("video")
    cfg = tiny_open_clip_config()
    return {"cfg": cfg, "ckpt": str(tiny_open_clip_checkpoint(d / "clip.safetensors", cfg, seed=5)),
            "head": str(save_random_aesthetic_head(d / "head.pth", embed_dim=32, seed=6))}


@pytest.fixture(scope="module")
def reward(files):
    return build_reward({"name": "video_frames", "head_path": files["head"], "clip_model": files["cfg"],
                         "clip_pretrained": files["ckpt"]})


def test_closed_forms():
    still = torch.rand(2, 1, 3, 8, 8).expand(-1, 5, -1, -1, -1)
    torch.testing.assert_close(motion_smoothness(still), torch.ones(2))
    # uniform fade: every frame is exactly the mean of its neighbours
    t = torch.linspace(0, 1, 6).view(1, 6, 1, 1, 1)
    fade = (t * torch.rand(1, 1, 3, 8, 8)).clone()
    torch.testing.assert_close(motion_smoothness(fade), torch.ones(1))
    # flicker between black and white: |x_t - mean(neighbours)| = 1 everywhere
    flicker = (torch.arange(5) % 2).float().view(1, 5, 1, 1, 1).expand(1, 5, 3, 4, 4)
    torch.testing.assert_close(motion_smoothness(flicker), torch.zeros(1))
    e = torch.randn(2, 4, 16)
    torch.testing.assert_close(temporal_consistency(e[:, :1].expand(-1, 4, -1)), torch.ones(2))
    manual = torch.stack([F.cosine_similarity(e[:, i], e[:, i + 1], dim=-1) for i in range(3)], 1).mean(1)
    torch.testing.assert_close(temporal_consistency(e), manual)


def test_dimensions_and_their_definitions(reward, files):
    assert reward.dimensions == ("aesthetic", "text_alignment", "temporal_consistency", "motion_smoothness")
    assert reward.differentiable and reward.handles_video
    torch.manual_seed(0)
    videos = torch.rand(3, 4, 3, 32, 32)
    out = reward(videos, PROMPTS)
    assert set(out.scores) == set(reward.dimensions) and all(v.shape == (3,) for v in out.scores.values())
    torch.testing.assert_close(out.total, sum(out.scores.values()))
    # per-frame aesthetic equals the aesthetic reward on the same backbone (frames averaged)
    aesthetic = build_reward({"name": "aesthetic", "head_path": files["head"], "backbone": reward.backbone})
    torch.testing.assert_close(out.scores["aesthetic"], aesthetic(videos, PROMPTS).total, atol=1e-5, rtol=0)
    cos = torch.stack([reward.backbone.cosine(videos[:, f], PROMPTS) for f in range(4)], 1).mean(1)
    torch.testing.assert_close(out.scores["text_alignment"], cos, atol=1e-5, rtol=0)
    # a still video is perfectly consistent and smooth; noise lowers both
    still = videos[:, :1].expand(-1, 4, -1, -1, -1)
    s = reward(still, PROMPTS).scores
    torch.testing.assert_close(s["temporal_consistency"], torch.ones(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(s["motion_smoothness"], torch.ones(3))
    assert (out.scores["motion_smoothness"] < 1).all()
    # images count as one-frame videos
    img = reward(videos[:, 0], PROMPTS).scores
    torch.testing.assert_close(img["temporal_consistency"], torch.ones(3))


def test_batch_independence_weights_and_gradients(files):
    reward = build_reward({"name": "video_frames", "head_path": files["head"], "clip_model": files["cfg"],
                           "clip_pretrained": files["ckpt"], "weights": {"text_alignment": 3.0, "aesthetic": 0.0}})
    torch.manual_seed(1)
    videos = torch.rand(2, 3, 3, 32, 32)
    out = reward(videos, PROMPTS[:2])
    s = out.scores
    torch.testing.assert_close(out.total, 3 * s["text_alignment"] + s["temporal_consistency"] + s["motion_smoothness"])
    single = reward(videos[1:], PROMPTS[1:2])
    for k in s:
        torch.testing.assert_close(s[k][1:], single.scores[k], atol=1e-5, rtol=1e-5)
    for dim in reward.dimensions:
        x = videos.clone().requires_grad_(True)
        reward(x, PROMPTS[:2]).scores[dim].sum().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0, dim


def test_options(files):
    no_head = build_reward({"name": "video_frames", "clip_model": files["cfg"], "clip_pretrained": files["ckpt"]})
    assert "aesthetic" not in no_head.dimensions
    pixels_only = build_reward({"name": "video_frames", "dims": ["motion_smoothness"]})
    assert pixels_only.backbone is None and pixels_only.dimensions == ("motion_smoothness",)
    assert pixels_only(torch.rand(2, 3, 3, 8, 8), PROMPTS[:2]).total.shape == (2,)
    strided = build_reward({"name": "video_frames", "dims": ["temporal_consistency"], "frame_stride": 2,
                            "clip_model": files["cfg"], "clip_pretrained": files["ckpt"]})
    v = torch.rand(1, 4, 3, 32, 32)
    full = build_reward({"name": "video_frames", "dims": ["temporal_consistency"], "backbone": strided.backbone})
    torch.testing.assert_close(strided(v, PROMPTS[:1]).total, full(v[:, ::2], PROMPTS[:1]).total)
    with pytest.raises(ConfigError, match="unknown video_frames dimension 'smoothness'"):
        build_reward({"name": "video_frames", "dims": ["smoothness"]})
    with pytest.raises(ConfigError, match="needs head_path"):
        build_reward({"name": "video_frames", "dims": ["aesthetic"]})
