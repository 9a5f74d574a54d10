"""FLUX.1 Kontext (``FluxKontextPipeline``): instruction-based image editing on the FLUX.1 transformer.

The source image is VAE-encoded, packed like the latents, and its tokens are appended to the
noisy latent's tokens in every transformer call, with positional ids whose first axis is 1
(the latent's are 0); the prediction is read from the latent's tokens only. Everything else is
FLUX.1's (:mod:`pipelines.flux`): the embedded guidance, the shifted schedule of the output's
sequence length, packing and decoding.

The source's latent travels in the Conditioning's rows (``image_latents``), so it follows every
row selection of the rollout, the recorded transitions, re-scoring and trees; the unconditional
rows of true CFG see the same source, as the pipeline does. Without images the adapter is plain
text-to-image FLUX (the pipeline's behaviour too).

Sizes: the pipeline resizes its output to ``max_area`` (1024^2 by default) keeping the aspect
ratio; the adapter samples at the size it is given (``model.height`` / ``model.width``), which is
the pipeline's with ``max_area = height * width``. The source is resized as the pipeline resizes it:
to the preferred Kontext resolution of its aspect ratio (``auto_resize``, the default) or its own
size rounded down to a multiple of 16; ``source_size`` (``model.source_size``) brings it to about
``source_size``^2 pixels at its aspect instead. Every source of one batch is brought to the first
one's size.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, prompt_images
from pipelines.diffusers_common import image_size, load_pipeline, open_image
from pipelines.flux import FluxAdapter


class FluxKontextAdapter(FluxAdapter):
    """Adapter over a ``FluxKontextPipeline`` (FLUX.1 Kontext [dev]).

    Conditioning: FLUX.1's (``prompt_embeds``, ``pooled_prompt_embeds``, ``guidance``, ``txt_ids``)
    plus, when editing, ``tensors["image_latents"]`` (B, image tokens, 4C), the packed source
    latents, and ``extra["image_ids"]`` (image tokens, 3), their positional ids.
    """

    name = "flux_kontext"
    tasks = ("t2i", "edit")
    default_guidance = 2.5  # the pipeline's default

    def __init__(self, pipe, *, max_sequence_length: int | None = None, auto_resize: bool = True,
                 source_size: int | None = None) -> None:
        super().__init__(pipe, max_sequence_length=max_sequence_length)
        self.auto_resize = bool(auto_resize) and source_size is None
        self.source_pixels = None if source_size is None else int(source_size) ** 2

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        auto_resize: bool = True, source_size: int | None = None,
                        **pipeline_kwargs: Any) -> "FluxKontextAdapter":
        """Load with ``FluxKontextPipeline.from_pretrained`` (hub name or local directory)."""
        from diffusers import FluxKontextPipeline

        pipe = load_pipeline(FluxKontextPipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, auto_resize=auto_resize, source_size=source_size)

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, true_cfg_scale: float = 1.0,
               height: int | None = None, width: int | None = None, images: Sequence | None = None) -> Conditioning:
        """FLUX.1's encoding plus the source images (``images``, one per prompt, or each
        :class:`~pipelines.base.Prompt`'s ``.image``; a list of several takes its first)."""
        cond = super().encode(prompts, negative_prompt, guidance_scale, true_cfg_scale=true_cfg_scale,
                              height=height, width=width)
        found = prompt_images(list(prompts) if not isinstance(prompts, str) else [prompts], images)
        if found is not None:
            latents, ids = self.encode_sources([im[0] if isinstance(im, (list, tuple)) else im for im in found])
            cond.tensors["image_latents"] = latents
            if cond.negative is not None:
                cond.negative["image_latents"] = latents
            cond.extra["image_ids"] = ids
        return cond

    def source_size(self, image) -> tuple[int, int]:
        """(height, width) the pipeline resizes a source image to."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

        multiple = self.vae_scale_factor * 2
        height, width = image_size(image)
        if self.source_pixels is not None:  # about source_pixels at the image's aspect
            ratio = width / height
            height, width = round((self.source_pixels / ratio) ** 0.5), round((self.source_pixels * ratio) ** 0.5)
        height, width = height - height % self.vae_scale_factor, width - width % self.vae_scale_factor
        if self.auto_resize:
            ratio = width / height
            _, width, height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
        return height // multiple * multiple, width // multiple * multiple

    def encode_sources(self, images: Sequence) -> tuple[Tensor, Tensor]:
        """Source images (paths, PIL images or (3, H, W) tensors in [0, 1]) -> (packed latents
        (B, tokens, 4C), positional ids (tokens, 3) with first axis 1), as the pipeline makes them:
        its image processor's resize and preprocess, the VAE's mode, FLUX's shift and scale."""
        from diffusers.pipelines.flux.pipeline_flux_kontext import retrieve_latents

        opened = [open_image(image) for image in images]
        height, width = self.source_size(opened[0])
        processor = self.pipe.image_processor
        pixels = torch.cat([processor.preprocess(processor.resize(image, height, width), height, width)
                            for image in opened])
        config = self.vae.config
        with torch.no_grad():
            latents = retrieve_latents(self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)), sample_mode="argmax")
        latents = (latents - config.shift_factor) * config.scaling_factor
        b, c, h, w = latents.shape
        ids = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, self.dtype)
        ids[..., 0] = 1
        return self.pack(latents).to(self.device), ids

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        image = tensors.get("image_latents")
        if image is None:
            return super().forward(x, t, tensors, extra)
        rows, cols = self._grid_for(x.shape[1], extra)
        ids = torch.cat([self.image_ids(rows, cols, x.device, x.dtype), extra["image_ids"].to(x.device, x.dtype)])
        out = self.call_transformer(torch.cat([x, image.to(x.dtype)], dim=1), ids, t, tensors, extra)
        return out[:, :x.shape[1]]
