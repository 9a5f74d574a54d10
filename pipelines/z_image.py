"""Z-Image and Z-Image-Turbo (``ZImagePipeline`` with a ``ZImageTransformer2DModel``).

Latents are the FLUX VAE's (B, 16, H/8, W/8), unpacked: the transformer patchifies them itself.
It takes lists, one entry per sample: latents as (C, 1, h, w) and caption features of each
prompt's own length (the Qwen3 hidden states of its unpadded chat-templated tokens). The adapter's
:class:`~pipelines.base.Conditioning` needs batch-first tensors, so the features are right-padded
with zeros to a common length and travel with a per-row boolean ``prompt_mask``; :meth:`ZImageAdapter.forward`
cuts each row back to its own tokens before the call, so the transformer sees exactly what the
pipeline gives it.

Timesteps: the schedule's timesteps are ``t = sigma * 1000`` as for every flow adapter here; the
transformer takes ``(1000 - t) / 1000`` (1 = clean) and predicts ``x0 - noise``, so the pipeline
negates its output before the scheduler step; :meth:`ZImageAdapter.forward` does the same and returns
the velocity ``noise - x0`` (x_next = x + (sigma_next - sigma) v).

Guidance: the pipeline combines as ``c + s (c - u)`` with ``s = guidance_scale`` (CFG whenever
s > 0). Here, as for every adapter of this project, the guidance scale is the standard one of
``u + g (c - u)``, so ``g = s + 1``: the base model card's s = 4 is g = 5, and Turbo's s = 0 is
g = 1 (no CFG: one conditional call). A scale g < 1 has no pipeline counterpart and is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.diffusers_common import (flow_schedule, freeze_except, load_pipeline, negative_list, prompt_list,
                                        vae_encode)

#: the base model's settings: its model card samples 50 steps at the pipeline's guidance 4 (g = 5)
BASE_STEPS, BASE_GUIDANCE = 50, 5.0
#: Z-Image-Turbo's: 9 steps (its model card) without CFG (the pipeline's guidance 0, g = 1)
TURBO_STEPS, TURBO_GUIDANCE = 9, 1.0


def is_turbo_name(name: str | Path | None) -> bool:
    """Whether a checkpoint name or folder (hub name, local directory, hub cache snapshot path)
    names the distilled Z-Image-Turbo: a path component containing "turbo". The released base and
    Turbo folders have the same components and configs, so the name is all that tells them apart."""
    if not name:
        return False
    return any("turbo" in part.lower() for part in Path(str(name)).parts)


class ZImageAdapter(ModelAdapter):
    """Adapter over a ``ZImagePipeline`` (Z-Image base or the distilled Z-Image-Turbo).

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: Qwen3 tokens per prompt, chat template included (the pipeline's 512).
        distilled: True for Z-Image-Turbo (9 steps, no CFG), False for the base model (50 steps,
            CFG g = 5 against a negative prompt); None (default) decides from the checkpoint's name
            (:func:`is_turbo_name`), since nothing in the released folders tells them apart.
        cfg_normalization: the pipeline's ``cfg_normalization``: k > 0 caps the guided prediction's
            norm at k times the conditional one's, per sample (False / 0: off, the pipeline's default).
        cfg_truncation: the pipeline's ``cfg_truncation``; only values >= 1 (never truncating, the
            pipeline's default 1.0) or None are supported.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, D) (each prompt's features, zero-padded to
    the longest of the batch, negatives included) and ``prompt_mask`` (B, L) bool (True on a
    prompt's own tokens); ``negative`` likewise for CFG.
    """

    name = "z_image"
    #: u + g (c - u) with g = the pipeline's guidance_scale + 1: below 1 has no pipeline counterpart
    min_guidance_scale = 1.0
    prediction_type = "flow"
    tasks = ("t2i",)
    # the registry's default checkpoint, Tongyi-MAI/Z-Image-Turbo (the base model: see __init__)
    guidance_kind = "none"
    default_steps = TURBO_STEPS
    default_guidance = TURBO_GUIDANCE
    default_height = 1024
    default_width = 1024
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, *, max_sequence_length: int = 512, distilled: bool | None = None,
                 cfg_normalization: float | bool = False, cfg_truncation: float | None = 1.0) -> None:
        super().__init__()
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError("ZImageAdapter needs a ZImagePipeline with a transformer and a VAE")
        if cfg_truncation is not None and float(cfg_truncation) < 1.0:
            raise ValueError(f"cfg_truncation={cfg_truncation} (CFG switched off late in sampling) is not supported; "
                             "use 1.0 (the pipeline's default) or None")
        if float(cfg_normalization) < 0:
            raise ValueError(f"cfg_normalization must be >= 0 (0 / False: off), got {cfg_normalization}")
        if max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.max_sequence_length = int(max_sequence_length)
        self.cfg_normalization = float(cfg_normalization)
        if distilled is None:
            distilled = is_turbo_name(getattr(pipe, "name_or_path", None))
        self.distilled = bool(distilled)
        if not self.distilled:  # the undistilled base model guides against a negative prompt
            self.guidance_kind = "cfg"
            self.default_steps = BASE_STEPS
            self.default_guidance = BASE_GUIDANCE
        freeze_except(pipe, self.denoiser)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        distilled: bool | None = None, cfg_normalization: float | bool = False,
                        cfg_truncation: float | None = 1.0, **pipeline_kwargs: Any) -> "ZImageAdapter":
        """Load with ``ZImagePipeline.from_pretrained`` (hub name or local directory); ``distilled``
        None takes a checkpoint with "turbo" in a component of its name as Z-Image-Turbo."""
        from diffusers import ZImagePipeline

        pipe = load_pipeline(ZImagePipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=512 if max_sequence_length is None else max_sequence_length,
                   distilled=distilled, cfg_normalization=cfg_normalization, cfg_truncation=cfg_truncation)

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        """``guidance_scale`` g is the standard CFG scale (u + g (c - u)): the pipeline's
        ``guidance_scale`` plus one; g = 1 is no CFG."""
        prompts = [str(p) for p in prompt_list(prompts)]
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        if scale < 1.0:
            raise ValueError(f"guidance_scale {scale:g} < 1 has no Z-Image counterpart: the scale is u + g (c - u), "
                             "the pipeline's guidance_scale plus one (1: no CFG, as Turbo samples)")
        use_cfg = scale != 1.0
        negatives = negative_list(negative_prompt, len(prompts)) if use_cfg else None
        with torch.no_grad():
            # the pipeline rewrites the lists it is given (chat template): pass copies
            embeds, neg_embeds = self.pipe.encode_prompt(
                prompt=list(prompts), device=self.device, do_classifier_free_guidance=use_cfg,
                negative_prompt=list(negatives) if use_cfg else None, max_sequence_length=self.max_sequence_length,
            )
        length = max(len(e) for e in [*embeds, *neg_embeds])  # one length for [negative; positive]
        tensors = self._pad(embeds, length)
        negative = self._pad(neg_embeds, length) if use_cfg else None
        return Conditioning(tensors, negative, scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        dtype = self.dtype
        embeds, mask = tensors["prompt_embeds"].to(dtype), tensors["prompt_mask"].to(torch.bool)
        captions = [row[keep] for row, keep in zip(embeds, mask)]  # each prompt's own tokens
        latents = list(x.to(dtype).unsqueeze(2).unbind(0))  # (C, 1, h, w) per sample
        out = self.denoiser(latents, (1000 - t) / 1000, captions,
                            joint_attention_kwargs=extra.get("joint_attention_kwargs"), return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # the pipeline's sign: noise - x0

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """The pipeline's guidance, c + s (c - u) with s = g - 1, then (``cfg_normalization`` k > 0)
        the guided prediction scaled down, per sample, to at most k times the norm of c."""
        guided = cond + (scale - 1.0) * (cond - uncond)
        if self.cfg_normalization > 0:
            dims = tuple(range(1, guided.ndim))
            limit = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * self.cfg_normalization
            norm = torch.linalg.vector_norm(guided, dim=dims, keepdim=True)
            guided = torch.where(norm > limit, guided * (limit / norm), guided)
        return guided

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, 16, h, w) -> images (B, 3, H, W) in [0, 1]."""
        config = self.vae.config
        latents = latents.to(self.vae.device, self.vae.dtype)
        latents = latents / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents (B, 16, h, w) through the VAE (the inverse of
        :meth:`decode`'s shift and scaling)."""
        config = self.vae.config
        latents = (vae_encode(self.vae, images) - (config.shift_factor or 0.0)) * config.scaling_factor
        return latents.to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        """As ``ZImagePipeline``: linear sigmas 1 -> 1/T, shifted by the scheduler's static shift or,
        with dynamic shifting, by mu of the (h/2) * (w/2) image tokens."""
        from diffusers.pipelines.z_image.pipeline_z_image import calculate_shift, get_default_z_image_sigmas

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        scheduler = self.pipe.scheduler
        _, rows, cols = latent_shape or self.latent_shape()
        config = scheduler.config
        mu = calculate_shift((rows // 2) * (cols // 2), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        return flow_schedule(scheduler, num_steps, sigmas=get_default_z_image_sigmas(num_steps), mu=mu)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        height, width = height or self.default_height, width or self.default_width
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return (int(self.base_denoiser.config.in_channels), height // self.vae_scale_factor,
                width // self.vae_scale_factor)

    # --- helpers ----------------------------------------------------------------------------------
    @staticmethod
    def _pad(features: list[Tensor], length: int) -> dict[str, Tensor]:
        """Per-prompt features (L_i, D) -> ``prompt_embeds`` (B, length, D) zero-padded on the right
        and ``prompt_mask`` (B, length), True on each prompt's own L_i tokens."""
        first = features[0]
        embeds = first.new_zeros(len(features), length, first.shape[-1])
        mask = torch.zeros(len(features), length, dtype=torch.bool, device=first.device)
        for i, row in enumerate(features):
            embeds[i, :len(row)] = row
            mask[i, :len(row)] = True
        return {"prompt_embeds": embeds, "prompt_mask": mask}
