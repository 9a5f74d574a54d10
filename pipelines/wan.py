"""Wan 2.1 and Wan 2.2 video models (``WanPipeline`` with ``WanTransformer3DModel`` s and ``AutoencoderKLWan``).

Latents are (B, C, F', H/s, W/s) with F' = (F - 1) // 4 + 1 latent frames for F video frames and s the
VAE's spatial factor (8 for Wan 2.1 and Wan 2.2 A14B, 16 for the Wan 2.2 VAE of TI2V-5B); the models
predict the flow velocity with timesteps ``sigma * 1000``; CFG runs against a negative prompt;
``decode`` returns videos (B, F, 3, H, W) in [0, 1].

- ``wan`` (:class:`WanAdapter`): Wan 2.1 text-to-video, one transformer.
- ``wan22`` (:class:`Wan22Adapter`): Wan 2.2 A14B (two experts: ``transformer`` denoises the
  high-noise steps t >= ``boundary_ratio * 1000``, ``transformer_2`` the rest, each with its own CFG
  scale) and TI2V-5B (one transformer with per-token timesteps, ``expand_timesteps``: text-to-video,
  and image-to-video where the first latent frame is the encoded image).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule, _as_batch, load_image, prompt_images
from pipelines.diffusers_common import (flow_schedule, freeze_except, is_flow_scheduler, load_pipeline, negative_list,
                                        prompt_list, vae_encode)


class WanAdapter(ModelAdapter):
    """Adapter over a ``WanPipeline`` (Wan 2.1 T2V; a single transformer).

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: UMT5 tokens per prompt (the pipeline's default, 512).
        flow_shift: the schedule's shift when the pipeline's scheduler is not a flow-matching one
            (Wan's recommendation: 3.0 at 480p, 5.0 at 720p); ignored otherwise.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, 4096); ``negative`` likewise for CFG.
    The schedule comes from the pipeline's scheduler (UniPC with flow sigmas for the released
    checkpoints, or ``FlowMatchEulerDiscreteScheduler``): sigmas 1 -> 0, timesteps ``sigma * 1000``.
    """

    name = "wan"
    prediction_type = "flow"
    is_video = True
    tasks = ("t2v",)
    # Wan 2.1 T2V settings (480p)
    default_steps = 50
    default_guidance = 5.0
    default_height = 480
    default_width = 832
    default_num_frames = 81
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, *, max_sequence_length: int = 512, flow_shift: float = 3.0) -> None:
        super().__init__()
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError(f"{type(self).__name__} needs a WanPipeline with a transformer and a VAE")
        self._check_pipeline(pipe)
        self.pipe = pipe
        self.denoiser = self._build_denoiser(pipe)
        self.vae = pipe.vae
        self.max_sequence_length = max_sequence_length
        self.flow_shift = flow_shift
        self.temporal_factor = int(pipe.vae_scale_factor_temporal)
        self.spatial_factor = int(pipe.vae_scale_factor_spatial)
        self.patch_size = tuple(pipe.transformer.config.patch_size)
        self.latent_channels = int(pipe.transformer.config.in_channels)
        freeze_except(pipe, self.denoiser)

    def _check_pipeline(self, pipe) -> None:
        """Refuse the Wan 2.2 layouts (the ``wan22`` adapter's) with a one-line error."""
        config = getattr(pipe, "config", {})
        if config.get("boundary_ratio") is not None or getattr(pipe, "transformer_2", None) is not None:
            raise ValueError("a two-expert Wan 2.2 pipeline (transformer_2 / boundary_ratio): load it as 'wan22'")
        if config.get("expand_timesteps", False):
            raise ValueError("a Wan 2.2 TI2V pipeline (expand_timesteps): load it as 'wan22'")

    def _build_denoiser(self, pipe) -> torch.nn.Module:
        return pipe.transformer

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int = 512,
                        flow_shift: float = 3.0, **pipeline_kwargs: Any) -> "WanAdapter":
        """Load with ``WanPipeline.from_pretrained`` (hub name or local directory). Wan's reference
        setup keeps the VAE in float32 with a bfloat16 transformer: pass a float32
        ``vae=AutoencoderKLWan.from_pretrained(path, subfolder="vae")`` in ``pipeline_kwargs``."""
        from diffusers import WanPipeline

        pipe = load_pipeline(WanPipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, flow_shift=flow_shift)

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        with torch.no_grad():
            embeds, neg_embeds = self.pipe.encode_prompt(
                prompt=prompts, negative_prompt=negative_list(negative_prompt, len(prompts)) if use_cfg else None,
                do_classifier_free_guidance=use_cfg, num_videos_per_prompt=1,
                max_sequence_length=self.max_sequence_length, device=self.device,
            )
        negative = {"prompt_embeds": neg_embeds} if use_cfg else None
        return Conditioning({"prompt_embeds": embeds}, negative, scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        return self.denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype),
            attention_kwargs=extra.get("attention_kwargs"),
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, F', h, w) -> videos (B, F, 3, H, W) in [0, 1]."""
        latents = latents.to(self.vae.device, self.vae.dtype)
        mean, std = self._latent_stats(latents)
        video = self.vae.decode(latents * std + mean, return_dict=False)[0]  # (B, 3, F, H, W) in [-1, 1]
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Videos (B, F, 3, H, W) in [0, 1] (or images, as one-frame videos) -> latents (B, C, F', h, w)
        through the video VAE, normalised as :meth:`decode` expects."""
        videos = images[:, None] if images.ndim == 4 else images
        latents = vae_encode(self.vae, videos.permute(0, 2, 1, 3, 4))  # the VAE takes (B, 3, F, H, W)
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std).to(self.device)

    def _latent_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        """The VAE's per-channel latent mean and std, shaped (1, C, 1, 1, 1) like ``latents``."""
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean, device=latents.device, dtype=latents.dtype).view(shape)
        std = torch.tensor(config.latents_std, device=latents.device, dtype=latents.dtype).view(shape)
        return mean, std

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        scheduler = self.pipe.scheduler
        if not is_flow_scheduler(scheduler):
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=scheduler.config.get("num_train_timesteps", 1000), shift=self.flow_shift)
        return flow_schedule(scheduler, num_steps)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        height, width = height or self.default_height, width or self.default_width
        num_frames = num_frames or self.default_num_frames
        multiple_h = self.spatial_factor * self.patch_size[1]
        multiple_w = self.spatial_factor * self.patch_size[2]
        if height % multiple_h or width % multiple_w:
            raise ValueError(f"height and width must be multiples of ({multiple_h}, {multiple_w}), "
                             f"got {height}x{width}")
        if (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"num_frames - 1 must be a multiple of {self.temporal_factor}, got {num_frames}")
        latent_frames = (num_frames - 1) // self.temporal_factor + 1
        return (self.latent_channels, latent_frames, height // self.spatial_factor, width // self.spatial_factor)
