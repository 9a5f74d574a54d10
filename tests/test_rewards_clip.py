"""CLIP-based rewards: aesthetic (with the real LAION head), CLIPScore, PickScore, HPSv2.

Tiny random CLIP models are built in code and saved, then loaded back through the project's loaders,
so the real loading paths (open_clip state dicts, transformers directories) are exercised offline.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from align.config import ConfigError
from rewards import build_reward
from rewards.aesthetic import AestheticHead, load_aesthetic_head
from rewards.clip import OPENAI_MEAN, OPENAI_STD, clip_preprocess, load_hf_clip, load_open_clip, resize_to
from rewards.loading import CheckpointError
from rewards.tiny import (save_random_aesthetic_head, tiny_hf_clip, tiny_open_clip_checkpoint,
                          tiny_open_clip_config)

ROOT = Path(__file__).resolve().parents[1]
LAION_HEAD = ROOT.parent / "shared" / "assets" / "sac+logos+ava1-l14-linearMSE.pth"
PROMPTS = ["a photo of a cat", "a red car", "a painting of a tree", "a dog on the beach"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    cfg = tiny_open_clip_config()
    cfg768 = tiny_open_clip_config(embed_dim=768)
    return {
        "cfg": cfg,
        "ckpt": tiny_open_clip_checkpoint(d / "tiny.safetensors", cfg, seed=1),
        "cfg768": cfg768,
        "ckpt768": tiny_open_clip_checkpoint(d / "tiny768.pt", cfg768, seed=2),
        "head": save_random_aesthetic_head(d / "head.pth", embed_dim=32, seed=3),
        "hf": tiny_hf_clip(d / "hf_clip", seed=4),
        "dir": d,
    }


def _rewards(models):
    return {
        "aesthetic": build_reward({"name": "aesthetic", "head_path": str(models["head"]), "clip_model": models["cfg"],
                                   "clip_pretrained": str(models["ckpt"])}),
        "clip_score": build_reward({"name": "clip_score", "clip_model": models["cfg"],
                                    "clip_pretrained": str(models["ckpt"])}),
        "pickscore": build_reward({"name": "pickscore", "model_path": str(models["hf"]), "processor_path": None}),
        "hpsv2": build_reward({"name": "hpsv2", "clip_model": models["cfg"], "checkpoint": str(models["ckpt"])}),
    }


@pytest.fixture(scope="module")
def rewards(models):
    return _rewards(models)


# --- preprocessing --------------------------------------------------------------------------------
def test_preprocess_matches_torchvision():
    from torchvision.transforms.v2 import functional as TF

    x = torch.rand(2, 3, 45, 60)
    ours = resize_to(x, 32)
    ref = TF.center_crop(TF.resize(x, 32, interpolation=TF.InterpolationMode.BICUBIC, antialias=True), [32, 32])
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    # CLIP normalisation with OpenAI statistics; grey images are repeated to RGB
    grey = torch.rand(1, 1, 32, 32)
    out = clip_preprocess(grey, 32)
    mean, std = torch.tensor(OPENAI_MEAN).view(3, 1, 1), torch.tensor(OPENAI_STD).view(3, 1, 1)
    torch.testing.assert_close(out[0], (grey[0].expand(3, -1, -1) - mean) / std)


def test_longest_mode_pads_like_hps():
    x = torch.rand(1, 3, 20, 40)
    out = resize_to(x, 32, mode="longest")
    assert out.shape == (1, 3, 32, 32)
    assert (out[..., :8, :] == 0).all() and (out[..., 24:, :] == 0).all()  # 16 rows of image, centred
    assert out[..., 8:24, :].abs().sum() > 0


# --- loading --------------------------------------------------------------------------------------
def test_open_clip_round_trip(models):
    import open_clip
    from safetensors.torch import load_file

    torch.manual_seed(0)
    ref = open_clip.CLIP(**models["cfg"]).eval()
    ref.load_state_dict(load_file(str(models["ckpt"])))
    backbone = load_open_clip(models["cfg"], models["ckpt"])
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = ref.encode_image(clip_preprocess(x, 32))
        tokens = open_clip.SimpleTokenizer(context_length=16)(PROMPTS[:2])
        expected_text = ref.encode_text(tokens)
    torch.testing.assert_close(backbone.encode_image(x), expected)
    torch.testing.assert_close(backbone.encode_text(PROMPTS[:2]), expected_text)
    assert not any(p.requires_grad for p in backbone.parameters())


def test_checkpoint_errors_name_the_file(models, tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint file at .*missing\.pt"):
        load_open_clip(models["cfg"], tmp_path / "missing.pt")
    # a checkpoint of another size: the error names the file and the first mismatched key
    with pytest.raises(CheckpointError) as err:
        load_open_clip(models["cfg"], models["ckpt768"])
    msg = str(err.value)
    assert str(models["ckpt768"]) in msg and "expected [32, 32]" in msg and "\n" not in msg
    # not a state dict at all
    bad = tmp_path / "notes.pt"
    torch.save({"step": 3}, bad)
    with pytest.raises(CheckpointError, match="does not fit|not a state dict"):
        load_open_clip(models["cfg"], bad)
    with pytest.raises(ConfigError, match="unknown open_clip model 'ViT-L-41'.*did you mean"):
        load_open_clip("ViT-L-41")
    with pytest.raises(ConfigError, match="neither a local file nor a pretrained tag"):
        load_open_clip("ViT-B-32", "no_such_tag")
    with pytest.raises(CheckpointError, match="no model directory at"):
        load_hf_clip(tmp_path / "nothing_here")


def test_hf_clip_missing_weights_is_an_error(models, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(models["hf"], broken)
    from safetensors.torch import load_file, save_file

    weights = broken / "model.safetensors"
    state = load_file(str(weights))
    state.pop(next(k for k in state if "visual_projection" in k))
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"broken.*missing keys visual_projection"):
        load_hf_clip(broken)
    # a config that does not match the weights (another projection size)
    import json

    other = tmp_path / "other"
    shutil.copytree(models["hf"], other)
    config = json.loads((other / "config.json").read_text())
    config["projection_dim"] = 48
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"other"):
        load_hf_clip(other)


def test_aesthetic_head_loader(models, tmp_path):
    head = load_aesthetic_head(models["head"])
    assert head.embed_dim == 32 and not head.training
    torch.manual_seed(3)
    ref = AestheticHead(32).eval()
    e = F.normalize(torch.randn(4, 32), dim=-1)
    torch.testing.assert_close(head(e), ref(e))
    # wrong layer sizes: the message names the file and the expected shape
    state = ref.state_dict()
    state["layers.2.weight"] = torch.zeros(100, 1024)
    bad = tmp_path / "bad_head.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"bad_head\.pth does not fit: layers.2.weight has shape \[100, 1024\], "
                                              r"expected \[128, 1024\]"):
        load_aesthetic_head(bad)
    with pytest.raises(ConfigError, match="needs head_path"):
        build_reward({"name": "aesthetic", "clip_model": models["cfg"], "clip_pretrained": str(models["ckpt"])})
    # a 768-d head on a 32-d backbone
    head768 = save_random_aesthetic_head(tmp_path / "head768.pth", embed_dim=768)
    with pytest.raises(ConfigError, match="expects 768-d CLIP embeddings but the backbone .* gives 32-d"):
        build_reward({"name": "aesthetic", "head_path": str(head768), "clip_model": models["cfg"],
                      "clip_pretrained": str(models["ckpt"])})


@pytest.mark.skipif(not LAION_HEAD.is_file(), reason=f"real LAION aesthetic head not found at {LAION_HEAD} "
                                                       "(shared/assets is only on the project's machines)")
def test_real_laion_head(models):
    """The public head loads through the project's loader; without activations it is one affine map
    w.e + b, with b = 5.2366 (the middle of its 1-10 scale) and |w| = 18.00."""
    head = load_aesthetic_head(LAION_HEAD)
    assert head.embed_dim == 768
    with torch.no_grad():
        zero = head(torch.zeros(1, 768)).item()
        basis = head(torch.eye(768)) - zero  # the rows of the affine map
        w = basis
        assert zero == pytest.approx(5.2366, abs=1e-3)
        assert w.norm().item() == pytest.approx(17.9956, abs=1e-2)
        # linear: head(e) = b + w.e for any embedding, and the maximal unit embedding scores b + |w|
        e = F.normalize(torch.randn(16, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
        torch.testing.assert_close(head(e), zero + e @ w, atol=1e-4, rtol=0)
        top = head((w / w.norm())[None]).item()
        assert top == pytest.approx(zero + w.norm().item(), abs=1e-3)
        # random unit embeddings land around the middle of the 1-10 scale
        scores = head(e)
        assert (scores > 2).all() and (scores < 8.5).all()

    # the reward: tiny CLIP backbone (768-d projection) + the real head; score = head(normalised embedding)
    reward = build_reward({"name": "aesthetic", "head_path": str(LAION_HEAD), "clip_model": models["cfg768"],
                           "clip_pretrained": str(models["ckpt768"])})
    x = torch.rand(3, 3, 40, 48)
    out = reward(x, PROMPTS[:3])
    with torch.no_grad():
        emb = F.normalize(reward.backbone.encode_image(x), dim=-1)
    torch.testing.assert_close(out.total, zero + emb @ w, atol=1e-4, rtol=0)


# --- scores ---------------------------------------------------------------------------------------
def test_score_formulas(models, rewards):
    """Each reward at the scale of its paper, checked against the model's own forward."""
    import open_clip
    from transformers import CLIPModel, CLIPTokenizer

    x = (torch.rand(4, 3, 32, 32) * 255).round() / 255
    prompts = PROMPTS
    backbone = rewards["clip_score"].backbone
    with torch.no_grad():
        out = backbone.model(clip_preprocess(x, 32), open_clip.SimpleTokenizer(context_length=16)(prompts))
        img, txt = out[0], out[1]  # open_clip returns normalised features
        cos = (img * txt).sum(-1)
    torch.testing.assert_close(rewards["clip_score"](x, prompts).total, 2.5 * cos.clamp_min(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards["hpsv2"](x, prompts).total, cos, atol=1e-5, rtol=0)

    # PickScore: logits_per_image of the transformers model (logit_scale.exp() * cos) on the diagonal
    model = CLIPModel.from_pretrained(models["hf"]).eval()
    tok = CLIPTokenizer.from_pretrained(models["hf"])
    enc = tok(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        pixels = clip_preprocess(x, 32)
        logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                       pixel_values=pixels).logits_per_image
    torch.testing.assert_close(rewards["pickscore"](x, prompts).total, logits.diagonal(), atol=1e-4, rtol=0)
    assert rewards["pickscore"].backbone.logit_scale().item() == pytest.approx(math.exp(2.6592), rel=1e-4)


def test_pickscore_processor_matches_transformers(models, rewards):
    """The torch preprocessing equals the transformers image processor on 8-bit images."""
    from PIL import Image
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(models["hf"])
    x = (torch.rand(2, 3, 32, 32) * 255).round() / 255
    images = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in x]
    ref = proc(images=images, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(rewards["pickscore"].backbone.preprocess(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "pickscore", "hpsv2"])
def test_shapes_batch_independence_and_video(rewards, name):
    reward = rewards[name]
    torch.manual_seed(0)
    x = torch.rand(4, 3, 40, 36)
    out = reward(x, PROMPTS)
    assert out.total.shape == (4,) and out.scores["score"].shape == (4,) and out.total.dtype == torch.float32
    singles = torch.cat([reward(x[i:i + 1], PROMPTS[i:i + 1]).total for i in range(4)])
    torch.testing.assert_close(out.total, singles, atol=1e-5, rtol=1e-5)
    # videos: the mean over frames
    video = torch.rand(2, 3, 3, 32, 32)
    vout = reward(video, PROMPTS[:2])
    per_frame = reward(video[1], [PROMPTS[1]] * 3).total.mean()
    assert vout.total.shape == (2,)
    torch.testing.assert_close(vout.total[1], per_frame, atol=1e-5, rtol=1e-5)
    # grey images are accepted
    assert reward(torch.rand(2, 1, 32, 32), PROMPTS[:2]).total.shape == (2,)


@pytest.mark.parametrize("name", ["aesthetic", "clip_score", "pickscore", "hpsv2"])
def test_gradients_reach_the_pixels(rewards, name):
    reward = rewards[name]
    assert reward.differentiable
    torch.manual_seed(1)
    x = torch.rand(2, 3, 48, 48, dtype=torch.float32).requires_grad_(True)
    total = reward(x, PROMPTS[:2]).total
    if name == "clip_score":  # max(cos, 0): make sure we are on the positive side for a gradient
        total = reward.cosine(x, PROMPTS[:2])
    total.sum().backward()
    g = x.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0
    # a small step along the gradient raises the score (first order)
    with torch.no_grad():
        step = 1e-2 * g / g.norm()
        after = reward(x + step, PROMPTS[:2]).total if name != "clip_score" else reward.cosine(x + step, PROMPTS[:2])
    assert (after - total.detach()).sum() > 0


def test_text_cache_and_device_move(rewards):
    reward = rewards["clip_score"]
    a = reward.backbone.encode_text(["a cat", "a dog", "a cat"])
    torch.testing.assert_close(a[0], a[2])
    reward.to("cpu")
    b = reward.backbone.encode_text(["a dog"])
    torch.testing.assert_close(a[1], b[0])

