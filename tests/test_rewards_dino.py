"""DINOv2 rewards with a tiny timm ViT: loading, similarity, and the adversarial head."""

from __future__ import annotations

import pytest
import torch

from align.config import ConfigError
from rewards import build_reward
from rewards.dino import hinge_loss, load_dino, random_patches
from rewards.loading import CheckpointError
from rewards.tiny import TINY_DINO, tiny_dino_checkpoint

PROMPTS = ["a", "b", "c", "d"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_dino_checkpoint(tmp_path_factory.mktemp("dino") / "dino.pth", seed=7)


def _spec(name, ckpt, **extra):
    return {"name": name, "checkpoint": str(ckpt), **TINY_DINO, **extra}


def bright(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (0.7 + 0.3 * torch.rand(n, 3, 28, 28, generator=g)).clamp(0, 1)


def dark(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return 0.3 * torch.rand(n, 3, 28, 28, generator=g)


def test_loading_round_trip_and_errors(ckpt, tmp_path):
    import timm

    backbone = load_dino(TINY_DINO["model"], ckpt, image_size=28, **TINY_DINO["model_kwargs"])
    ref = timm.create_model(TINY_DINO["model"], pretrained=False, num_classes=0, img_size=28,
                            **TINY_DINO["model_kwargs"]).eval()
    ref.load_state_dict(torch.load(ckpt, weights_only=True))
    x = torch.rand(2, 3, 28, 28)
    cls, patches = backbone.tokens(x)
    with torch.no_grad():
        feats = ref.forward_features(backbone.preprocess(x))
    torch.testing.assert_close(cls, feats[:, 0])
    assert patches.shape == (2, 4, 32)  # (28 / 14)^2 patches
    # a checkpoint at another resolution is resampled by timm's filter (position embeddings)
    assert load_dino(TINY_DINO["model"], ckpt, image_size=42, **TINY_DINO["model_kwargs"]).tokens(x)[1].shape[1] == 9
    # the original release carries a mask token: dropped by the filter
    state = torch.load(ckpt, weights_only=True)
    state["mask_token"] = torch.zeros(1, 32)
    torch.save(state, tmp_path / "orig.pth")
    load_dino(TINY_DINO["model"], tmp_path / "orig.pth", image_size=28, **TINY_DINO["model_kwargs"])
    wider = tiny_dino_checkpoint(tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"wide\.pth does not fit: cls_token has shape \[1, 1, 32\], "
                                              r"expected \[1, 1, 64\]"):
        load_dino(TINY_DINO["model"], wider, image_size=28, embed_dim=64, depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match="no checkpoint file at"):
        load_dino(TINY_DINO["model"], tmp_path / "none.pth", image_size=28, **TINY_DINO["model_kwargs"])
    with pytest.raises(ConfigError, match="unknown timm model 'vit_base_patch14_dinov3'"):
        load_dino("vit_base_patch14_dinov3")
    with pytest.raises(ConfigError, match="not a multiple of the patch size"):
        load_dino(TINY_DINO["model"], None, image_size=30, **TINY_DINO["model_kwargs"])


def test_dino_similarity(ckpt, tmp_path):
    from torchvision.transforms.functional import to_pil_image

    refs = bright(3)
    folder = tmp_path / "refs"
    folder.mkdir()
    for i, r in enumerate(refs):
        to_pil_image(r).save(folder / f"{i}.png")
    reward = build_reward(_spec("dino_similarity", ckpt, reference_dir=str(folder), reduce="max"))
    assert reward.references.shape == (3, 3, 28, 28)
    x = torch.cat([refs[:1], dark(1)])
    out = reward(x, PROMPTS[:2]).total
    assert out[0] == pytest.approx(1.0, abs=1e-2)  # an image of the reference set (up to 8-bit rounding)
    assert out[1] < out[0]
    xg = x.clone().requires_grad_(True)
    reward(xg, PROMPTS[:2]).total.sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_adversarial_scores_dims_and_gradients(ckpt):
    reward = build_reward(_spec("adv_dino", ckpt, hidden=16))
    assert reward.dimensions == ("cls", "patch") and reward.weights == {"cls": 0.7, "patch": 0.3}
    x = dark(4).requires_grad_(True)
    out = reward(x, PROMPTS)
    torch.testing.assert_close(out.total, 0.7 * out.scores["cls"] + 0.3 * out.scores["patch"])
    out.total.sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.head.parameters())  # the generator step leaves the head alone
    singles = torch.cat([reward(x[i:i + 1].detach(), PROMPTS[:1]).total for i in range(4)])
    torch.testing.assert_close(out.total.detach(), singles, atol=1e-5, rtol=1e-5)


def test_head_learns_to_separate_references(ckpt, tmp_path):
    reward = build_reward(_spec("adv_dino", ckpt, hidden=32, lr=3e-3, num_patches=2))
    reward.set_references(bright(16))
    gen = dark(8)
    before = reward(bright(8, seed=5), PROMPTS * 2).total.mean() - reward(gen, PROMPTS * 2).total.mean()
    first = reward.update_head(gen)
    last = reward.update_head(gen, steps=40)
    assert last["head_loss"] < first["head_loss"] and last["head_accuracy"] == 1.0
    after = reward(bright(8, seed=5), PROMPTS * 2).total.mean() - reward(gen, PROMPTS * 2).total.mean()
    assert after > before + 0.5  # held-out references now score above generated images
    # save / load round trip of the head
    path = reward.save_head(tmp_path / "head.safetensors")
    again = build_reward(_spec("adv_dino", ckpt, hidden=32, head_path=str(path)))
    torch.testing.assert_close(again(gen, PROMPTS * 2).total, reward(gen, PROMPTS * 2).total)
    with pytest.raises(CheckpointError, match="head.safetensors does not fit"):
        build_reward(_spec("adv_dino", ckpt, hidden=8, head_path=str(path)))


def test_update_schedule(ckpt):
    reward = build_reward(_spec("adv_dino", ckpt, hidden=8, updates_per_step=3, update_every=2))
    reward.set_references(bright(4))
    stats = [reward.after_generator_step(dark(2)) for _ in range(4)]
    assert [bool(s) for s in stats] == [False, True, False, True]
    assert reward.head_updates == 6 and reward.generator_steps == 4
    off = build_reward(_spec("adv_dino", ckpt, hidden=8, updates_per_step=0))
    assert off.after_generator_step(dark(2)) == {} and off.head_updates == 0
    with pytest.raises(ConfigError):
        build_reward(_spec("adv_dino", ckpt, update_every=0))
    no_refs = build_reward(_spec("adv_dino", ckpt, hidden=8))
    with pytest.raises(Exception, match="no reference images"):
        no_refs.update_head(dark(2))


def test_hinge_and_patches():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0])
    assert hinge_loss(real, fake).item() == pytest.approx((0 + 0.5) / 2 + (0 + 1) / 2)
    p = torch.arange(2 * 10 * 3, dtype=torch.float).reshape(2, 10, 3)
    sub = random_patches(p, 4, torch.Generator().manual_seed(0))
    assert sub.shape == (2, 4, 3)
    for b in range(2):  # rows are whole patches of the same image, without repeats
        rows = {tuple(r.tolist()) for r in sub[b]}
        assert len(rows) == 4 and rows <= {tuple(r.tolist()) for r in p[b]}
