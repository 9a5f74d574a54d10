"""Rewards against the published packages they reimplement, on the same tiny random weights: ImageReward
(PyPI ``image-reward`` 1.5), HPSv2 (``hpsv2`` 1.2.0) and HPSv3 (``hpsv3`` 1.0.0). Each reference model is
built with its own classes, its state dict is the checkpoint our loader reads (every key and shape
compared), and the reference's own scoring function and ours score the same image and prompt.

``scripts/setup_env.sh`` installs the packages without their pinned dependencies (they would downgrade
this environment) in ``<venv>/reference/packages``, and the transformers release HPSv3 pins (4.45.2, with
its tokenizers and huggingface_hub) in ``<venv>/reference/transformers-4.45``. The ImageReward and HPSv3
model code does not run under transformers 5, so those references run in a subprocess with that release
first on the path; HPSv2 (its own open_clip copy) runs in this process. This file is also the
subprocess's script (``python tests/test_reward_reference_packages.py image_reward=FOLDER hpsv3=FOLDER``): it
imports nothing of the project at module level (the tests import what they use).

What the reference side is given to run offline and small (its model and scoring code is unchanged):

* ImageReward: its package ``__init__`` files are skipped (they import OpenAI's ``clip`` and diffusers for
  other scorers); ``BertTokenizer.from_pretrained("bert-base-uncased")`` reads a local tiny WordPiece
  vocabulary (the package still adds BLIP's [DEC] / [ENC]); ``create_vit`` builds the package's own
  ``VisionTransformer`` at width 32 and depth 2 (its "large" size is hard-coded); the text encoder comes
  from a med_config of width 768 (the head's input width is hard-coded), 2 layers.
* HPSv2: a tiny open_clip config registered with the package's ``add_model_config``, built by its
  ``create_model_and_transforms`` with the arguments of its ``initialize_model`` (which would download
  ViT-H-14 weights), put in ``img_score.model_dict``; then ``img_score.score(image, prompt, cp=...)``.
  The 1.2.0 wheel lacks the CLIP BPE file its tokenizer reads at import; the setup copies open_clip's.
* HPSv3: ``datasets``, ``trl`` and ``fire`` (imported for training only) are stand-in modules
  (``get_quantization_config`` returns None, as trl does without 4 / 8-bit); a tiny Qwen2-VL base folder is
  written with transformers 4.45 classes (the hub model's file layout, a padded vocabulary); the release's
  YAML with that folder, float32 and no flash-attention; then ``HPSv3RewardInferencer(...).reward(...)``.

Weights are redrawn at unit (fan-in) scale after construction so the heads' outputs are of order one and a
1e-5 agreement means something. Images already at the model's input size are compared to 1e-5; an image
that must be resampled differs by PIL's bicubic (uint8) against torch's, about 1e-3, checked to 1e-2.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

REFERENCE = Path(sys.prefix) / "reference"
PACKAGES, TRANSFORMERS_445 = REFERENCE / "packages", REFERENCE / "transformers-4.45"
#: ImageReward at a size its hard-coded parts allow: 224 px, patch 16, text width 768 (the head's input)
IMAGE_REWARD_CONFIG = {
    "vision": dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=224,
                   patch_size=16, layer_norm_eps=1e-6),
    "text": dict(vocab_size=64, hidden_size=768, encoder_hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=12, max_position_embeddings=40, layer_norm_eps=1e-12),
}


# --- the reference side (runs in the subprocess) ---------------------------------------------------
def unit_scale_(model) -> None:
    """Redraw every weight at fan-in scale (norm weights about 1), seeded by the caller."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0.0, math.prod(param.shape[1:]) ** -0.5)
            elif name.endswith("weight") and ("norm" in name.lower() or "ln_" in name):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.1)


def bare_package(name: str, directory: Path) -> None:
    """Make ``name`` importable as a package without running its ``__init__``."""
    module = types.ModuleType(name)
    module.__path__ = [str(directory)]
    sys.modules[name] = module


def reference_image_reward(folder: Path) -> None:
    """Build the package's ImageReward at the tiny size of ``inputs.json``, save its state dict and score the
    images with its ``score``."""
    spec = json.loads((folder / "inputs.json").read_text())
    bare_package("ImageReward", PACKAGES / "ImageReward")
    bare_package("ImageReward.models", PACKAGES / "ImageReward" / "models")
    import ImageReward.ImageReward as image_reward
    import ImageReward.models.BLIP.blip as blip
    import ImageReward.models.BLIP.blip_pretrain as blip_pretrain
    from ImageReward.models.BLIP.vit import VisionTransformer

    hub_tokenizer = blip.BertTokenizer

    class LocalBertTokenizer(hub_tokenizer):
        @classmethod
        def from_pretrained(cls, name, *args, **kwargs):
            local = str(folder / "bert") if name == "bert-base-uncased" else name
            return super().from_pretrained(local, *args, **kwargs)

    vision = spec["vision"]

    def tiny_vit(vit, image_size, *args, **kwargs):
        return VisionTransformer(img_size=image_size, patch_size=vision["patch_size"], embed_dim=vision["hidden_size"],
                                 depth=vision["num_hidden_layers"], num_heads=vision["num_attention_heads"],
                                 drop_path_rate=0.1), vision["hidden_size"]

    blip.BertTokenizer = LocalBertTokenizer
    blip_pretrain.create_vit = tiny_vit
    (folder / "med_config.json").write_text(json.dumps(spec["med_config"]))
    torch.manual_seed(0)
    model = image_reward.ImageReward(med_config=str(folder / "med_config.json"), device="cpu")
    unit_scale_(model)
    model.eval()
    torch.save(model.state_dict(), folder / "ImageReward.pt")
    rows = []
    with torch.no_grad():
        for row in spec["rows"]:
            ids = model.blip.tokenizer(row["prompt"], padding="max_length", truncation=True, max_length=35).input_ids
            rows.append(dict(row, score=model.score(row["prompt"], str(folder / row["image"])), input_ids=ids))
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    (folder / "reference.json").write_text(json.dumps({"rows": rows, "shapes": shapes}))


def reference_hpsv3(folder: Path) -> None:
    """Write a tiny Qwen2-VL base folder with transformers 4.45, build the package's reward model on it,
    save its state dict as the release does, load it back through ``HPSv3RewardInferencer`` and score."""
    import safetensors.torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import (Qwen2TokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration,
                              Qwen2VLImageProcessor, Qwen2VLProcessor)
    import transformers.trainer  # noqa: F401 - before the stand-ins, so transformers sees no datasets package

    spec = json.loads((folder / "inputs.json").read_text())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = Qwen2TokenizerFast(tokenizer_object=backend, unk_token=None, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ["<|endoftext|>", *specials]}
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 16384, patch_size=14,
                                            temporal_patch_size=2, merge_size=2)  # the 7B model's settings
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 chat_template=spec["chat_template"])
    config = Qwen2VLConfig(
        vocab_size=64 * math.ceil((len(tokenizer) + 8) / 64), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}, tie_word_embeddings=False,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(folder / "base")
    processor.save_pretrained(folder / "base")
    (folder / "HPSv3_tiny.yaml").write_text("\n".join([
        'rm_head_type: "ranknet"', "lora_enable: False", f'model_name_or_path: "{folder / "base"}"',
        "max_pixels: 200704", "min_pixels: 200704", "with_instruction: true", f'output_dir: "{folder / "runs"}"',
        "use_special_tokens: true", 'reward_token: "special"', "output_dim: 2", 'loss_type: "uncertainty"',
        "disable_flash_attn2: True", "bf16: False", 'torch_dtype: "float32"', 'report_to: "none"', ""]))

    def stand_in(name: str, **attrs) -> None:
        sys.modules[name] = types.ModuleType(name)
        sys.modules[name].__dict__.update(attrs)

    def quantization_config(model_config):
        assert not (model_config.load_in_4bit or model_config.load_in_8bit)
        return None

    class RewardTrainer:  # the training loop's base class; never instantiated here
        pass

    stand_in("datasets", Dataset=type("Dataset", (), {}))
    stand_in("trl", RewardTrainer=RewardTrainer, get_kbit_device_map=lambda: None,
             get_quantization_config=quantization_config)
    stand_in("fire", Fire=lambda *args, **kwargs: None)
    from hpsv3.inference import HPSv3RewardInferencer
    from hpsv3.train import create_model_and_processor
    from hpsv3.utils.parser import DataConfig, ModelConfig, PEFTLoraConfig, TrainingConfig, parse_args_with_yaml

    (_, training, model_config, lora), _ = parse_args_with_yaml(
        (DataConfig, TrainingConfig, ModelConfig, PEFTLoraConfig), str(folder / "HPSv3_tiny.yaml"), is_train=False)
    model, _, _ = create_model_and_processor(model_config=model_config, peft_lora_config=lora, training_args=training)
    torch.manual_seed(1)
    unit_scale_(model)
    state = model.state_dict()
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "HPSv3.safetensors"))
    inferencer = HPSv3RewardInferencer(config_path=str(folder / "HPSv3_tiny.yaml"),
                                       checkpoint_path=str(folder / "HPSv3.safetensors"), device="cpu")
    paths = [str(folder / row["image"]) for row in spec["rows"]]
    prompts = [row["prompt"] for row in spec["rows"]]
    with torch.no_grad():
        batch = inferencer.prepare_batch(paths, prompts)
        out = inferencer.reward(paths, prompts)
    ids = [row_ids[mask.bool()].tolist() for row_ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    rows = [dict(row, mu=float(o[0]), log_sigma=float(o[1]), input_ids=i) for row, o, i in zip(spec["rows"], out, ids)]
    shapes = {k: list(v.shape) for k, v in state.items()}
    (folder / "reference.json").write_text(json.dumps({"rows": rows, "shapes": shapes}))


REFERENCE_RUNS = {"image_reward": reference_image_reward, "hpsv3": reference_hpsv3}


# --- this side ---------------------------------------------------------------------------------------
def require_reference() -> None:
    """The reference packages are part of the test environment (scripts/setup_env.sh); one line if not."""
    if not (REFERENCE / "complete").is_file():
        pytest.fail(f"reference packages missing in {REFERENCE}: run scripts/setup_env.sh", pytrace=False)


def run_references(folders: dict[str, Path]) -> None:
    """Run ``REFERENCE_RUNS[kind](folder)`` for each kind in one subprocess (they share its imports, most of
    its time) on the transformers release the packages pin; a kind that fails leaves ``error.txt``."""
    require_reference()
    path = os.pathsep.join([str(TRANSFORMERS_445), str(PACKAGES)])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS=str(torch.get_num_threads()), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1")
    args = [f"{kind}={folder}" for kind, folder in folders.items()]
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"the reference run failed:\n{done.stderr[-3000:]}", pytrace=False)


def reference_result(folder: Path) -> dict:
    """What a reference run wrote in ``folder`` (a test failure with its traceback if it failed)."""
    if (folder / "error.txt").is_file():
        pytest.fail(f"the {folder.name} reference run failed:\n{(folder / 'error.txt').read_text()[-3000:]}",
                    pytrace=False)
    return json.loads((folder / "reference.json").read_text())


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory) -> dict[str, Path]:
    """The ImageReward and HPSv3 references, run once for the module: kind -> its folder."""
    root = tmp_path_factory.mktemp("references")
    folders = {"image_reward": prepare_image_reward(root / "image_reward"), "hpsv3": prepare_hpsv3(root / "hpsv3")}
    run_references(folders)
    return folders


@contextlib.contextmanager
def reference_on_path():
    """The reference packages importable (appended to sys.path) while the block runs."""
    require_reference()
    sys.path.append(str(PACKAGES))
    try:
        yield
    finally:
        sys.path.remove(str(PACKAGES))


def write_image(path: Path, height: int, width: int, seed: int) -> Path:
    from PIL import Image

    Image.fromarray(np.random.RandomState(seed).randint(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


def read_image(path: Path) -> torch.Tensor:
    """(1, 3, H, W) in [0, 1]: the image's uint8 values / 255, as the references' ToTensor gives them."""
    from rewards.media import load_sample

    return load_sample(path)[None]


def assert_one_line_error(fn, *fragments):
    from align.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


# --- ImageReward --------------------------------------------------------------------------------------
def prepare_image_reward(folder: Path) -> Path:
    """The ImageReward reference's inputs: a tiny BERT vocabulary, the sizes, images and prompts."""
    from rewards.tiny import tiny_bert_tokenizer

    folder.mkdir(parents=True)
    tiny_bert_tokenizer(folder / "bert")
    text, vision = IMAGE_REWARD_CONFIG["text"], IMAGE_REWARD_CONFIG["vision"]
    med_config = dict(architectures=["BertModel"], attention_probs_dropout_prob=0.1, hidden_act="gelu",
                      hidden_dropout_prob=0.1, hidden_size=text["hidden_size"], initializer_range=0.02,
                      intermediate_size=text["intermediate_size"], layer_norm_eps=text["layer_norm_eps"],
                      max_position_embeddings=text["max_position_embeddings"], model_type="bert",
                      num_attention_heads=text["num_attention_heads"], num_hidden_layers=text["num_hidden_layers"],
                      pad_token_id=0, type_vocab_size=2, vocab_size=text["vocab_size"],
                      encoder_width=vision["hidden_size"], add_cross_attention=True)
    rows = []
    for i, (height, width, prompt) in enumerate([(224, 224, "a photo of a cat"), (224, 224, "a red car on the moon"),
                                                 (256, 300, "a painting of a fox in the snow")]):
        rows.append(dict(image=write_image(folder / f"image{i}.png", height, width, i).name, prompt=prompt))
    (folder / "inputs.json").write_text(json.dumps(dict(vision=vision, med_config=med_config, rows=rows)))
    return folder


@pytest.fixture(scope="module")
def image_reward_reference(reference_runs):
    return reference_runs["image_reward"], reference_result(reference_runs["image_reward"])


def test_image_reward_checkpoint_layout_is_the_reference_models(image_reward_reference):
    """Every key and shape of the package's ImageReward state dict maps onto our model, and back; left over
    are only the keys the score does not read (BLIP's contrastive projections, a position-id buffer)."""
    from rewards.image_reward import UNUSED, ImageRewardModel, to_checkpoint_key, to_module_key

    _, reference = image_reward_reference
    ours = {k: list(v.shape) for k, v in ImageRewardModel(IMAGE_REWARD_CONFIG).state_dict().items()}
    theirs = {to_module_key(k): shape for k, shape in reference["shapes"].items()}
    assert {k for k in theirs if k not in ours} == {
        "blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight", "blip.text_proj.bias",
        "text_encoder.embeddings.position_ids"}
    assert all(UNUSED.search(k) for k in theirs if k not in ours)
    assert [k for k in ours if k not in theirs and not UNUSED.search(k)] == []
    assert {k: s for k, s in ours.items() if k in theirs} == {k: s for k, s in theirs.items() if k in ours}
    assert {to_checkpoint_key(k) for k in ours if k in theirs} <= set(reference["shapes"])


def test_image_reward_scores_as_the_reference_package(image_reward_reference):
    from rewards.registry import build_reward

    folder, reference = image_reward_reference
    reward = build_reward({"name": "image_reward", "checkpoint": str(folder / "ImageReward.pt"),
                           "tokenizer_path": str(folder / "bert"), "config": IMAGE_REWARD_CONFIG})
    rows = reference["rows"]
    with torch.no_grad():
        ours = [float(reward(read_image(folder / row["image"]), [row["prompt"]]).total) for row in rows]
    for row in rows:
        assert reward.tokens([row["prompt"]])[0][0].tolist() == row["input_ids"]
    expected = [row["score"] for row in rows]
    assert max(expected) - min(expected) > 0.1  # the scores depend on the image and the prompt
    np.testing.assert_allclose(ours[:2], expected[:2], rtol=0, atol=1e-5)  # 224 px: no resampling
    np.testing.assert_allclose(ours[2], expected[2], rtol=0, atol=1e-2)  # PIL's bicubic against torch's


# --- HPSv2 --------------------------------------------------------------------------------------------
def test_hpsv2_layout_and_score_match_the_reference_package(tmp_path, monkeypatch):
    """The package's open_clip builds the model, loads the checkpoint and scores (``img_score.score``);
    ours loads the same file: the same keys and shapes, the same score to 1e-5, resize-and-pad included."""
    from rewards.registry import build_reward
    from rewards.tiny import tiny_open_clip_config

    with reference_on_path():
        import hpsv2.img_score as img_score
        from hpsv2.src.open_clip import add_model_config, create_model_and_transforms

    config = tiny_open_clip_config(context_length=77)  # the package tokenizes to 77 tokens
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny-hps.json").write_text(json.dumps(config))
    add_model_config(tmp_path / "configs")
    model, _, preprocess = create_model_and_transforms(
        "tiny-hps", None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False)
    torch.manual_seed(0)
    unit_scale_(model)
    checkpoint = tmp_path / "HPS_v2.1_tiny.pt"
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    monkeypatch.setattr(img_score, "device", "cpu")
    monkeypatch.setattr(img_score, "model_dict", {"model": model, "preprocess_val": preprocess})

    reward = build_reward({"name": "hpsv2", "checkpoint": str(checkpoint), "clip_model": config})
    ours = {k: tuple(v.shape) for k, v in reward.backbone.model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in model.state_dict().items()}
    from PIL import Image

    measured = []
    for i, (height, width, prompt) in enumerate([(32, 32, "a photo of a cat"), (48, 40, "a red car on the moon"),
                                                 (20, 64, "a painting of a fox in the snow")]):
        path = write_image(tmp_path / f"image{i}.png", height, width, i)
        with Image.open(path) as image, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its torch.cuda.amp.autocast
            expected = float(img_score.score(image, prompt, cp=str(checkpoint))[0])
        with torch.no_grad():
            measured.append((float(reward(read_image(path), [prompt]).total), expected))
    np.testing.assert_allclose(*zip(*measured), rtol=0, atol=1e-5)
    assert max(e for _, e in measured) - min(e for _, e in measured) > 1e-2


# --- HPSv3 against the package ----------------------------------------------------------------------------
def prepare_hpsv3(folder: Path) -> Path:
    """The HPSv3 reference's inputs: the chat template, images and prompts."""
    from rewards.tiny import QWEN_CHAT_TEMPLATE

    folder.mkdir(parents=True)
    rows = []
    for i, (height, width, prompt) in enumerate([(448, 448, "a photo of a cat"), (448, 448, "a red car on the moon"),
                                                 (392, 504, "a painting of a fox in the snow")]):
        rows.append(dict(image=write_image(folder / f"image{i}.png", height, width, i).name, prompt=prompt))
    (folder / "inputs.json").write_text(json.dumps(dict(chat_template=QWEN_CHAT_TEMPLATE, rows=rows)))
    return folder


@pytest.fixture(scope="module")
def hpsv3_reference(reference_runs):
    return reference_runs["hpsv3"], reference_result(reference_runs["hpsv3"])


def test_hpsv3_checkpoint_layout_is_the_reference_models(hpsv3_reference):
    """Every key and shape of the package's reward model (as its training saves it) maps onto ours, the
    vocabulary resized to the tokenizer with <|Reward|> (smaller than the base's padded one); only
    ``lm_head`` is left over."""
    from rewards.hpsv3 import UNUSED, build_hpsv3_model, to_module_key, to_release_key

    folder, reference = hpsv3_reference
    ours = {k: list(v.shape) for k, v in build_hpsv3_model(folder / "base").state_dict().items()}
    theirs = {to_module_key(k): shape for k, shape in reference["shapes"].items() if not UNUSED.search(k)}
    assert set(reference["shapes"]) - {k for k in reference["shapes"] if not UNUSED.search(k)} == {"lm_head.weight"}
    assert ours == theirs
    assert {to_release_key(k) for k in ours} == set(reference["shapes"]) - {"lm_head.weight"}
    base_vocab = json.loads((folder / "base" / "config.json").read_text())["vocab_size"]
    assert ours["vlm.language_model.embed_tokens.weight"][0] < base_vocab


def test_hpsv3_scores_as_the_reference_package(hpsv3_reference):
    """mu and sigma as the package's ``HPSv3RewardInferencer.reward`` gives them, from the same token ids;
    a batch (right-padded) scores as its rows alone."""
    from rewards.registry import build_reward

    folder, reference = hpsv3_reference
    reward = build_reward({"name": "hpsv3", "checkpoint": str(folder / "HPSv3.safetensors"),
                           "base_path": str(folder / "base"), "dtype": "float32"})
    rows = reference["rows"]
    images = [read_image(folder / row["image"]) for row in rows]
    for image, row in zip(images, rows):
        _, grid = reward.model.pixel_inputs(image)
        ids = reward.model.text_inputs([row["prompt"]], int(grid[0].prod()) // 4)["input_ids"][0]
        assert ids.tolist() == row["input_ids"]
    with torch.no_grad():
        alone = [reward(image, [row["prompt"]]) for image, row in zip(images, rows)]
        pair = reward(torch.cat(images[:2]), [row["prompt"] for row in rows[:2]])
    mu = [float(out.scores["score"]) for out in alone]
    sigma = [float(out.scores["uncertainty"]) for out in alone]
    expected_mu = [row["mu"] for row in rows]
    assert max(expected_mu) - min(expected_mu) > 1e-2
    np.testing.assert_allclose(mu[:2], expected_mu[:2], rtol=0, atol=1e-5)  # 448 x 448: no resampling
    np.testing.assert_allclose(sigma[:2], [math.exp(row["log_sigma"]) for row in rows[:2]], rtol=0, atol=1e-5)
    np.testing.assert_allclose(pair.total.tolist(), expected_mu[:2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(mu[2], expected_mu[2], rtol=0, atol=1e-2)  # 392 x 504 -> 420 x 532: PIL vs torch
    assert [float(out.total) for out in alone] == mu  # the total is mu; sigma has weight 0


# --- HPSv3 on a tiny model: closed forms ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_hpsv3(tmp_path_factory):
    from rewards.tiny import save_random_hpsv3, tiny_qwen2_vl

    folder = tmp_path_factory.mktemp("hpsv3_tiny")
    base = tiny_qwen2_vl(folder / "base")
    return save_random_hpsv3(folder / "HPSv3.safetensors", base), base


def hpsv3_reward(files, **options):
    from rewards.registry import build_reward

    checkpoint, base = files
    return build_reward({"name": "hpsv3", "checkpoint": str(checkpoint), "base_path": str(base), "dtype": "float32",
                         "pixels": 56 * 56, **options})


def test_hpsv3_preprocessing_matches_the_package_and_qwen2_vl(tiny_hpsv3):
    """:func:`smart_size` gives the package's ``smart_resize`` sizes (the release's 256 * 28 * 28 pixels and
    others); :func:`patchify` equals transformers' Qwen2-VL image processor, patch for patch."""
    from rewards.hpsv3 import PIXELS, smart_size

    with reference_on_path():
        bare_package("hpsv3", PACKAGES / "hpsv3")  # its __init__ loads the training stack
        bare_package("hpsv3.dataset", PACKAGES / "hpsv3" / "dataset")
        from hpsv3.dataset.utils import smart_resize
    assert smart_size(448, 448) == (448, 448) and smart_size(392, 504) == (420, 532)
    sizes = [(448, 448), (1024, 1024), (392, 504), (600, 800), (720, 1280), (1280, 720), (300, 2000), (33, 47),
             (512, 512), (768, 1344), (1000, 999)]
    for pixels in (PIXELS, 56 * 56, 1024 * 28 * 28):
        for height, width in sizes:
            expected = smart_resize(height, width, factor=28, min_pixels=pixels, max_pixels=pixels)
            expected = tuple(max(28, side) for side in expected)  # where the package's gives 0, ours keeps 28
            assert smart_size(height, width, min_pixels=pixels, max_pixels=pixels) == expected, (height, width, pixels)
    reward = hpsv3_reward(tiny_hpsv3)
    image = (torch.rand(1, 3, 56, 56) * 255).round() / 255
    patches, grid = reward.model.pixel_inputs(image)
    expected = reward.model.processor.image_processor(images=[(image[0] * 255).round().to(torch.uint8)],
                                                      return_tensors="pt")
    assert grid.tolist() == expected["image_grid_thw"].tolist() == [[1, 4, 4]]
    torch.testing.assert_close(patches, expected["pixel_values"], rtol=0, atol=1e-5,
                               msg="the patch order differs from the Qwen2-VL processor's")


def test_hpsv3_head_reads_the_reward_token(tiny_hpsv3):
    """Head weights set by hand: layer 0 rows u and -u, layer 3 rows (1, -1) and (-1, 1), layer 5 row
    (2, -2) with bias 0.5 and bias -1 on the second output, so mu = 2 u . h + 0.5 and sigma = e^-1, where h
    is the language model's last hidden state (after its norm) at the <|Reward|> token."""
    from rewards.hpsv3 import REWARD_TOKEN

    reward = hpsv3_reward(tiny_hpsv3)
    head, hidden = reward.model.head, reward.model.head[0].in_features
    u = torch.linspace(-1.0, 1.0, hidden)
    with torch.no_grad():
        for param in head.parameters():
            param.zero_()
        head[0].weight[0], head[0].weight[1] = u, -u
        head[3].weight[0, :2] = torch.tensor([1.0, -1.0])
        head[3].weight[1, :2] = torch.tensor([-1.0, 1.0])
        head[5].weight[0, :2] = torch.tensor([2.0, -2.0])
        head[5].bias.copy_(torch.tensor([0.5, -1.0]))
    images, prompts = torch.rand(2, 3, 40, 64), ["a photo of a cat", "a red car on the moon, at night"]
    with torch.no_grad():
        out = reward(images, prompts)
        patches, grid = reward.model.pixel_inputs(images)
        tokens = reward.model.text_inputs(prompts, int(grid[0].prod()) // 4)
        ids = tokens["input_ids"]
        b, length = ids.shape
        positions = torch.arange(length).expand(3, b, length)
        last = reward.model.vlm(input_ids=ids, attention_mask=tokens["attention_mask"], pixel_values=patches,
                                image_grid_thw=grid, position_ids=positions).last_hidden_state
    at = (ids == reward.model.processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN)).int().argmax(1)
    h = last[torch.arange(b), at]
    torch.testing.assert_close(out.scores["score"], 2 * h @ u + 0.5, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.scores["uncertainty"], torch.full((2,), math.exp(-1.0)))
    torch.testing.assert_close(out.total, out.scores["score"])
    assert int(tokens["attention_mask"][0].sum()) != int(tokens["attention_mask"][1].sum())  # padding was needed
    assert not torch.allclose(h[0], h[1])


def test_hpsv3_is_differentiable_and_checks_its_checkpoint(tiny_hpsv3, tmp_path):
    from safetensors.torch import load_file, save_file

    from rewards.registry import build_reward

    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    hpsv3_reward(tiny_hpsv3)(images, ["a cat", "a dog"]).total.sum().backward()
    assert images.grad is not None and float(images.grad.abs().sum()) > 0
    checkpoint, base = tiny_hpsv3
    state = load_file(str(checkpoint))
    del state["rm_head.5.bias"]
    state["model.norm.weight"] = torch.ones(3)
    state["score_head.weight"] = torch.ones(1)
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad))
    assert_one_line_error(lambda: hpsv3_reward((bad, base)), "does not fit", "missing keys head.5.bias",
                          "unexpected keys score_head.weight",
                          "vlm.language_model.norm.weight has shape [3], expected [32]")
    assert_one_line_error(lambda: build_reward({"name": "hpsv3"}), "needs checkpoint", "MizzenAI/HPSv3")
    assert_one_line_error(lambda: hpsv3_reward((checkpoint, tmp_path / "missing")), "base_path", "not found")


if __name__ == "__main__":
    import traceback

    for arg in sys.argv[1:]:
        kind, _, where = arg.partition("=")
        try:
            REFERENCE_RUNS[kind](Path(where))
        except Exception:  # noqa: BLE001 - reported to the test of this kind, the other kinds still run
            (Path(where) / "error.txt").write_text(traceback.format_exc())
