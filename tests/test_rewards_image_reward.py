"""ImageReward: a tiny random model built in code, written in the public checkpoint's layout and
loaded back through the same loader, scores exactly as the model in memory; a mismatched key is a
one-line error; the score is the paper's normalisation of the head, and differentiable."""

from __future__ import annotations

import pytest
import torch

from align.errors import ConfigError
from rewards.image_reward import REWARD_MEAN, REWARD_STD, ImageRewardModel, load_image_reward_model
from rewards.registry import build_reward
from rewards.tiny import TINY_IMAGE_REWARD, save_random_image_reward, tiny_bert_tokenizer


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_reward")
    return save_random_image_reward(root / "ImageReward.pt"), tiny_bert_tokenizer(root / "bert")


def reward(files, **options):
    checkpoint, tokenizer = files
    return build_reward({"name": "image_reward", "checkpoint": str(checkpoint), "tokenizer_path": str(tokenizer),
                         "config": TINY_IMAGE_REWARD, **options})


def test_the_checkpoint_round_trips_and_the_score_is_normalised(files):
    checkpoint, _ = files
    torch.manual_seed(0)
    original = ImageRewardModel(TINY_IMAGE_REWARD).eval()  # the weights save_random_image_reward wrote
    loaded = load_image_reward_model(checkpoint, TINY_IMAGE_REWARD).eval()
    for (name, a), (_, b) in zip(original.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    r = reward(files)
    images = torch.rand(3, 3, 40, 48)
    prompts = ["a photo of a cat", "a red car", "a painting of a fox in the snow"]
    score = r(images, prompts).total
    ids, mask = r.tokens(prompts)
    from rewards.clip import clip_preprocess

    with torch.no_grad():
        raw = original(clip_preprocess(images, size=32), ids, mask)
    torch.testing.assert_close(score, (raw - REWARD_MEAN) / REWARD_STD, rtol=1e-5, atol=1e-5)
    assert ids.shape == (3, 35) and int(ids[0, 0]) == r.tokenizer.cls_token_id
    # the prompt matters: the text cross-attends to the image
    assert not torch.allclose(score[:1], r(images[:1], ["a blue dog on a sofa"]).total)


def test_the_score_is_differentiable_in_the_pixels(files):
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    reward(files)(images, ["a cat", "a dog"]).total.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0


def test_a_checkpoint_that_does_not_fit_is_one_line(files, tmp_path):
    checkpoint, _ = files
    state = torch.load(checkpoint, weights_only=True)
    state["blip.visual_encoder.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)
    del state["mlp.layers.7.bias"]
    state["blip.text_decoder.cls.weight"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(ConfigError) as err:
        load_image_reward_model(bad, TINY_IMAGE_REWARD)
    message = str(err.value)
    assert "\n" not in message and "does not fit" in message
    assert "missing keys mlp.layers.7.bias" in message and "unexpected keys blip.text_decoder.cls.weight" in message
    assert "visual_encoder.encoder.layers.0.self_attn.qkv.weight has shape [3, 3], expected [96, 32]" in message
    with pytest.raises(ConfigError, match="needs checkpoint"):
        build_reward({"name": "image_reward"})


def test_the_blip_projections_of_the_checkpoint_are_not_read(files):
    """The reference model saves BLIP's contrastive projections (``blip.vision_proj`` / ``blip.text_proj``)
    with the weights its score reads; the loader accepts them and leaves them out (the full layout is
    compared with the published package in test_reward_reference_packages.py)."""
    checkpoint, _ = files
    state = torch.load(checkpoint, weights_only=True)
    assert {"blip.vision_proj.weight", "blip.text_proj.weight"} <= set(state)
    model = load_image_reward_model(checkpoint, TINY_IMAGE_REWARD)
    assert not any(k.startswith(("blip.", "vision_proj", "text_proj")) for k in model.state_dict())


def test_the_enc_token_replaces_cls(files):
    r = reward(files, first_token="enc")
    ids, _ = r.tokens(["a cat"])
    assert int(ids[0, 0]) == r.tokenizer.convert_tokens_to_ids("[ENC]")
