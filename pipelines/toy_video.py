"""The embedded video default: a small text-to-video flow model of coloured digits that move.

Videos of 8 frames, 3 x 16 x 16 pixels, in the (B, C, F, H, W) latent layout of the Wan adapter (the
toy works in pixel space: latents = 2 x - 1, decoded to (B, F, 3, H, W) in [0, 1] like every video
adapter). A digit of the scikit-learn set, drawn 10 x 10 in a palette colour, crosses the canvas in
a direction: prompts such as ``"a red digit 7 moving left"``.

* :func:`moving_digits` -- the data: 8 x 8 digits -> videos of the digit moving ``left``, ``right``,
  ``up`` or ``down`` (6 pixels over the clip, sub-pixel steps), with a small random offset across.
* :class:`ToyVideoFlowModel` -- the image toy's UNet (its blocks are shared with ``pipelines.toy``)
  run on every frame, with a frame-index embedding in each block's FiLM and self-attention across
  frames at the 8 x 8 and 4 x 4 levels (``to_q`` / ``to_k`` / ``to_v`` / ``to_out.0``, so the LoRA targets apply).
* :class:`ToyVideoAdapter` (``--model toy_video``) and :func:`load_toy_video_adapter`, over the
  weights in ``pipelines/assets/toy_video_flow`` written by ``scripts/train_toy_video.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from pipelines.toy import (VOCAB, Attention, AttnBlock, ResBlock, TextEncoder, ToyAdapter, colour_digits,
                           timestep_embedding)

#: directions of motion, and the unit (dx, dy) of each in image coordinates (y grows downward)
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
#: the image vocabulary with the motion words appended (existing ids unchanged)
VIDEO_VOCAB: tuple[str, ...] = (*VOCAB, "moving", "going", "to", "left", "right", "up", "down")
NUM_FRAMES, CANVAS, DIGIT_SIZE = 8, 32, 16
#: pixels the digit travels over a clip
TRAVEL = CANVAS - DIGIT_SIZE
TOY_VIDEO_WEIGHTS_DIR = Path(__file__).resolve().parent / "assets" / "toy_video_flow"


def video_prompt(digit: int, colour: str, direction: str) -> str:
    """``video_prompt(7, "red", "left") == "a red digit 7 moving left"``."""
    return f"a {colour} digit {digit} moving {direction}"


def parse_direction(prompt: str) -> str | None:
    """The direction a prompt asks for (the first direction word), or None."""
    from pipelines.toy import ToyTokenizer

    return next((w for w in ToyTokenizer.split(prompt) if w in DIRECTIONS), None)


def moving_digits(images: Tensor, colour_ids: Tensor, directions: Sequence[str], frames: int = NUM_FRAMES,
                  canvas: int = CANVAS, digit_size: int = DIGIT_SIZE, generator: torch.Generator | None = None,
                  jitter: float = 1.0) -> Tensor:
    """8 x 8 grey digits (N, 8, 8) -> videos (N, frames, 3, canvas, canvas) in [0, 1]: the digit drawn
    ``digit_size`` pixels wide in its palette colour, its top-left corner moving linearly from one
    side of the canvas to the other in ``directions[i]`` (sub-pixel, bilinear), centred across the
    motion with a uniform random offset of at most ``jitter`` pixels."""
    n = images.shape[0]
    sprites = colour_digits(images, colour_ids, size=digit_size)  # (N, 3, d, d)
    travel = canvas - digit_size
    offset = (torch.rand(n, generator=generator) * 2 - 1) * jitter + travel / 2
    t = torch.linspace(0, 1, frames)
    xs, ys = torch.empty(n, frames), torch.empty(n, frames)
    for i, name in enumerate(directions):
        dx, dy = DIRECTIONS[name]
        along = (t if (dx + dy) > 0 else 1 - t) * travel
        xs[i], ys[i] = (along, offset[i].expand(frames)) if dx else (offset[i].expand(frames), along)
    # place the sprite at (x, y) with an affine sampling grid: output pixel p reads sprite pixel p - (x, y)
    theta = torch.zeros(n * frames, 2, 3)
    scale = canvas / digit_size
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    # normalised coordinates (align_corners=False): a shift of s pixels on the canvas is 2 s / d in the sprite
    theta[:, 0, 2] = scale - 1 - 2 * xs.reshape(-1) / digit_size
    theta[:, 1, 2] = scale - 1 - 2 * ys.reshape(-1) / digit_size
    grid = F.affine_grid(theta, (n * frames, 3, canvas, canvas), align_corners=False)
    video = F.grid_sample(sprites.repeat_interleave(frames, 0), grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False)
    return video.reshape(n, frames, 3, canvas, canvas).clamp(0, 1)


class TemporalAttention(nn.Module):
    """Self-attention across the frames at every spatial position, with a learned frame-position
    embedding; the output projection starts at zero (the block starts as the identity)."""

    def __init__(self, ch: int, heads: int, max_frames: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(ch)
        self.pos = nn.Parameter(torch.zeros(1, max_frames, ch))
        self.attn = Attention(ch, heads)
        nn.init.normal_(self.pos, std=0.02)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, h: Tensor, frames: int) -> Tensor:
        bf, c, hgt, wdt = h.shape
        x = h.reshape(bf // frames, frames, c, hgt, wdt).permute(0, 3, 4, 1, 2).reshape(-1, frames, c)
        x = x + self.attn(self.norm(x + self.pos[:, :frames]))
        return x.reshape(bf // frames, hgt, wdt, frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, hgt, wdt)


class ToyVideoFlowModel(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """Pixel-space text-to-video flow model over (B, 3, F, S, S) videos in [-1, 1].

    ``forward(sample, timestep, input_ids)`` -> velocity of the same shape; ``timestep`` (B,) is
    sigma * 1000. Every frame runs through the image toy's two-level UNet (FiLM embedding = time +
    pooled prompt + frame index; cross-attention to the prompt at 8 x 8 and 4 x 4) with temporal
    self-attention at the 8 x 8 and 4 x 4 levels."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, sample_size: int = CANVAS, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 96),
                 text_dim: int = 96, emb_dim: int = 128, heads: int = 4, vocab_size: int = len(VIDEO_VOCAB),
                 max_tokens: int = 12, max_frames: int = 16, patch_size: int = 2) -> None:
        super().__init__()
        c0, c1, c2 = channels
        patch_channels = in_channels * patch_size * patch_size
        self.text = TextEncoder(vocab_size, max_tokens, text_dim, heads)
        self.time_mlp = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.text_proj = nn.Sequential(nn.Linear(text_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.frame_embed = nn.Embedding(max_frames, emb_dim)
        self.conv_in = nn.Conv2d(patch_channels, c0, 3, padding=1)
        self.down0 = ResBlock(c0, c0, emb_dim)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = ResBlock(c1, c1, emb_dim)
        self.down1_attn = AttnBlock(c1, text_dim, heads, self_attn=False)
        self.down1_time = TemporalAttention(c1, heads, max_frames)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid1 = ResBlock(c2, c2, emb_dim)
        self.mid_attn = AttnBlock(c2, text_dim, heads, self_attn=True)
        self.mid_time = TemporalAttention(c2, heads, max_frames)
        self.unpool1 = nn.Conv2d(c2, c1, 3, padding=1)
        self.up1 = ResBlock(2 * c1, c1, emb_dim)
        self.up1_attn = AttnBlock(c1, text_dim, heads, self_attn=False)
        self.up1_time = TemporalAttention(c1, heads, max_frames)
        self.unpool0 = nn.Conv2d(c1, c0, 3, padding=1)
        self.up0 = ResBlock(2 * c0, c0, emb_dim)
        self.norm_out = nn.GroupNorm(8, c0)
        self.conv_out = nn.Conv2d(c0, patch_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, sample: Tensor, timestep: Tensor, input_ids: Tensor) -> Tensor:
        b, c, frames, hgt, wdt = sample.shape
        tokens, mask, pooled = self.text(input_ids)
        t_emb = timestep_embedding(timestep.reshape(-1).expand(b), self.config.text_dim)
        emb = self.time_mlp(t_emb.to(sample.dtype)) + self.text_proj(pooled)  # (B, E)
        emb = F.silu(emb[:, None] + self.frame_embed.weight[None, :frames]).flatten(0, 1)  # (B F, E)
        tokens, mask = tokens.repeat_interleave(frames, 0), mask.repeat_interleave(frames, 0)

        patch = self.config.patch_size
        x = F.pixel_unshuffle(sample.permute(0, 2, 1, 3, 4).flatten(0, 1), patch)  # (B F, C p p, H / p, W / p)
        h0 = self.down0(self.conv_in(x), emb)
        h1 = self.down1_time(self.down1_attn(self.down1(self.pool0(h0), emb), tokens, mask), frames)
        h = self.mid_time(self.mid_attn(self.mid1(self.pool1(h1), emb), tokens, mask), frames)
        h = self.unpool1(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up1_time(self.up1_attn(self.up1(torch.cat([h, h1], dim=1), emb), tokens, mask), frames)
        h = self.unpool0(F.interpolate(h, scale_factor=2, mode="nearest"))
        h = self.up0(torch.cat([h, h0], dim=1), emb)
        out = F.pixel_shuffle(self.conv_out(F.silu(self.norm_out(h))), patch)
        return out.reshape(b, frames, c, hgt, wdt).permute(0, 2, 1, 3, 4)


class ToyVideoAdapter(ToyAdapter):
    """:class:`~pipelines.toy.ToyAdapter` for :class:`ToyVideoFlowModel`: the same tokenizer (with the
    motion words), schedule and CFG; latents (B, 3, F, 16, 16), videos (B, F, 3, 16, 16)."""

    name = "toy_video"
    tasks = ("t2v",)
    default_num_frames = NUM_FRAMES

    def __init__(self, model: ToyVideoFlowModel, shift: float = 1.0) -> None:
        super().__init__(model, shift=shift)
        from pipelines.toy import ToyTokenizer

        self.tokenizer = ToyTokenizer(model.config.max_tokens, vocab=VIDEO_VOCAB)

    def decode(self, latents: Tensor) -> Tensor:
        return super().decode(latents).permute(0, 2, 1, 3, 4)

    def encode_images(self, images: Tensor) -> Tensor:
        """Videos (B, F, 3, H, W) in [0, 1] -> latents (B, 3, F, H, W) = 2 x - 1 (the inverse of decode)."""
        if images.ndim != 5:
            raise ValueError(f"toy_video encodes videos (B, F, 3, H, W), got shape {tuple(images.shape)}")
        return super().encode_images(images.permute(0, 2, 1, 3, 4))

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        return (self.base_denoiser.config.in_channels, num_frames or self.default_num_frames,
                height or self.default_height, width or self.default_width)

    @classmethod
    def from_pretrained(cls, path: str | Path | None = None, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, **kwargs) -> "ToyVideoAdapter":
        return load_toy_video_adapter(path, device=device, dtype=dtype, **kwargs)


def load_toy_video_adapter(path: str | Path | None = None, device: str | torch.device = "cpu",
                           dtype: torch.dtype = torch.float32, shift: float = 1.0) -> ToyVideoAdapter:
    """A :class:`ToyVideoAdapter` over the shipped weights (``pipelines/assets/toy_video_flow``) or ``path``."""
    path = Path(path) if path is not None else TOY_VIDEO_WEIGHTS_DIR
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no toy video model at {path} (train one with scripts/train_toy_video.py)")
    model = ToyVideoFlowModel.from_pretrained(str(path), use_safetensors=True, torch_dtype=dtype)
    return ToyVideoAdapter(model.to(device).eval(), shift=shift)
