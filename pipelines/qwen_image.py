"""Qwen-Image (``QwenImagePipeline`` with a ``QwenImageTransformer2DModel`` and ``AutoencoderKLQwenImage``).

Latents: the engine sees Qwen-Image's packed sequence, like FLUX's: the (C, 1, H/8, W/8) VAE latent
(one frame) cut into 2x2 patches, shape (B, (H/16) * (W/16), 4C). The VAE latent is normalised per
channel: packed = (z - latents_mean) / latents_std; :meth:`QwenImageAdapter.decode` inverts it.

Text: the pipeline's own ``encode_prompt`` runs the Qwen2.5-VL encoder on the prompt inside its chat
template and drops the template's system-prompt tokens; prompts of one batch are padded to a common
length with ``prompt_embeds_mask`` zeros, which the transformer's joint attention masks out.

Guidance ("true CFG" against a negative prompt) is rescaled to the conditional prediction's norm over
the channel axis, as the pipeline does:

    comb = u + s (c - u),    out = comb * ||c|| / ||comb||

Schedule: linear sigmas 1 -> 1/T shifted by mu from the image sequence length (the released scheduler:
exponential time shift, dynamic shifting, terminal sigma 0.02); timesteps are ``sigma * 1000``, and
:meth:`QwenImageAdapter.forward` passes ``t / 1000`` to the transformer as the pipeline does.

Not covered: guidance-distilled transformers (``guidance_embeds=True``; diffusers gives them no guidance
embedding) and Qwen-Image 2.1 (``QwenImage21Pipeline``: another text encoder, transformer, VAE and
latent layout, and a text-length-dependent image position that padded CFG batches would change).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.diffusers_common import (PackedLatentGrid, flow_schedule, freeze_except, load_pipeline, negative_list,
                                        prompt_list, vae_encode)


def _pad_text(embeds: Tensor, mask: Tensor | None, length: int) -> tuple[Tensor, Tensor]:
    """(B, L, D) embeddings and their (B, L) mask (None: no padding) -> (B, length, D) and a (B, length)
    long mask, zeros appended: padded text keys are masked out of the transformer's attention."""
    batch, seq = embeds.shape[:2]
    if mask is None:
        mask = torch.ones(batch, seq, dtype=torch.long, device=embeds.device)
    if length > seq:
        embeds = torch.cat([embeds, embeds.new_zeros(batch, length - seq, embeds.shape[2])], dim=1)
        mask = torch.cat([mask, mask.new_zeros(batch, length - seq)], dim=1)
    return embeds, mask.long()


class QwenImageAdapter(PackedLatentGrid, ModelAdapter):
    """Adapter over a ``QwenImagePipeline`` (Qwen-Image text-to-image).

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: prompt tokens kept after the template prefix (the pipeline's default, 512).

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, 3584) and ``prompt_embeds_mask`` (B, L), 1 for
    real tokens and 0 for padding; ``negative`` likewise, padded to the same L, for true CFG;
    ``extra`` = ``text_unpadded`` (True when no row has padding, then the transformer gets no mask, as
    the pipeline passes none) and, when ``encode`` was given the image size, ``latent_grid`` =
    (H/16, W/16). The guidance scale is the pipeline's ``true_cfg_scale``.
    """

    name = "qwen_image"
    prediction_type = "flow"
    tasks = ("t2i",)
    guidance_kind = "cfg_rescaled"
    # the pipeline's defaults (50 steps, true_cfg_scale 4.0, 1024 px)
    default_steps = 50
    default_guidance = 4.0
    default_height = 1024
    default_width = 1024
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0",
                            "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    text_encoder_names = ("text_encoder",)

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        super().__init__()
        from diffusers import QwenImageTransformer2DModel

        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError("QwenImageAdapter needs a QwenImagePipeline with a transformer and a VAE")
        if not isinstance(pipe.transformer, QwenImageTransformer2DModel):
            raise TypeError(f"QwenImageAdapter needs a QwenImageTransformer2DModel, got "
                            f"{type(pipe.transformer).__name__}")
        if pipe.transformer.config.get("guidance_embeds", False):
            # diffusers builds no guidance embedding for it, and its forward fails when given a guidance value
            raise ValueError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported: "
                             "diffusers' QwenImageTransformer2DModel has no guidance embedding")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.max_sequence_length = 512 if max_sequence_length is None else int(max_sequence_length)
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.default_height = self.default_width = int(pipe.default_sample_size) * self.vae_scale_factor
        freeze_except(pipe, self.denoiser)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        **pipeline_kwargs: Any) -> "QwenImageAdapter":
        """Load with ``QwenImagePipeline.from_pretrained`` (hub name or local directory)."""
        from diffusers import QwenImagePipeline

        try:
            index = QwenImagePipeline.load_config(path, local_files_only=pipeline_kwargs.get("local_files_only", False))
        except Exception:  # noqa: BLE001 - from_pretrained below reports the real problem
            index = {}
        if index.get("_class_name") == "QwenImage21Pipeline":
            raise ValueError(f"{path} is a Qwen-Image 2.1 checkpoint (QwenImage21Pipeline): the qwen_image adapter "
                             "covers Qwen-Image (QwenImagePipeline) only")
        pipe = load_pipeline(QwenImagePipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length)

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, height: int | None = None,
               width: int | None = None) -> Conditioning:
        """``guidance_scale`` is the pipeline's ``true_cfg_scale`` (default 4.0): true CFG against
        ``negative_prompt`` with the norm rescale; 1 means none (a single branch; the pipeline also
        skips CFG below 1, here any other scale guides). Qwen's own examples use the negative prompt " "."""
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        with torch.no_grad():
            embeds, mask = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                   max_sequence_length=self.max_sequence_length)
            neg_embeds = neg_mask = None
            if use_cfg:
                neg_embeds, neg_mask = self.pipe.encode_prompt(
                    prompt=negative_list(negative_prompt, len(prompts)), device=self.device,
                    num_images_per_prompt=1, max_sequence_length=self.max_sequence_length)
        # the pipeline returns no mask when no prompt of the batch is padded
        unpadded = mask is None and (neg_embeds is None or (neg_mask is None and
                                                            neg_embeds.shape[1] == embeds.shape[1]))
        length = max(embeds.shape[1], 0 if neg_embeds is None else neg_embeds.shape[1])
        embeds, mask = _pad_text(embeds, mask, length)
        negative = None
        if use_cfg:
            neg_embeds, neg_mask = _pad_text(neg_embeds, neg_mask, length)
            negative = {"prompt_embeds": neg_embeds, "prompt_embeds_mask": neg_mask}
        extra: dict = {"text_unpadded": unpadded}
        if height is not None or width is not None:
            extra["latent_grid"] = self._grid_of(height or self.default_height, width or self.default_width)
        return Conditioning({"prompt_embeds": embeds, "prompt_embeds_mask": mask}, negative, scale, extra)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        rows, cols = self._grid_for(x.shape[1], extra)
        # no mask when no row is padded: the pipeline passes none then (an all-ones mask is the same math)
        mask = None if extra.get("text_unpadded", False) else tensors["prompt_embeds_mask"]
        return self.denoiser(
            hidden_states=x,
            timestep=t.to(x.dtype) / 1000,
            encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, rows, cols)]] * x.shape[0],
            attention_kwargs=extra.get("attention_kwargs"),
            return_dict=False,
        )[0]

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """Qwen-Image's true CFG: comb = u + s (c - u), rescaled per token to the conditional
        prediction's norm over the channel (last) axis: comb * ||c|| / ||comb||."""
        comb = uncond + scale * (cond - uncond)
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def decode(self, latents: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Packed latents (B, seq, 4C) -> images (B, 3, H, W) in [0, 1]. The image size is the one given
        here, else the adapter's default size when its sequence length matches, else square."""
        rows, cols = self._grid_for(latents.shape[1], {}, height, width)
        scale = self.vae_scale_factor * 2
        latents = self.unpack(latents.to(self.vae.device, self.vae.dtype), rows * scale, cols * scale)
        mean, std = self._latent_stats(latents)
        # z = packed / (1 / std) + mean, the pipeline's own arithmetic
        latents = latents / (1.0 / std) + mean
        image = self.vae.decode(latents, return_dict=False)[0][:, :, 0]  # the single frame
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> packed latents (B, seq, 4C): the VAE latent's mean (as a
        one-frame video), normalised by the VAE's latents_mean / latents_std (inverse of :meth:`decode`)."""
        latents = vae_encode(self.vae, images[:, :, None])  # (B, C, 1, h, w)
        mean, std = self._latent_stats(latents)
        return self.pack((latents - mean) / std).to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        import numpy as np
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        config = self.pipe.scheduler.config
        seq_len = (latent_shape or self.latent_shape())[0]
        # as QwenImagePipeline: linear sigmas 1 -> 1/T, shifted by mu from the image sequence length
        mu = calculate_shift(seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        return flow_schedule(self.pipe.scheduler, num_steps, sigmas=np.linspace(1.0, 1 / num_steps, num_steps), mu=mu)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        rows, cols = self._grid_of(height or self.default_height, width or self.default_width)
        return (rows * cols, int(self.base_denoiser.config.in_channels))

    # --- packing helpers --------------------------------------------------------------------------
    def _latent_stats(self, latents: Tensor) -> tuple[Tensor, Tensor]:
        config = self.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(latents.device, latents.dtype)
        return mean, std



    def pack(self, latents: Tensor) -> Tensor:
        """(B, C, 1, h, w) (or (B, C, h, w)) VAE latents -> (B, h/2 * w/2, 4C)."""
        b, c, h, w = latents.shape[0], latents.shape[1], latents.shape[-2], latents.shape[-1]
        return self.pipe._pack_latents(latents.reshape(b, c, h, w), b, c, h, w)

    def unpack(self, latents: Tensor, height: int, width: int) -> Tensor:
        """(B, seq, 4C) -> (B, C, 1, H/8, W/8) for an image of ``height`` x ``width`` pixels."""
        return self.pipe._unpack_latents(latents, height, width, self.vae_scale_factor)
