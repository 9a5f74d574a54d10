"""FLUX.1 (``FluxPipeline`` with a ``FluxTransformer2DModel``).

The latent the engine sees is FLUX's packed sequence: the (C, H/8, W/8) VAE latent cut into 2x2
patches, shape (B, (H/16) * (W/16), 4C). The step kernels are elementwise, so packing changes
nothing for them; :meth:`FluxAdapter.decode` unpacks before the VAE.

FLUX.1-dev is guidance-distilled: the guidance value is an input of the transformer (``guidance``),
not a second batch, so by default there is no classifier-free guidance (``negative=None``). "True"
CFG with a negative prompt is available through ``encode(..., true_cfg_scale=...)``.

Timesteps: like every flow adapter here, the schedule's timesteps are ``sigma * 1000``;
:meth:`FluxAdapter.forward` passes ``t / 1000`` to the transformer exactly as ``FluxPipeline`` does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.diffusers_common import (PackedLatentGrid, flow_schedule, freeze_except, load_pipeline, negative_list,
                                        prompt_list, vae_encode)


class FluxAdapter(PackedLatentGrid, ModelAdapter):
    """Adapter over a ``FluxPipeline``.

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: T5 tokens per prompt (512 for FLUX.1-dev, 256 for schnell by default).

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, 4096) and ``pooled_prompt_embeds``
    (B, 768); ``extra`` = ``guidance`` (the distilled guidance value, ``None`` for models without a
    guidance embedding), ``txt_ids`` (L, 3) and, when ``encode`` was given the image size,
    ``latent_grid`` = (H/16, W/16). ``negative`` is set only for true CFG.
    """

    name = "flux"
    prediction_type = "flow"
    guidance_kind = "embedded"
    # FLUX.1-dev settings (schnell: see __init__)
    default_steps = 28
    default_guidance = 3.5
    default_height = 1024
    default_width = 1024
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0",
                            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    text_encoder_names = ("text_encoder", "text_encoder_2")

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        super().__init__()
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError("FluxAdapter needs a FluxPipeline with a transformer and a VAE")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.guidance_embeds = bool(self.denoiser.config.guidance_embeds)
        if not self.guidance_embeds:  # FLUX.1-schnell: timestep-distilled, 4 steps, no guidance input
            self.default_steps = 4
            self.default_guidance = 0.0
        if max_sequence_length is None:
            max_sequence_length = 512 if self.guidance_embeds else 256
        self.max_sequence_length = max_sequence_length
        self.default_height = self.default_width = int(pipe.default_sample_size) * self.vae_scale_factor
        self._image_ids: dict[tuple, Tensor] = {}
        freeze_except(pipe, self.denoiser)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        **pipeline_kwargs: Any) -> "FluxAdapter":
        """Load with ``FluxPipeline.from_pretrained`` (hub name or local directory)."""
        from diffusers import FluxPipeline

        pipe = load_pipeline(FluxPipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length)

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, true_cfg_scale: float = 1.0,
               height: int | None = None, width: int | None = None) -> Conditioning:
        """``guidance_scale`` is FLUX's distilled guidance (the transformer's ``guidance`` input);
        ``true_cfg_scale`` > 1 adds real classifier-free guidance against ``negative_prompt``."""
        prompts = prompt_list(prompts)
        guidance = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = float(true_cfg_scale) != 1.0
        with torch.no_grad():
            embeds, pooled, text_ids = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                max_sequence_length=self.max_sequence_length,
            )
            negative = None
            if use_cfg:
                neg_embeds, neg_pooled, _ = self.pipe.encode_prompt(
                    prompt=negative_list(negative_prompt, len(prompts)), prompt_2=None, device=self.device,
                    num_images_per_prompt=1, max_sequence_length=self.max_sequence_length,
                )
                negative = {"prompt_embeds": neg_embeds, "pooled_prompt_embeds": neg_pooled}
        extra: dict = {"guidance": guidance if self.guidance_embeds else None, "txt_ids": text_ids}
        if height is not None or width is not None:
            extra["latent_grid"] = self._grid_of(height or self.default_height, width or self.default_width)
        return Conditioning({"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}, negative,
                            float(true_cfg_scale), extra)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        rows, cols = self._grid_for(x.shape[1], extra)
        return self.call_transformer(x, self.image_ids(rows, cols, x.device, x.dtype), t, tensors, extra)

    def call_transformer(self, hidden: Tensor, img_ids: Tensor, t: Tensor, tensors: dict[str, Tensor],
                         extra: dict) -> Tensor:
        """One transformer call on the packed tokens ``hidden`` with their positional ids, as
        ``FluxPipeline`` makes it (FLUX.1 Kontext appends its source tokens to ``hidden``)."""
        dtype, batch = self.dtype, hidden.shape[0]
        embeds = tensors["prompt_embeds"].to(dtype)
        txt_ids = extra.get("txt_ids")
        if txt_ids is None or txt_ids.shape[0] != embeds.shape[1]:
            txt_ids = torch.zeros(embeds.shape[1], 3, device=hidden.device, dtype=dtype)
        guidance = None
        if self.guidance_embeds:
            value = extra.get("guidance")
            value = self.default_guidance if value is None else value
            guidance = torch.full((batch,), float(value), device=hidden.device, dtype=torch.float32)
        return self.denoiser(
            hidden_states=hidden,
            timestep=t.to(hidden.dtype) / 1000,
            guidance=guidance,
            pooled_projections=tensors["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids.to(hidden.device),
            img_ids=img_ids,
            joint_attention_kwargs=extra.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Packed latents (B, seq, 4C) -> images (B, 3, H, W) in [0, 1]. The image size is the one
        given here, else the adapter's default size when its sequence length matches, else square;
        it depends on nothing an earlier call left behind."""
        rows, cols = self._grid_for(latents.shape[1], {}, height, width)
        scale = self.vae_scale_factor * 2
        config = self.vae.config
        latents = self.unpack(latents.to(self.vae.device, self.vae.dtype), rows * scale, cols * scale)
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        scheduler = self.pipe.scheduler
        seq_len = (latent_shape or self.latent_shape())[0]
        # as FluxPipeline: linear sigmas 1 -> 1/T, shifted by mu from the image sequence length
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        if scheduler.config.get("use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(
            seq_len, scheduler.config.get("base_image_seq_len", 256), scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15),
        )
        if sigmas is None:
            return flow_schedule(scheduler, num_steps, mu=mu)
        return flow_schedule(scheduler, num_steps, sigmas=sigmas, mu=mu)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        rows, cols = self._grid_of(height or self.default_height, width or self.default_width)
        return (rows * cols, int(self.base_denoiser.config.in_channels))

    # --- packing helpers --------------------------------------------------------------------------


    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> packed latents (B, seq, 4C) through the VAE (the inverse of
        :meth:`decode`'s scaling, shift and packing)."""
        config = self.vae.config
        latents = (vae_encode(self.vae, images) - (config.shift_factor or 0.0)) * config.scaling_factor
        return self.pack(latents).to(self.device)

    def image_ids(self, rows: int, cols: int, device, dtype) -> Tensor:
        """FLUX's (rows * cols, 3) positional ids of the packed image tokens (cached)."""
        key = (rows, cols, str(device), dtype)
        if key not in self._image_ids:
            self._image_ids[key] = self.pipe._prepare_latent_image_ids(1, rows, cols, device, dtype)
        return self._image_ids[key]

    def pack(self, latents: Tensor) -> Tensor:
        """(B, C, h, w) VAE latents -> (B, h/2 * w/2, 4C)."""
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def unpack(self, latents: Tensor, height: int, width: int) -> Tensor:
        """(B, seq, 4C) -> (B, C, H/8, W/8) for an image of ``height`` x ``width`` pixels."""
        return self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
