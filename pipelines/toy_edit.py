"""The embedded editing default: a small image-conditioned flow model that edits coloured digits.

Given a 16 x 16 digit image of the image toy's kind and an instruction, it draws the edited image:

* recolour it: ``"make it blue"``, ``"paint it red"``;
* change its ink: ``"make it thicker"`` (the strokes dilated by a 3 x 3 maximum), ``"make it
  thinner"`` (eroded by a 3 x 3 minimum);
* change the digit: ``"change it to a 7"``, ``"turn it into a seven"`` (another hand's digit, in
  the source's colour and place).

An edit keeps what its instruction does not name: the colour, the digit, its position. The empty
instruction reproduces the source, so classifier-free guidance (the instruction against the empty
one, both seeing the source image) pushes from "keep" towards the edit.

* :func:`parse_edit` -- what an instruction asks for (the one parser of the model, its data and
  the edit rewards).
* :func:`edit_pairs` -- the data: (source, target, instruction) triples from scikit-learn's digits.
* :class:`ToyEditAdapter` (``model.name: toy_edit``) over :class:`pipelines.toy.ToyFlowModel` with
  3 condition channels (the source image, concatenated to the noisy sample), and
  :func:`load_toy_edit_adapter`, over the weights in ``pipelines/assets/toy_edit_flow`` written by
  ``scripts/train_toy_edit.py``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from pipelines.base import Conditioning, load_image, prompt_images
from pipelines.toy import COLOURS, DIGIT_WORDS, NUMBER_WORDS, VOCAB, ToyAdapter, ToyFlowModel, palette_tensor

#: the image vocabulary with the editing words appended (existing ids unchanged)
EDIT_VOCAB: tuple[str, ...] = (*VOCAB, "make", "change", "turn", "into", "to", "recolour", "recolor", "paint",
                               "colour", "color", "thicker", "thinner", "bolder", "strokes", "ink")
#: the edit kinds, with the instruction templates of the training data ({c}: colour, {d}: digit)
EDIT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("make it {c}", "recolour it {c}", "paint it {c}", "turn it {c}", "change the colour to {c}",
               "make the digit {c}"),
    "thicker": ("make it thicker", "make the strokes thicker", "make it bolder", "thicker strokes",
                "make the ink thicker"),
    "thinner": ("make it thinner", "make the strokes thinner", "thinner strokes", "make the ink thinner"),
    "digit": ("change it to a {d}", "make it a {d}", "turn it into a {d}", "change the digit to {d}",
              "make it the number {d}"),
}
#: how often each kind occurs in the training data ("keep": the empty instruction, the source itself)
EDIT_MIX: dict[str, float] = {"colour": 0.3, "thicker": 0.15, "thinner": 0.15, "digit": 0.3, "keep": 0.1}
TOY_EDIT_WEIGHTS_DIR = Path(__file__).resolve().parent / "assets" / "toy_edit_flow"


def parse_edit(instruction: str) -> tuple[str, object]:
    """What an instruction asks for: ``("colour", "blue")``, ``("thicker", None)``,
    ``("thinner", None)``, ``("digit", 7)``, or ``("keep", None)`` when it names no edit.
    ``parse_edit("turn it into a seven") == ("digit", 7)``."""
    from pipelines.toy import PALETTE, ToyTokenizer

    words = ToyTokenizer.split(instruction)
    if any(w in ("thicker", "bolder") for w in words):
        return "thicker", None
    if "thinner" in words:
        return "thinner", None
    digit = next((DIGIT_WORDS[w] for w in words if w in DIGIT_WORDS), None)
    if digit is not None:
        return "digit", digit
    colour = next((w for w in words if w in PALETTE), None)
    if colour is not None:
        return "colour", colour
    return "keep", None


def edit_instruction(kind: str, value: object = None, template: int = 0, word: bool = False) -> str:
    """An instruction of the training distribution: ``edit_instruction("digit", 7) == "change it to a 7"``."""
    if kind == "keep":
        return ""
    d = (NUMBER_WORDS[value] if word else str(value)) if kind == "digit" else None
    return EDIT_TEMPLATES[kind][template].format(c=value, d=d)


def thicker(ink: Tensor) -> Tensor:
    """Strokes (N, 1, H, W) in [0, 1] dilated: the maximum over each 3 x 3 neighbourhood."""
    return F.max_pool2d(ink, 3, 1, 1)


def thinner(ink: Tensor) -> Tensor:
    """Strokes (N, 1, H, W) in [0, 1] eroded: the minimum over each 3 x 3 neighbourhood."""
    return -F.max_pool2d(-ink, 3, 1, 1)


def shift_images(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """(N, C, H, W) images moved by integer offsets (dx, dy) each (zero fill)."""
    n, c, h, w = x.shape
    pad = int(max(dx.abs().max(), dy.abs().max(), 0))
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (pad - dy)[:, None] + torch.arange(h)[None]
    cols = (pad - dx)[:, None] + torch.arange(w)[None]
    index = torch.arange(n)[:, None, None]
    return padded[index, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def edit_pairs(images: Tensor, labels: Tensor, count: int, generator: torch.Generator, rng: random.Random,
               size: int = 16, shift: int = 1, mix: dict[str, float] | None = None
               ) -> tuple[Tensor, Tensor, list[str], list[str]]:
    """``count`` (source, target, instruction, kind) examples from 8 x 8 grey digits ``images`` with
    ``labels``: a source is a digit in a palette colour, moved by at most ``shift`` pixels; its target
    applies a random edit of ``mix`` (default :data:`EDIT_MIX`) in the same place. Sources and
    targets are (count, 3, size, size) in [0, 1]."""
    mix = mix or EDIT_MIX
    grey = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    pick = torch.randint(0, len(labels), (count,), generator=generator)
    colours = torch.randint(0, len(COLOURS), (count,), generator=generator)
    source_ink = grey[pick]
    target_ink = source_ink.clone()
    target_colours = colours.clone()
    kinds = rng.choices(list(mix), weights=list(mix.values()), k=count)
    instructions = []
    by_digit = [torch.nonzero(labels == d).flatten() for d in range(10)]
    for i, kind in enumerate(kinds):
        value = None
        if kind == "colour":
            new = rng.choice([c for c in range(len(COLOURS)) if c != int(colours[i])])
            target_colours[i] = new
            value = COLOURS[new]
        elif kind == "thicker":
            target_ink[i] = thicker(source_ink[i:i + 1])[0]
        elif kind == "thinner":
            target_ink[i] = thinner(source_ink[i:i + 1])[0]
        elif kind == "digit":
            value = rng.choice([d for d in range(10) if d != int(labels[pick[i]])])
            choices = by_digit[value]
            target_ink[i] = grey[choices[torch.randint(0, len(choices), (1,), generator=generator)]][0]
        template = rng.randrange(len(EDIT_TEMPLATES[kind])) if kind != "keep" else 0
        instructions.append(edit_instruction(kind, value, template, word=rng.random() < 0.5))
    dx = torch.randint(-shift, shift + 1, (count,), generator=generator)
    dy = torch.randint(-shift, shift + 1, (count,), generator=generator)
    palette = palette_tensor()[:, :, None, None]
    source = shift_images(source_ink * palette[colours], dx, dy)
    target = shift_images(target_ink * palette[target_colours], dx, dy)
    return source, target, instructions, kinds


class ToyEditAdapter(ToyAdapter):
    """:class:`ModelAdapter` over an image-conditioned :class:`ToyFlowModel` (3 x 16 x 16 pixels).

    Conditioning: ``tensors`` = ``input_ids`` (the instruction) and ``source`` (B, 3, 16, 16), the
    source image in [-1, 1]; ``negative`` = the empty instruction with the same source (guidance
    runs against "keep the image"). The source rows follow every row selection of the rollout, the
    recorded transitions and re-scoring."""

    name = "toy_edit"
    tasks = ("edit",)
    # its edits are best without guidance (scripts/check_toy_edit.py: guidance above 1 overshoots them)
    default_guidance = 1.0

    def __init__(self, model: ToyFlowModel, shift: float = 1.0) -> None:
        super().__init__(model, shift)
        from pipelines.toy import ToyTokenizer

        if model.config.condition_channels != model.config.in_channels:
            raise ValueError("the toy_edit adapter needs a ToyFlowModel with condition_channels == in_channels")
        self.tokenizer = ToyTokenizer(model.config.max_tokens, vocab=EDIT_VOCAB)

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, images: Sequence | None = None) -> Conditioning:
        """Instructions and their source images (``images``, one per instruction, or each
        :class:`~pipelines.base.Prompt`'s ``.image``: a path, PIL image or (3, H, W) tensor in [0, 1];
        a list of several takes its first) -> Conditioning."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        found = prompt_images(prompts, images)
        if found is None:
            raise ValueError("the toy_edit model edits an image: give each instruction its source image "
                             "(images=, or a JSONL prompt file with \"image\")")
        size = self.default_height
        source = torch.stack([load_image(image[0] if isinstance(image, (list, tuple)) else image, size, size)
                              for image in found]).to(self.device) * 2 - 1
        cond = super().encode(prompts, negative_prompt, guidance_scale)
        cond.tensors["source"] = source
        if cond.negative is not None:
            cond.negative["source"] = source
        return cond

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        source = tensors["source"].to(x.device, x.dtype)
        return self.denoiser(x, t.to(x.device), tensors["input_ids"].to(x.device), condition=source)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "ToyEditAdapter":
        return load_toy_edit_adapter(path, device=device, dtype=dtype, **kwargs)


def load_toy_edit_adapter(path: str | Path | None = None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, shift: float = 1.0) -> ToyEditAdapter:
    """A :class:`ToyEditAdapter` over the shipped weights (``pipelines/assets/toy_edit_flow``) or ``path``."""
    from pipelines.toy import load_toy_model

    path = Path(path) if path is not None else TOY_EDIT_WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy edit model at {path} (train one with scripts/train_toy_edit.py)")
    return ToyEditAdapter(load_toy_model(path, device=device, dtype=dtype), shift=shift)
