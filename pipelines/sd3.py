"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline`` with an ``SD3Transformer2DModel``).

Latents are the transformer's (B, C, H/8, W/8) input; the model predicts the flow velocity and
receives timesteps in the scheduler's units, ``sigma * 1000``. Text goes through the pipeline's own
``encode_prompt`` (two CLIP encoders, optionally T5) and images through its VAE.

"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule
from pipelines.diffusers_common import (flow_schedule, freeze_except, load_pipeline, negative_list, prompt_list,
                                        vae_encode)


# --- attention through diffusers' dispatch ---------------------------------------------------------
class JointAttnDispatchProcessor:
    """SD3's joint attention (image tokens, then the prompt's) with the attention itself through
    diffusers' ``dispatch_attention_fn``, so ``set_attention_backend`` (flash, sage, xformers, ...)
    reaches it; the stock ``JointAttnProcessor2_0`` calls torch SDPA directly. The projections,
    norms and output split are the stock processor's."""

    #: set by ``ModelMixin.set_attention_backend`` (None: the active default)
    _attention_backend = None

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                 attention_mask: Tensor | None = None, *args, **kwargs):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        batch, image_tokens = hidden_states.shape[:2]

        def heads(t: Tensor) -> Tensor:  # (B, S, H * D) -> (B, S, H, D), the layout dispatch takes
            return t.view(batch, -1, attn.heads, t.shape[-1] // attn.heads)

        query = heads(attn.to_q(hidden_states))
        key, value = heads(attn.to_k(hidden_states)), heads(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            text_q = heads(attn.add_q_proj(encoder_hidden_states))
            text_k = heads(attn.add_k_proj(encoder_hidden_states))
            text_v = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat([query, text_q], dim=1), torch.cat([key, text_k], dim=1),
                                 torch.cat([value, text_v], dim=1))
        out = dispatch_attention_fn(query, key, value, backend=self._attention_backend)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is not None:
            out, encoder_hidden_states = out[:, :image_tokens], out[:, image_tokens:]
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if encoder_hidden_states is None else (out, encoder_hidden_states)


# --- the adapter ----------------------------------------------------------------------------------
class SD3Adapter(ModelAdapter):
    """Adapter over a ``StableDiffusion3Pipeline``.

    Args:
        pipe: the pipeline (kept as ``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: T5 tokens per prompt (the pipeline's default, 256).
        clip_skip: passed to ``encode_prompt``.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, 77 + T5 tokens, D) and
    ``pooled_prompt_embeds`` (B, 2048); ``negative`` likewise for CFG. Timesteps: ``sigma * 1000``
    (what ``SD3Transformer2DModel`` takes). Latents: (B, C, H / vae_scale_factor, W / vae_scale_factor).
    """

    name = "sd3"
    prediction_type = "flow"
    # SD3.5 Medium's recommended settings
    default_steps = 40
    default_guidance = 4.5
    default_height = 1024
    default_width = 1024
    #: joint attention of the MM-DiT blocks (image and text streams), named as the Flow-GRPO reference
    #: does: ``attn.*`` only, not the ``attn2`` self-attention of SD3.5-Medium's dual-attention blocks
    #: (a bare suffix such as ``to_q`` would catch those too)
    default_lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                            "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, pipe, *, max_sequence_length: int = 256, clip_skip: int | None = None) -> None:
        super().__init__()
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError("SD3Adapter needs a StableDiffusion3Pipeline with a transformer and a VAE")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.max_sequence_length = max_sequence_length
        self.clip_skip = clip_skip
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        self.patch_size = int(self.denoiser.config.patch_size)
        self.default_height = self.default_width = int(pipe.default_sample_size) * self.vae_scale_factor
        freeze_except(pipe, self.denoiser)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int = 256,
                        clip_skip: int | None = None, **pipeline_kwargs: Any) -> "SD3Adapter":
        """Load with ``StableDiffusion3Pipeline.from_pretrained`` (hub name or local directory);
        ``pipeline_kwargs`` go to it (e.g. ``text_encoder_3=None, tokenizer_3=None`` to drop T5)."""
        from diffusers import StableDiffusion3Pipeline

        pipe = load_pipeline(StableDiffusion3Pipeline, path, torch_dtype=torch_dtype, device=device,
                             **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, clip_skip=clip_skip)

    def route_attention_through_dispatch(self) -> None:
        """Joint attention processors that go through diffusers' dispatch (``model.attention_backend``)."""
        from diffusers.models.attention_processor import JointAttnProcessor2_0

        for module in self.base_denoiser.modules():
            if isinstance(getattr(module, "processor", None), JointAttnProcessor2_0):
                module.set_processor(JointAttnDispatchProcessor())

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        negatives = negative_list(negative_prompt, len(prompts)) if use_cfg else None
        with torch.no_grad():
            embeds, neg_embeds, pooled, neg_pooled = self.pipe.encode_prompt(
                prompt=prompts, prompt_2=None, prompt_3=None, device=self.device, num_images_per_prompt=1,
                do_classifier_free_guidance=use_cfg, negative_prompt=negatives,
                clip_skip=self.clip_skip, max_sequence_length=self.max_sequence_length,
            )
        tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        negative = {"prompt_embeds": neg_embeds, "pooled_prompt_embeds": neg_pooled} if use_cfg else None
        return Conditioning(tensors, negative, scale)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        dtype = self.dtype
        return self.denoiser(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=tensors["prompt_embeds"].to(dtype),
            pooled_projections=tensors["pooled_prompt_embeds"].to(dtype),
            joint_attention_kwargs=extra.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]

    def decode(self, latents: Tensor) -> Tensor:
        config = self.vae.config
        latents = latents.to(self.vae.device, self.vae.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> latents through the VAE (the inverse of :meth:`decode`'s
        scaling and shift)."""
        config = self.vae.config
        latents = vae_encode(self.vae, images)
        return ((latents - (config.shift_factor or 0.0)) * config.scaling_factor).to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        scheduler = self.pipe.scheduler
        kwargs = {}
        if scheduler.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            _, h, w = latent_shape or self.latent_shape()
            seq_len = (h // self.patch_size) * (w // self.patch_size)
            kwargs["mu"] = calculate_shift(
                seq_len, scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        return flow_schedule(scheduler, num_steps, **kwargs)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        height, width = height or self.default_height, width or self.default_width
        multiple = self.vae_scale_factor * self.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return (int(self.base_denoiser.config.in_channels), height // self.vae_scale_factor,
                width // self.vae_scale_factor)
