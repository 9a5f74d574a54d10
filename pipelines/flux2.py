"""FLUX.2: [dev] (``Flux2Pipeline``) and [klein] (``Flux2KleinPipeline``), both over a
``Flux2Transformer2DModel`` and the ``AutoencoderKLFlux2``.

Latents: the VAE latent (C, H/8, W/8) is patchified into 2x2 patches (4C, H/16, W/16), normalised
with the VAE's batch-norm statistics, ``z = (p - running_mean) / sqrt(running_var + eps)``, and
packed row-major into tokens: the engine sees (B, (H/16) * (W/16), 4C). Each token carries a 4D
position id (T, H, W, L) = (0, row, col, 0); text tokens carry (0, 0, 0, index).

Guidance: [dev] is guidance-distilled (the guidance value is an input of the transformer, no
negative batch). [klein] base runs real classifier-free guidance against a negative prompt (the
empty prompt in the pipeline) when the scale is above 1; the step-distilled [klein] checkpoints
(``is_distilled`` in the pipeline's config) take no guidance at all.

Schedule: linear sigmas 1 -> 1/T shifted by FLUX.2's empirical mu (``compute_empirical_mu``: a
function of the image token count and of the number of steps); timesteps are ``sigma * 1000`` and
the transformer receives ``t / 1000``, as the pipelines pass them.

Reference images (editing, multi-reference generation): each is VAE-encoded at its own size (the
pipeline's rule: brought under 1024^2 pixels, cropped to a multiple of 16), packed, and its tokens
follow the image tokens in every transformer call, with position ids (10 + 10 i, row, col, 0) for
the i-th reference; the prediction is read from the image tokens. They travel in the
Conditioning's rows (``reference_latents``), so they follow every row selection of the rollout,
re-scoring and trees; every row of one batch needs references of the same sizes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule, prompt_images
from pipelines.diffusers_common import (PackedLatentGrid, flow_schedule, freeze_except, load_pipeline,
                                        negative_list, open_image, prompt_list)


class _Flux2Base(PackedLatentGrid, ModelAdapter):
    """What FLUX.2 [dev] and [klein] share: packing, ids, schedule, VAE normalisation, forward.

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: text tokens per prompt (the pipelines' 512 by default); every prompt is
            padded to it, so conditional and negative embeddings have the same shape.
        text_encoder_out_layers: the text encoder's hidden-state layers stacked into the prompt
            embedding (the pipeline's default when None).

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, layers * hidden); ``extra`` = ``guidance``
    ([dev]: the embedded guidance value) and, when ``encode`` was given the image size,
    ``latent_grid`` = (H/16, W/16).
    """

    prediction_type = "flow"
    tasks = ("t2i", "edit")
    default_height = 1024
    default_width = 1024
    # double-stream blocks: image and text attention projections; single-stream blocks: the fused
    # QKV (+ MLP input) projection (their output projection also carries the MLP, so it is left out)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out", "to_qkv_mlp_proj")
    text_encoder_names = ("text_encoder",)
    #: the text encoder's hidden-state layers the pipeline stacks (its ``text_encoder_out_layers``)
    default_text_encoder_out_layers: tuple[int, ...] = ()
    pipeline_class_name = ""

    def __init__(self, pipe, *, max_sequence_length: int | None = None,
                 text_encoder_out_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        for component in ("transformer", "vae"):
            if getattr(pipe, component, None) is None:
                raise TypeError(f"{type(self).__name__} needs a {self.pipeline_class_name} with a {component}")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.vae_scale_factor = int(pipe.vae_scale_factor)
        if max_sequence_length is not None and int(max_sequence_length) < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        self.max_sequence_length = int(max_sequence_length or pipe.tokenizer_max_length)
        layers = tuple(int(i) for i in (text_encoder_out_layers or self.default_text_encoder_out_layers))
        depth = self._text_encoder_depth()
        if depth is not None and (not layers or max(layers) > depth or min(layers) < 0):
            raise ValueError(f"text_encoder_out_layers {layers} must be hidden-state layers 0..{depth} of the "
                             f"{depth}-layer text encoder")
        self.text_encoder_out_layers = layers
        self.default_height = self.default_width = int(pipe.default_sample_size) * self.vae_scale_factor
        self._ids: dict[tuple, Tensor] = {}
        freeze_except(pipe, self.denoiser)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        text_encoder_out_layers: Sequence[int] | None = None, **pipeline_kwargs: Any):
        """Load with the pipeline's ``from_pretrained`` (hub name or local directory)."""
        import diffusers

        pipeline_class = getattr(diffusers, cls.pipeline_class_name)
        pipe = load_pipeline(pipeline_class, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, text_encoder_out_layers=text_encoder_out_layers)

    def _text_encoder_depth(self) -> int | None:
        encoder = getattr(self.pipe, "text_encoder", None)
        if encoder is None:
            return None
        config = encoder.config
        config = getattr(config, "text_config", None) or config
        return int(config.num_hidden_layers)

    def _encode_text(self, prompts: list[str]) -> Tensor:
        """Prompts -> (B, L, layers * hidden) through the pipeline's ``encode_prompt``."""
        with torch.no_grad():
            embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device, num_images_per_prompt=1,
                                                max_sequence_length=self.max_sequence_length,
                                                text_encoder_out_layers=self.text_encoder_out_layers)
        return embeds

    def _extra(self, height: int | None, width: int | None) -> dict:
        extra: dict = {}
        if height is not None or width is not None:
            extra["latent_grid"] = self._grid_of(height or self.default_height, width or self.default_width)
        return extra

    def _with_references(self, cond: Conditioning, prompts: list[str], images: Sequence | None) -> Conditioning:
        """``cond`` with the reference images of each prompt (``images``, one entry per prompt: an
        image or a list of them; or each :class:`~pipelines.base.Prompt`'s ``.image``), when any."""
        found = prompt_images(prompts, images)
        if found is not None:
            latents, ids = self.encode_references(found)
            cond.tensors["reference_latents"] = latents
            if cond.negative is not None:
                cond.negative["reference_latents"] = latents
            cond.extra["reference_ids"] = ids
        return cond

    def encode_references(self, images: Sequence) -> tuple[Tensor, Tensor]:
        """Per row, one reference image or a list of them (paths, PIL images, (3, H, W) tensors in
        [0, 1]) -> (packed latents (B, tokens, 4C), position ids (tokens, 4)), as the pipelines
        make them: each image under 1024^2 pixels, cropped to a multiple of 16 by the pipeline's
        image processor, the VAE's mode, patchified and batch-norm normalised."""
        from torchvision.transforms.functional import to_pil_image

        processor, multiple = self.pipe.image_processor, self.vae_scale_factor * 2
        rows, shapes, ids = [], None, None
        for entry in images:
            pixels = []
            for image in entry if isinstance(entry, (list, tuple)) else [entry]:
                image = open_image(image)
                image = to_pil_image(image[0].clamp(0, 1)) if isinstance(image, Tensor) else image
                processor.check_image_input(image)
                if image.width * image.height > 1024 * 1024:
                    image = processor._resize_to_target_area(image, 1024 * 1024)
                width, height = image.width // multiple * multiple, image.height // multiple * multiple
                pixels.append(processor.preprocess(image, height=height, width=width, resize_mode="crop"))
            row_shapes = [tuple(p.shape[-2:]) for p in pixels]
            if shapes is not None and row_shapes != shapes:
                raise ValueError(f"every row of a batch needs reference images of the same sizes: {shapes} and "
                                 f"{row_shapes}")
            shapes = row_shapes
            with torch.no_grad():
                latents = [self.pipe._encode_vae_image(p.to(self.vae.device, self.vae.dtype), generator=None)
                           for p in pixels]
            rows.append(torch.cat([self.pipe._pack_latents(latent) for latent in latents], dim=1))
            if ids is None:  # every row has the same sizes, so the same ids
                ids = self.pipe._prepare_image_ids(latents)[0]
        return torch.cat(rows).to(self.device), ids.to(self.device)

    # --- interface --------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        dtype, batch = self.dtype, x.shape[0]
        embeds = tensors["prompt_embeds"].to(dtype)
        rows, cols = self._grid_for(x.shape[1], extra)
        guidance = None
        if self.base_denoiser.config.guidance_embeds:
            value = extra.get("guidance")
            value = self.default_guidance if value is None else value
            guidance = torch.full((batch,), float(value), device=x.device, dtype=torch.float32)
        hidden, ids = x, self.image_ids(rows, cols, x.device)
        references = tensors.get("reference_latents")
        if references is not None:
            hidden = torch.cat([x, references.to(x.dtype)], dim=1)
            ids = torch.cat([ids, extra["reference_ids"].to(ids.device, ids.dtype)])
        out = self.denoiser(
            hidden_states=hidden,
            timestep=t.to(x.dtype) / 1000,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=self.text_ids(embeds.shape[1], x.device),
            img_ids=ids,
            joint_attention_kwargs=extra.get("joint_attention_kwargs"),
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]  # the image tokens (reference tokens follow them)

    def decode(self, latents: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Packed latents (B, seq, 4C) -> images (B, 3, H, W) in [0, 1]. The image size is the one
        given here, else the adapter's default size when its sequence length matches, else square."""
        raw = self.to_vae_latents(latents, height=height, width=width)
        image = self.vae.decode(raw.to(self.vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, 3, H, W) in [0, 1] -> packed latents (B, seq, 4C): the VAE's mode, patchified
        and batch-norm normalised by the pipeline's ``_encode_vae_image`` (the inverse of decode)."""
        pixels = (images.to(self.vae.device, self.vae.dtype) * 2 - 1).clamp(-1, 1)
        with torch.no_grad():
            latents = self.pipe._encode_vae_image(pixels, generator=None)
        return self.pipe._pack_latents(latents).to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        import numpy as np

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        seq_len = (latent_shape or self.latent_shape())[0]
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        mu = self._empirical_mu(seq_len, num_steps)
        if self.pipe.scheduler.config.get("use_flow_sigmas", False):
            return flow_schedule(self.pipe.scheduler, num_steps, mu=mu)
        return flow_schedule(self.pipe.scheduler, num_steps, sigmas=sigmas, mu=mu)

    @staticmethod
    def _empirical_mu(image_seq_len: int, num_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        rows, cols = self._grid_of(height or self.default_height, width or self.default_width)
        return (rows * cols, int(self.base_denoiser.config.in_channels))

    # --- packing, ids, VAE latents ----------------------------------------------------------------

    def to_vae_latents(self, latents: Tensor, *, height: int | None = None, width: int | None = None) -> Tensor:
        """Packed latents (B, seq, 4C) -> the VAE's latents (B, C, H/8, W/8): unpacked, batch-norm
        de-normalised (x * sqrt(var + eps) + mean, in float32) and unpatchified, as the pipelines do
        before decoding (FLUX.2 [klein]'s ``output_type="latent"``)."""
        rows, cols = self._grid_for(latents.shape[1], {}, height, width)
        batch, seq, channels = latents.shape
        # the inverse of the pipeline's row-major _pack_latents
        x = latents.to(self.vae.device, torch.float32).transpose(1, 2).reshape(batch, channels, rows, cols)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(x.device, x.dtype)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(x.device, x.dtype)
        return self.pipe._unpatchify_latents(x * std + mean)

    def text_ids(self, length: int, device) -> Tensor:
        """(length, 4) position ids of the text tokens, (0, 0, 0, i) (cached)."""
        key = ("text", length, str(device))
        if key not in self._ids:
            self._ids[key] = self.pipe._prepare_text_ids(torch.empty(1, length, 0))[0].to(device)
        return self._ids[key]

    def image_ids(self, rows: int, cols: int, device) -> Tensor:
        """(rows * cols, 4) position ids of the packed image tokens, (0, row, col, 0) (cached)."""
        key = ("image", rows, cols, str(device))
        if key not in self._ids:
            self._ids[key] = self.pipe._prepare_latent_ids(torch.empty(1, 0, rows, cols))[0].to(device)
        return self._ids[key]


class Flux2Adapter(_Flux2Base):
    """FLUX.2 [dev] over a ``Flux2Pipeline``: a Mistral3 text encoder (hidden states of layers 10,
    20 and 30 under the pipeline's system message), guidance embedded in the transformer."""

    name = "flux2"
    guidance_kind = "embedded"
    default_steps = 50
    default_guidance = 4.0
    default_text_encoder_out_layers = (10, 20, 30)
    pipeline_class_name = "Flux2Pipeline"

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, height: int | None = None,
               width: int | None = None, images: Sequence | None = None) -> Conditioning:
        """``guidance_scale`` is the transformer's embedded guidance; [dev] has no negative branch, so
        ``negative_prompt`` is not used. ``images``: reference images, one entry (an image or a list)
        per prompt."""
        prompts = prompt_list(prompts)
        guidance = self.default_guidance if guidance_scale is None else float(guidance_scale)
        extra = self._extra(height, width)
        extra["guidance"] = guidance
        return self._with_references(Conditioning({"prompt_embeds": self._encode_text(prompts)}, None, 1.0, extra),
                                     prompts, images)


class Flux2KleinAdapter(_Flux2Base):
    """FLUX.2 [klein] over a ``Flux2KleinPipeline``: a Qwen3 text encoder (hidden states of layers 9,
    18 and 27 of its chat-formatted prompt), no guidance embedding.

    Base checkpoints run real CFG (u + g (c - u)) against ``negative_prompt`` (the pipeline's is
    the empty prompt) when ``guidance_scale`` > 1; step-distilled ones (``is_distilled`` in the
    pipeline's config, as FLUX.2-klein-4B) sample in 4 steps without guidance.
    """

    name = "flux2_klein"
    # the step-distilled checkpoints (the registry's default FLUX.2-klein-4B); base ones: see __init__
    guidance_kind = "none"
    default_steps = 4
    default_guidance = 1.0
    default_text_encoder_out_layers = (9, 18, 27)
    pipeline_class_name = "Flux2KleinPipeline"

    def __init__(self, pipe, **kwargs: Any) -> None:
        super().__init__(pipe, **kwargs)
        self.is_distilled = bool(pipe.config.get("is_distilled", False))
        if not self.is_distilled:  # the pipeline's defaults for base checkpoints
            self.guidance_kind = "cfg"
            self.default_steps = 50
            self.default_guidance = 4.0

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, height: int | None = None,
               width: int | None = None, images: Sequence | None = None) -> Conditioning:
        """CFG against ``negative_prompt`` when ``guidance_scale`` > 1 on a base checkpoint (as the
        pipeline decides); otherwise a single branch and a Conditioning guidance scale of 1.
        ``images``: reference images, one entry (an image or a list) per prompt; the negative
        branch sees them too, as in the pipeline."""
        prompts = prompt_list(prompts)
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale > 1.0 and not self.is_distilled
        negatives = negative_list(negative_prompt, len(prompts)) if use_cfg else None
        tensors = {"prompt_embeds": self._encode_text(prompts)}
        negative = {"prompt_embeds": self._encode_text(negatives)} if use_cfg else None
        return self._with_references(Conditioning(tensors, negative, scale if use_cfg else 1.0, self._extra(height, width)),
                                     prompts, images)

    @staticmethod
    def _empirical_mu(image_seq_len: int, num_steps: int) -> float:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return compute_empirical_mu(image_seq_len=image_seq_len, num_steps=num_steps)
