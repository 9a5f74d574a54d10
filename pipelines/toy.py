"""The embedded default model: a small text-conditioned flow-matching model of coloured digits.

Everything here runs on a CPU in seconds, so the whole alignment stack (rollouts, rewards, LoRA
training, the reference policy) can be exercised without downloading anything:

* :class:`ToyTokenizer` -- a fixed word-level vocabulary for prompts such as ``"a red digit 7"``
  or ``"the number three in blue"``; the empty prompt is the unconditional prompt (all padding).
* :class:`ToyFlowModel` -- a ~1.3M-parameter pixel-space UNet (3 x 16 x 16 images in [-1, 1]) that
  predicts the flow-matching velocity ``v = eps - x0`` (``x_sigma = (1 - sigma) x0 + sigma eps``).
  Its attention layers use diffusers' names (``to_q``, ``to_k``, ``to_v``, ``to_out.0``), so the
  adapter's default LoRA targets apply.
* :class:`ToyAdapter` -- the :class:`~pipelines.base.ModelAdapter` over it, and
  :func:`load_toy_adapter`, which loads the weights shipped in ``pipelines/assets/toy_flow``.
* The palette / number words shared with the digit reward (``rewards.digit_classifier``) and the
  coloured-digit data set both training scripts use (:func:`colour_digits`, :func:`digit_split`).

The weights are produced by ``scripts/train_toy.py``.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from pipelines.base import Conditioning, ModelAdapter, Schedule

# --- prompt vocabulary and palette (the single source for the model, the data and the rewards) ---

#: named colours of the toy data set, RGB in [0, 1]
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.15, 0.1),
    "green": (0.1, 0.9, 0.15),
    "blue": (0.15, 0.3, 1.0),
    "yellow": (1.0, 0.95, 0.1),
    "magenta": (1.0, 0.1, 0.9),
    "cyan": (0.1, 0.95, 1.0),
    "white": (1.0, 1.0, 1.0),
    "orange": (1.0, 0.55, 0.05),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
#: number words, index = digit
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
                                 "nine")
#: every word a prompt may contain -> digit
DIGIT_WORDS: dict[str, int] = {**{str(d): d for d in range(10)}, **{w: d for d, w in enumerate(NUMBER_WORDS)}}

PAD, UNK = "<pad>", "<unk>"
#: the fixed vocabulary; ids are positions in this tuple (never reorder: the weights depend on it)
VOCAB: tuple[str, ...] = (
    PAD, UNK,
    "a", "an", "the", "digit", "number", "of", "in", "handwritten", "written", "image", "picture",
    "drawing", "coloured", "colored", "on", "black", "background", "with", "and", "is", "it",
    *[str(d) for d in range(10)],
    *NUMBER_WORDS,
    *COLOURS,
)
#: prompt templates of the training data; ``{d}`` is the digit (numeral or word), ``{c}`` the colour
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a {c} digit {d}",
    "a {c} {d}",
    "the digit {d} in {c}",
    "a {c} number {d}",
    "{c} {d}",
    "the number {d} in {c}",
    "a handwritten {c} digit {d}",
    "an image of a {c} {d}",
    "a picture of the digit {d} in {c}",
    "a drawing of a {c} number {d} on a black background",
    "{d} written in {c}",
)


def toy_prompt(digit: int, colour: str, template: int = 0, word: bool = False) -> str:
    """A prompt of the training distribution, e.g. ``toy_prompt(7, "red") == "a red digit 7"``."""
    d = NUMBER_WORDS[digit] if word else str(digit)
    return PROMPT_TEMPLATES[template].format(d=d, c=colour)


class ToyTokenizer:
    """Word-level tokenizer over :data:`VOCAB` (or ``vocab``): lowercase, split on non-alphanumerics, unknown words
    map to ``<unk>``, sequences are padded / truncated to ``max_length`` with ``<pad>`` (id 0)."""

    def __init__(self, max_length: int = 12, vocab: Sequence[str] | None = None) -> None:
        self.max_length = max_length
        self.vocab = tuple(vocab or VOCAB)
        self.word_to_id = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id = self.word_to_id[PAD]
        self.unk_id = self.word_to_id[UNK]

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(prompt: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", prompt.lower())

    def ids(self, prompt: str) -> list[int]:
        words = self.split(prompt)[: self.max_length]
        ids = [self.word_to_id.get(w, self.unk_id) for w in words]
        return ids + [self.pad_id] * (self.max_length - len(ids))

    def __call__(self, prompts: str | Sequence[str]) -> Tensor:
        """Prompts -> LongTensor (B, max_length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        return torch.tensor([self.ids(p) for p in prompts], dtype=torch.long).reshape(len(prompts),
                                                                                       self.max_length)

    def decode(self, ids: Tensor | Sequence[int]) -> str:
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return " ".join(self.vocab[i] for i in ids if i != self.pad_id)


# --- the coloured-digit data set ----------------------------------------------------------------

def digit_split(seed: int = 0, test_fraction: float = 0.2):
    """scikit-learn's ``load_digits`` split into (train_images, train_labels, test_images, test_labels);
    images are float tensors (N, 8, 8) in [0, 1]. The split is fixed by ``seed``; the toy model and the
    digit classifier are trained on the train part only."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(labels), generator=g)
    n_test = int(round(len(labels) * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    return images[train], labels[train], images[test], labels[test]


def palette_tensor() -> Tensor:
    """(len(COLOURS), 3) RGB of the palette, in the order of :data:`COLOURS`."""
    return torch.tensor([PALETTE[c] for c in COLOURS], dtype=torch.float32)


def colour_digits(images: Tensor, colour_ids: Tensor, size: int = 16, shift: int = 0,
                  generator: torch.Generator | None = None) -> Tensor:
    """8x8 grey digits (N, 8, 8) in [0, 1] -> coloured images (N, 3, size, size) in [0, 1]: bilinear
    upscaling, strokes in the palette colour ``colour_ids``, black background; ``shift`` > 0 moves
    each image by a random offset of at most ``shift`` pixels (zero fill)."""
    x = F.interpolate(images[:, None], size=(size, size), mode="bilinear", align_corners=False)
    x = x.clamp(0, 1)
    if shift > 0:
        n = x.shape[0]
        pad = F.pad(x, (shift, shift, shift, shift))
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator)
        rows = dy[:, None] + torch.arange(size)[None]          # (N, size)
        cols = dx[:, None] + torch.arange(size)[None]
        x = pad[torch.arange(n)[:, None, None], 0, rows[:, :, None], cols[:, None, :]][:, None]
    return x * palette_tensor()[colour_ids][:, :, None, None]


# --- the network ---------------------------------------------------------------------------------

def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of ``t`` (B,) -- timesteps in sigma * 1000 units."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with diffusers' projection names (``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``); cross-attention when ``context_dim`` is given."""

    def __init__(self, dim: int, heads: int = 4, context_dim: int | None = None) -> None:
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        h = self.heads
        q = self.to_q(x).view(b, n, h, d // h).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, d // h).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.to_out[1](self.to_out[0](out))


class TextEncoder(nn.Module):
    """Token embeddings + one transformer block. A learned register token is always present (so the
    all-padding unconditional prompt still has a key); its output is the pooled prompt vector."""

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, heads: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(1, max_tokens + 1, dim))
        self.register = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.norm_out = nn.LayerNorm(dim)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.register, std=0.02)

    def forward(self, input_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n = input_ids.shape
        x = torch.cat([self.register.expand(b, -1, -1), self.embed(input_ids)], dim=1) + self.pos[:, : n + 1]
        mask = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=input_ids.device), input_ids != 0], dim=1)
        x = x + self.attn(self.norm1(x), mask=mask)
        x = x + self.mlp(self.norm2(x))
        x = self.norm_out(x)
        return x, mask, x[:, 0]


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with FiLM (scale, shift) from the embedding."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(8, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(8, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Spatial self-attention (optional) + cross-attention to the prompt tokens + MLP."""

    def __init__(self, ch: int, context_dim: int, heads: int, self_attn: bool = True) -> None:
        super().__init__()
        self.norm_in = nn.GroupNorm(8, ch)
        self.norm1 = nn.LayerNorm(ch) if self_attn else None
        self.attn1 = Attention(ch, heads) if self_attn else None
        self.norm2 = nn.LayerNorm(ch)
        self.attn2 = Attention(ch, heads, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(ch)
        self.ff = nn.Sequential(nn.Linear(ch, 2 * ch), nn.GELU(), nn.Linear(2 * ch, ch))

    def forward(self, x: Tensor, context: Tensor, mask: Tensor) -> Tensor:
        b, c, hgt, wdt = x.shape
        h = self.norm_in(x).flatten(2).transpose(1, 2)
        if self.attn1 is not None:
            h = h + self.attn1(self.norm1(h))
        h = h + self.attn2(self.norm2(h), context, mask)
        h = h + self.ff(self.norm3(h))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wdt)


class ToyFlowModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Pixel-space text-to-image flow model: a two-level UNet over (B, 3, S, S) images in [-1, 1].

    ``forward(sample, timestep, input_ids)`` -> velocity (B, 3, S, S); ``timestep`` (B,) is sigma * 1000
    and ``input_ids`` (B, L) come from :class:`ToyTokenizer`. The embedding that drives every FiLM layer
    is time MLP + projected pooled prompt; the 8x8 and 4x4 levels also cross-attend to the prompt tokens.
    ``condition_channels`` > 0 makes it image-conditioned (the editing toy, ``pipelines.toy_edit``):
    ``condition`` (B, condition_channels, S, S) is concatenated to ``sample`` along the channels.
    """

    _supports_gradient_checkpointing = False
    #: the units FSDP shards (run.fully_shard) and device maps keep whole
    _no_split_modules = ["ResBlock", "AttnBlock"]

    @register_to_config
    def __init__(self, sample_size: int = 16, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128),
                 text_dim: int = 128, emb_dim: int = 128, heads: int = 4, vocab_size: int = len(VOCAB),
                 max_tokens: int = 12, condition_channels: int = 0) -> None:
        super().__init__()
        c0, c1, c2 = channels
        self.text = TextEncoder(vocab_size, max_tokens, text_dim, heads)
        self.time_mlp = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels + condition_channels, c0, 3, padding=1)
        # down: S -> S/2 -> S/4
        self.down0 = ResBlock(c0, c0, emb_dim)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.down1_attn = AttnBlock(c1, text_dim, heads, self_attn=False)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        # middle at S/4
        self.mid1 = ResBlock(c2, c2, emb_dim)
        self.mid_attn = AttnBlock(c2, text_dim, heads, self_attn=True)
        # up: S/4 -> S/2 -> S
        self.unpool1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(2 * c1, c1, emb_dim)
        self.up1_attn = AttnBlock(c1, text_dim, heads, self_attn=False)
        self.unpool0 = nn.Conv2d(c1, c0, 3, padding=1)
        self.up0 = ResBlock(2 * c0, c0, emb_dim)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample: Tensor, timestep: Tensor, input_ids: Tensor, condition: Tensor | None = None) -> Tensor:
        if (condition is None) != (self.config.condition_channels == 0):
            raise ValueError(f"this model takes {self.config.condition_channels} condition channels, got "
                             f"{'none' if condition is None else tuple(condition.shape)}")
        tokens, mask, pooled = self.text(input_ids)
        t_emb = timestep_embedding(timestep.reshape(-1).expand(sample.shape[0]), self.config.text_dim)
        emb = F.silu(self.time_mlp(t_emb.to(sample.dtype)) + self.text_proj(pooled))

        h0 = self.down0(self.conv_in(sample if condition is None else torch.cat([sample, condition], 1)), emb)
        h1 = self.down1_attn(self.down1(self.pool0(h0), emb), tokens, mask)
        h = self.mid_attn(self.mid1(self.pool1(h1), emb), tokens, mask)
        h = self.unpool1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up1_attn(self.up1(torch.cat([h, h1], dim=1), emb), tokens, mask)
        h = self.unpool0(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# --- the adapter ---------------------------------------------------------------------------------

#: directory of the shipped weights (written by ``scripts/train_toy.py``)
TOY_WEIGHTS_DIR = Path(__file__).resolve().parent / "assets" / "toy_flow"


def flow_sigmas(num_steps: int, shift: float = 1.0) -> Tensor:
    """``num_steps + 1`` sigmas from 1 down to 0 (float32), optionally shifted towards the noise end:
    ``sigma' = shift * s / (1 + (shift - 1) * s)``."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    s = shift * s / (1 + (shift - 1) * s)
    return s.to(torch.float32)


class ToyAdapter(ModelAdapter):
    """:class:`ModelAdapter` over :class:`ToyFlowModel` (3 x 16 x 16 pixels, no VAE)."""

    name = "toy"
    prediction_type = "flow"
    default_steps = 10
    default_guidance = 3.0
    default_height = 16
    default_width = 16
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, model: ToyFlowModel, shift: float = 1.0) -> None:
        super().__init__()
        self.denoiser = model
        self.tokenizer = ToyTokenizer(model.config.max_tokens)
        self.shift = shift
        size = model.config.sample_size
        self.default_height = self.default_width = size

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        guidance_scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        ids = self.tokenizer(prompts).to(self.device)
        negative = None
        if guidance_scale != 1.0:
            if negative_prompt is None:
                negative_prompt = ""
            negs = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
            if len(negs) != len(prompts):
                raise ValueError(f"{len(negs)} negative prompts for {len(prompts)} prompts")
            negative = {"input_ids": self.tokenizer(negs).to(self.device)}
        return Conditioning(tensors={"input_ids": ids}, negative=negative, guidance_scale=guidance_scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        return self.denoiser(x, t.to(x.device), tensors["input_ids"].to(x.device))

    def decode(self, latents: Tensor) -> Tensor:
        return ((latents.float() + 1) / 2).clamp(0, 1)

    def encode_images(self, images: Tensor) -> Tensor:
        """The toy model works in pixel space: latents = 2 x - 1 (the exact inverse of decode)."""
        return (images.float() * 2 - 1).to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        sigmas = flow_sigmas(num_steps, self.shift).to(self.device)
        return Schedule(timesteps=sigmas[:-1] * 1000, levels=sigmas, kind="flow")

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        return (self.base_denoiser.config.in_channels, height or self.default_height, width or self.default_width)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "ToyAdapter":
        return load_toy_adapter(path, device=device, dtype=dtype, **kwargs)


def load_toy_model(path: str | Path | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> ToyFlowModel:
    """The shipped :class:`ToyFlowModel` (or one saved with ``save_pretrained`` at ``path``), in eval mode."""
    path = Path(path) if path is not None else TOY_WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy model at {path} (train one with scripts/train_toy.py)")
    model = ToyFlowModel.from_pretrained(str(path), use_safetensors=True, torch_dtype=dtype)
    return model.to(device).eval()


def load_toy_adapter(path: str | Path | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, shift: float = 1.0) -> ToyAdapter:
    """A :class:`ToyAdapter` over the shipped weights (``pipelines/assets/toy_flow``) or ``path``."""
    return ToyAdapter(load_toy_model(path, device=device, dtype=dtype), shift=shift)
