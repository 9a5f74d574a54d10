"""UNet latent diffusion: Stable Diffusion 1.x / 2.x (``StableDiffusionPipeline``) and SDXL
(``StableDiffusionXLPipeline``), both with a ``UNet2DConditionModel``.

These are DDPM-family models: the UNet predicts the noise (``prediction_type="epsilon"``) or the
velocity (``"v_prediction"``), read from the pipeline's scheduler config. Schedules are DDIM's
(``kind="ddpm"``): integer timesteps, descending, and ``levels`` = the cumulative alphas (alpha_bar)
at those timesteps followed by the final alpha_bar, which the DDIM / DDPO step kernels step between.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.diffusers_common import freeze_except, load_pipeline, negative_list, prompt_list, vae_encode


class _UNetAdapter(ModelAdapter):
    """What SD and SDXL share: the UNet, the DDIM schedule, VAE decoding."""

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class_name = ""
    #: ``from_pretrained`` keyword defaults (overridable by the caller)
    pipeline_defaults: dict[str, Any] = {}

    def __init__(self, pipe, *, clip_skip: int | None = None) -> None:
        super().__init__()
        if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError(f"{type(self).__name__} needs a {self.pipeline_class_name} with a UNet and a VAE")
        from diffusers import DDIMScheduler

        self.pipe = pipe
        self.denoiser = pipe.unet
        self.vae = pipe.vae
        self.clip_skip = clip_skip
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")
        self.prediction_type = prediction_type
        #: the DDIM scheduler the schedule comes from (built from the pipeline scheduler's config)
        self.ddim_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        if self.denoiser.config.get("time_cond_proj_dim") is not None:
            raise ValueError("UNets with a guidance embedding (time_cond_proj_dim, LCM) are not supported")
        self.default_height = self.default_width = int(self.denoiser.config.sample_size) * self.vae_scale_factor
        freeze_except(pipe, self.denoiser)

    @classmethod
    def _pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, clip_skip: int | None = None,
                        **pipeline_kwargs: Any):
        """Load with the pipeline class's ``from_pretrained`` (hub name or local directory)."""
        pipeline_kwargs = {**cls.pipeline_defaults, **pipeline_kwargs}
        pipe = load_pipeline(cls._pipeline_class(), path, torch_dtype=torch_dtype, device=device,
                             **pipeline_kwargs)
        return cls(pipe, clip_skip=clip_skip)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        """DDIM timesteps (the scheduler's spacing and offset) and alpha_bar at each of them, then
        the final alpha_bar (``final_alpha_cumprod``: 1 or alpha_bar_0 per ``set_alpha_to_one``).

        ``levels[i + 1]`` is alpha_bar at the *next listed* timestep; for "leading" and "trailing"
        spacing with T dividing the training steps this is exactly the ``t - 1000 // T`` that
        ``DDIMScheduler.step`` uses."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = self.ddim_scheduler
        scheduler.set_timesteps(num_steps)
        timesteps = scheduler.timesteps.detach().to("cpu").clone()
        alphas = scheduler.alphas_cumprod.to(torch.float32)
        final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).reshape(1)
        levels = torch.cat([alphas[timesteps.long()], final]).to(torch.float32)
        return Schedule(timesteps=timesteps, levels=levels, kind="ddpm")

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        height, width = height or self.default_height, width or self.default_width
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")
        return (int(self.base_denoiser.config.in_channels), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    def _unscale(self, latents: Tensor) -> Tensor:
        return latents / self.vae.config.scaling_factor

    def decode(self, latents: Tensor) -> Tensor:
        latents = self._unscale(latents.to(self.vae.device, self.vae.dtype))
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents through the VAE (the inverse of :meth:`decode`'s
        scaling)."""
        return self._scale(vae_encode(self.vae, images)).to(self.device)

    def _scale(self, latents: Tensor) -> Tensor:
        return latents * self.vae.config.scaling_factor


class SDAdapter(_UNetAdapter):
    """Adapter over a ``StableDiffusionPipeline`` (SD 1.x / 2.x).

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.unet``).
        clip_skip: passed to ``encode_prompt``.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, 77, D); ``negative`` likewise for CFG.
    Timesteps: the UNet's integer DDPM timesteps (0..999). Latents: (B, 4, H/8, W/8).
    """

    name = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    #: the NSFW checker plays no part in sampling or training: not loaded unless asked for
    pipeline_defaults = {"safety_checker": None, "requires_safety_checker": False}
    default_steps = 50
    default_guidance = 7.5
    default_height = 512
    default_width = 512

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        with torch.no_grad():
            embeds, neg_embeds = self.pipe.encode_prompt(
                prompts, self.device, 1, use_cfg,
                negative_prompt=negative_list(negative_prompt, len(prompts)) if use_cfg else None,
                clip_skip=self.clip_skip,
            )
        negative = {"prompt_embeds": neg_embeds} if use_cfg else None
        return Conditioning({"prompt_embeds": embeds}, negative, scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        return self.denoiser(
            x, t, encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype),
            cross_attention_kwargs=extra.get("cross_attention_kwargs"), return_dict=False,
        )[0]


class SDXLAdapter(_UNetAdapter):
    """Adapter over a ``StableDiffusionXLPipeline``.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, 77, 2048), ``text_embeds`` (the pooled
    embedding of the second encoder, B x 1280) and ``time_ids`` (B, 6: original size, crop corner,
    target size), all batch-first; ``negative`` likewise for CFG. ``encode`` takes the image size
    for the time ids (default: the model's native resolution). An empty negative prompt follows the
    pipeline's ``force_zeros_for_empty_prompt`` setting (zero negative embeddings for SDXL base).
    """

    name = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    default_steps = 50
    default_guidance = 5.0
    default_height = 1024
    default_width = 1024

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, height: int | None = None,
               width: int | None = None) -> Conditioning:
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        negatives = None
        if use_cfg and negative_prompt not in (None, ""):
            negatives = negative_list(negative_prompt, len(prompts))
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=use_cfg, negative_prompt=negatives, clip_skip=self.clip_skip,
            )
        size = (int(height or self.default_height), int(width or self.default_width))
        if self.pipe.text_encoder_2 is None:
            projection_dim = int(pooled.shape[-1])
        else:
            projection_dim = int(self.pipe.text_encoder_2.config.projection_dim)
        time_ids = self.pipe._get_add_time_ids(size, (0, 0), size, dtype=embeds.dtype,
                                               text_encoder_projection_dim=projection_dim)
        time_ids = time_ids.to(self.device).repeat(len(prompts), 1)
        tensors = {"prompt_embeds": embeds, "text_embeds": pooled, "time_ids": time_ids}
        negative = None
        if use_cfg:
            negative = {"prompt_embeds": neg_embeds, "text_embeds": neg_pooled, "time_ids": time_ids.clone()}
        return Conditioning(tensors, negative, scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        dtype = self.dtype
        added = {"text_embeds": tensors["text_embeds"].to(dtype), "time_ids": tensors["time_ids"].to(dtype)}
        return self.denoiser(
            x, t, encoder_hidden_states=tensors["prompt_embeds"].to(dtype), added_cond_kwargs=added,
            cross_attention_kwargs=extra.get("cross_attention_kwargs"), return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        # the SDXL VAE overflows in float16: as the pipeline does, decode in float32 (the VAE is
        # moved to float32 once and stays there)
        if self.vae.dtype == torch.float16 and self.vae.config.get("force_upcast", False):
            self.vae.to(torch.float32)
        return super().decode(latents)

    def _latent_stats(self, latents: Tensor) -> tuple[Tensor | float, Tensor | float]:
        """The VAE's per-channel latent mean and std (SDXL-family configs may give them), else 0, 1."""
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is None or std is None:
            return 0.0, 1.0
        shape = (1, -1, 1, 1)
        return (torch.tensor(mean, device=latents.device, dtype=latents.dtype).view(shape),
                torch.tensor(std, device=latents.device, dtype=latents.dtype).view(shape))

    def _scale(self, latents: Tensor) -> Tensor:
        mean, std = self._latent_stats(latents)
        return (latents - mean) * self.vae.config.scaling_factor / std

    def _unscale(self, latents: Tensor) -> Tensor:
        mean, std = self._latent_stats(latents)
        return latents * std / self.vae.config.scaling_factor + mean
