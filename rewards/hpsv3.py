"""HPSv3 (Ma et al. 2025, "HPSv3: Towards Wide-Spectrum Human Preference Score"): a Qwen2-VL reads the
image and an instruction that holds the prompt and ends with a special token ``<|Reward|>``; an MLP head
(hidden -> 1024 -> ReLU -> dropout -> 16 -> ReLU -> 2) on the language model's last hidden state (after its
final norm) at that token predicts the mean mu and the log standard deviation log sigma of the image's
preference score (the release was trained with a probabilistic Bradley-Terry loss on mu and sigma). The
reward is mu (dimension ``score``); sigma = exp(log sigma) is reported as ``uncertainty`` (weight 0).

As the released inference does:

* every image is resized (bicubic) so that each side is a multiple of 28 (patch 14 x merge 2) and its area
  is about ``pixels`` = 256 * 28 * 28 (256 image tokens), normalised with the processor's mean / std;
* the user message is the image followed by :data:`INSTRUCTION` (the prompt inserted) and
  :data:`REWARD_QUESTION`, laid out by the base model's chat template with the generation prompt;
* the language model sees plain sequential positions 0 .. L-1 on all three rotary sections: the release's
  forward feeds the embeddings to the text model without Qwen2-VL's 3-D (M-RoPE) image positions, and the
  weights were trained that way.

Preprocessing is torch (resize, normalise, patchify), so the score is differentiable in the pixels.

Weights: the release checkpoint ``HPSv3.safetensors`` of the hub repository ``MizzenAI/HPSv3`` (the full
state dict of the reward model: ``visual.*``, ``model.*``, ``lm_head.weight``, ``rm_head.{0,3,5}.*``;
``lm_head`` is not used), on top of the configuration, tokenizer and processor of its base model
``Qwen/Qwen2-VL-7B-Instruct`` (only those small files are read, never the base weights). The tokenizer
gets the ``<|Reward|>`` token and the vocabulary is sized to it, as the release's was.

Reward ``hpsv3``. Options: ``checkpoint`` (the local ``HPSv3.safetensors``), ``base_path`` (a local copy
of ``Qwen2-VL-7B-Instruct``'s config, tokenizer and processor files, or that hub name when online),
``pixels`` (the image area, default 200704), ``dtype`` (default ``bfloat16``, as released; the head runs in
float32), ``device``.
"""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.base import Reward, RewardError, register_reward
from rewards.loading import CheckpointError, check_state_dict, freeze, parse_dtype, read_state_dict

REWARD_TOKEN = "<|Reward|>"
IMAGE_PAD = "<|image_pad|>"
#: the image area the release reads every image at (256 image tokens after the 2 x 2 merge)
PIXELS = 256 * 28 * 28
#: the instruction HPSv3 was trained with (its text decides the scores; kept verbatim, trailing spaces too)
INSTRUCTION = "\n".join((
    "",
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a "
    "overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst "
    "and 10 being the best. ",
    "",
    "**Visual Quality:**  ",
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:",
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.",
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.",
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).",
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.",
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. ",
    "",
    "**Text Alignment:**  ",
    "Assess how well the image matches the textual prompt across the following sub-dimensions:",
    "- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) "
    "align with the textual description. The subject should match the description in terms of number, appearance, "
    "and behavior.",
    "- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the "
    "image adheres to this style.",
    "- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image "
    "logically fit the scenario described in the prompt. The environment should support and enhance the subject "
    "without contradictions.",
    "- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, "
    "accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be "
    "acceptable, but critical attributes should be preserved.",
    "- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the "
    "image. The generated content should not introduce elements that conflict with or distort the original "
    "description.",
    "Textual prompt - {text_prompt}",
    "",
    "",
    "",
))
#: what follows the instruction: the question and the reward token the head reads
REWARD_QUESTION = f"\nPlease provide the overall ratings of this image: {REWARD_TOKEN}\n\nEND\n"
#: release checkpoint key prefix -> this module's key prefix (first match wins; the release's own layout
#: is ``visual.*`` / ``model.*``, a re-save by transformers >= 4.52 has ``model.visual.*`` /
#: ``model.language_model.*``)
KEY_PREFIXES = (
    ("model.visual.", "vlm.visual."),
    ("model.language_model.", "vlm.language_model."),
    ("visual.", "vlm.visual."),
    ("model.", "vlm.language_model."),
    ("rm_head.", "head."),
)
#: checkpoint keys the reward does not read (the language-model output layer)
UNUSED = re.compile(r"^lm_head\.")


def to_module_key(key: str) -> str:
    """A release checkpoint key as this module names it (keys of no known prefix are returned as they are)."""
    for source, target in KEY_PREFIXES:
        if key.startswith(source):
            return target + key[len(source):]
    return key


def to_release_key(key: str) -> str:
    """The inverse of :func:`to_module_key`, in the release's own layout (to write a checkpoint)."""
    for source, target in (("visual.", "vlm.visual."), ("model.", "vlm.language_model."), ("rm_head.", "head.")):
        if key.startswith(target):
            return source + key[len(target):]
    return key


def user_text(prompt: str) -> str:
    """The text part of the user message: the instruction with the prompt, then the reward question."""
    return INSTRUCTION.format(text_prompt=prompt) + REWARD_QUESTION


def smart_size(height: int, width: int, factor: int = 28, min_pixels: int = PIXELS,
               max_pixels: int = PIXELS) -> tuple[int, int]:
    """The (height, width) Qwen2-VL reads an image at: both sides multiples of ``factor``, the area within
    [min_pixels, max_pixels] (scaled down with floor, up with ceil), the aspect ratio about kept."""
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(pixels: Tensor, patch: int = 14, temporal: int = 2, merge: int = 2) -> tuple[Tensor, Tensor]:
    """Normalised images (B, C, H, W), H and W multiples of ``patch * merge``, as the Qwen2-VL vision tower
    reads them: each image a clip of ``temporal`` equal frames cut into patch x patch squares, ordered by
    merge window (row, column), then within it; returns the flattened patches
    (B * H/patch * W/patch, C * temporal * patch^2) and the grid (B, 3) of (frames / temporal, H/patch, W/patch)."""
    b, c, h, w = pixels.shape
    if h % (patch * merge) or w % (patch * merge):
        raise ValueError(f"image size {h} x {w} is not a multiple of {patch * merge}")
    gh, gw = h // patch, w // patch
    x = pixels.unsqueeze(1).expand(b, temporal, c, h, w)
    x = x.reshape(b, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # (b, gh/m, gw/m, m, m, c, temporal, p, p)
    grid = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=pixels.device)
    return x.reshape(b * gh * gw, c * temporal * patch * patch), grid


class HPSv3Head(nn.Sequential):
    """The release's head: Linear(hidden, 1024), ReLU, Dropout(0.05), Linear(1024, 16), ReLU, Linear(16, 2)
    (weights at ``0``, ``3``, ``5``); outputs (mu, log sigma)."""

    def __init__(self, hidden: int) -> None:
        super().__init__(nn.Linear(hidden, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16), nn.ReLU(),
                         nn.Linear(16, 2))


class HPSv3Model(nn.Module):
    """The Qwen2-VL (transformers ``Qwen2VLModel``: vision tower and language model, no LM head), its
    processor with the reward token, and the head. :meth:`forward` returns (B, 2): (mu, log sigma)."""

    def __init__(self, vlm: nn.Module, processor, pixels: int = PIXELS) -> None:
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self.reward_token_id = int(processor.tokenizer.convert_tokens_to_ids(REWARD_TOKEN))
        self.head = HPSv3Head(int(vlm.config.text_config.hidden_size)).float()
        image = processor.image_processor
        self.patch, self.merge = int(image.patch_size), int(image.merge_size)
        self.temporal = int(image.temporal_patch_size)
        self.mean, self.std = tuple(image.image_mean), tuple(image.image_std)
        self.pixels = int(pixels)

    @property
    def device(self) -> torch.device:
        return next(self.vlm.parameters()).device

    def pixel_inputs(self, samples: Tensor) -> tuple[Tensor, Tensor]:
        """Images (B, C, H, W) in [0, 1] -> (patches, grid_thw), in torch: bicubic resize (antialiased) to
        :func:`smart_size`, normalisation, :func:`patchify`."""
        images = samples.float().expand(-1, 3, -1, -1) if samples.shape[1] == 1 else samples.float()
        size = smart_size(*images.shape[-2:], factor=self.patch * self.merge, min_pixels=self.pixels,
                          max_pixels=self.pixels)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return patchify((images - mean) / std, self.patch, self.temporal, self.merge)

    def text_inputs(self, prompts: Sequence[str], image_tokens: int) -> dict[str, Tensor]:
        """Token ids and attention mask of the chat (right-padded), each image placeholder expanded to
        ``image_tokens`` copies."""
        texts = []
        for prompt in prompts:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": user_text(prompt)}]}]
            text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            if text.count(IMAGE_PAD) != 1:
                raise RewardError(f"hpsv3: the chat template gave {text.count(IMAGE_PAD)} image placeholders, "
                                  "expected 1")
            texts.append(text.replace(IMAGE_PAD, IMAGE_PAD * image_tokens))
        batch = self.processor.tokenizer(texts, padding=True, padding_side="right", return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, samples: Tensor, prompts: Sequence[str]) -> Tensor:
        """(B, 2) = (mu, log sigma) of images (B, C, H, W) in [0, 1] and their prompts."""
        dtype = next(self.vlm.parameters()).dtype
        patches, grid = self.pixel_inputs(samples.to(self.device))
        tokens = self.text_inputs(prompts, int(grid[0].prod()) // self.merge ** 2)
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        b, length = ids.shape
        positions = torch.arange(length, device=self.device).expand(3, b, length)  # as the release: no M-RoPE
        hidden = self.vlm(input_ids=ids, attention_mask=mask, position_ids=positions, pixel_values=patches.to(dtype),
                          image_grid_thw=grid, use_cache=False).last_hidden_state
        at = ids == self.reward_token_id
        if not bool((at.sum(1) == 1).all()):
            raise RewardError(f"hpsv3: each sequence must hold {REWARD_TOKEN} exactly once (is it in a prompt?)")
        return self.head(hidden[at].float())


def _no_init():
    """A context that skips the random initialisation of a model about to receive its weights."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def build_hpsv3_model(base_path: str | Path, *, dtype: str | torch.dtype = "float32", pixels: int = PIXELS,
                      initialise: bool = True, device: str | torch.device = "cpu") -> HPSv3Model:
    """An :class:`HPSv3Model` on ``device`` from the base model's config and processor (``base_path``: a
    local folder or a hub name), with the reward token added and the vocabulary sized to the tokenizer, as
    the release was; random weights (``initialise=False``: left uninitialised, for loading)."""
    from transformers import AutoConfig, AutoProcessor, Qwen2VLModel

    text = str(base_path)
    if (text.startswith((".", "/", "~")) or Path(text).suffix) and not Path(text).expanduser().exists():
        raise CheckpointError(f"hpsv3: no base model folder at {text} (expected Qwen2-VL-7B-Instruct's config, "
                              "tokenizer and processor files)")
    try:
        processor = AutoProcessor.from_pretrained(text)
        config = AutoConfig.from_pretrained(text)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or ["?"])[0]
        raise CheckpointError(f"hpsv3: cannot load a Qwen2-VL config and processor from {text}: {first}") from None
    if getattr(config, "model_type", None) != "qwen2_vl":
        raise CheckpointError(f"hpsv3: {text} holds a {getattr(config, 'model_type', '?')} model, expected qwen2_vl")
    processor.tokenizer.add_special_tokens({"additional_special_tokens": [REWARD_TOKEN]})
    config.text_config.vocab_size = len(processor.tokenizer)
    with torch.device(device), (contextlib.nullcontext() if initialise else _no_init()):
        vlm = Qwen2VLModel._from_config(config, dtype=parse_dtype(dtype))
        return HPSv3Model(vlm, processor, pixels=pixels)


def _checkpoint_reader(path: str | Path, what: str) -> tuple[dict[str, tuple], Callable[[str], Tensor]]:
    """(shape of every tensor, a function reading one) of a checkpoint; a ``.safetensors`` file is read one
    tensor at a time (a 7B model is never held twice), other formats through :func:`read_state_dict`."""
    path = Path(path)
    if path.suffix != ".safetensors":
        state = read_state_dict(path, what)
        return {k: tuple(v.shape) for k, v in state.items()}, state.__getitem__
    if not path.is_file():
        raise CheckpointError(f"{what}: no checkpoint file at {path}")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
    except Exception as err:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what}: cannot read checkpoint {path}: {first}") from None

    def read(key: str) -> Tensor:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    return shapes, read


def load_hpsv3_model(checkpoint: str | Path, base_path: str | Path = "Qwen/Qwen2-VL-7B-Instruct", *,
                     dtype: str | torch.dtype = "bfloat16", pixels: int = PIXELS,
                     device: str | torch.device = "cpu") -> HPSv3Model:
    """The released reward model: :func:`build_hpsv3_model` (built on ``device``) filled from ``checkpoint``
    (the release layout, see :data:`KEY_PREFIXES`) one tensor at a time; a missing, unexpected or misshapen
    key is a one-line error."""
    model = build_hpsv3_model(base_path, dtype=dtype, pixels=pixels, initialise=False, device=device)
    what = "HPSv3 checkpoint"
    shapes, read = _checkpoint_reader(checkpoint, what)
    names = {to_module_key(k): k for k in shapes if not UNUSED.search(k)}
    expected = model.state_dict()
    check_state_dict({k: torch.empty(shapes[v], device="meta") for k, v in names.items()}, expected, checkpoint, what)
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(read(names[key]))
    model.head.float()
    return model


@register_reward("hpsv3")
class HPSv3(Reward):
    """HPSv3: mu of the release's head (module docstring for the options); ``uncertainty`` = sigma,
    reported with weight 0."""

    differentiable = True
    dimensions = ("score", "uncertainty")

    def __init__(self, checkpoint: str | Path | None = None, base_path: str | Path = "Qwen/Qwen2-VL-7B-Instruct",
                 pixels: int = PIXELS, dtype: str = "bfloat16", device: str = "cpu",
                 model: HPSv3Model | None = None, weights=None) -> None:
        super().__init__({"uncertainty": 0.0, **dict(weights or {})})
        if int(pixels) < 28 * 28:
            raise ConfigError(f"hpsv3: pixels must be at least {28 * 28}, got {pixels}")
        if model is None:
            if checkpoint is None:
                raise ConfigError("reward 'hpsv3' needs checkpoint: HPSv3.safetensors of the hub release "
                                  "MizzenAI/HPSv3 (with base_path: Qwen2-VL-7B-Instruct's config and processor)")
            model = load_hpsv3_model(checkpoint, base_path, dtype=dtype, pixels=pixels, device=device)
        self.model = freeze(model)
        self.to(device)

    def score(self, samples, prompts, **context):
        out = self.model(samples, list(prompts))
        return {"score": out[:, 0], "uncertainty": out[:, 1].exp()}


__all__ = ["HPSv3", "HPSv3Head", "HPSv3Model", "INSTRUCTION", "REWARD_QUESTION", "build_hpsv3_model",
           "load_hpsv3_model", "patchify", "smart_size", "to_module_key", "to_release_key", "user_text"]
