"""Qwen-Image-Edit (``QwenImageEditPipeline``) and Qwen-Image-Edit Plus (``QwenImageEditPlusPipeline``,
several source images), on the Qwen-Image transformer and VAE (:mod:`pipelines.qwen_image`).

A source image enters twice, as the pipelines feed it:

* the Qwen2.5-VL encoder sees it inside the edit template (Plus: each image as "Picture i: ..." at
  about 384^2 pixels), so the instruction's embedding depends on its image;
* its VAE latent (at about 1024^2 pixels, the aspect kept, sides multiples of 32), normalised and
  packed like the latents, is appended to the noisy tokens of every transformer call, with its own
  entry in ``img_shapes``; the prediction is read from the noisy tokens.

Rows are encoded one at a time (the Plus pipeline takes one prompt per call) and padded to a common
text length with ``prompt_embeds_mask``; the source latents travel in the Conditioning's rows
(``image_latents``), so they follow the rollout's groups, trees and re-scoring. The unconditional
rows of true CFG see the same images. Every row of one batch needs sources of the same sizes.

Sizes: the pipelines take the output size from the source's aspect unless given one; the adapter
samples at the size it is given (``model.height`` / ``model.width``), the pipeline's with
``height`` / ``width`` passed.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, prompt_images
from pipelines.diffusers_common import image_size, load_pipeline, negative_list, open_image, prompt_list
from pipelines.qwen_image import QwenImageAdapter, _pad_text


class QwenImageEditAdapter(QwenImageAdapter):
    """Adapter over a ``QwenImageEditPipeline`` or ``QwenImageEditPlusPipeline``.

    Conditioning: Qwen-Image's (``prompt_embeds``, ``prompt_embeds_mask``, encoded with each row's
    images) plus ``tensors["image_latents"]`` (B, source tokens, 4C) and ``extra["source_grids"]``,
    the (1, rows, cols) latent grid of each source (the transformer's ``img_shapes`` after the
    output's)."""

    name = "qwen_image_edit"
    tasks = ("edit",)
    #: pixels of the VAE's view of a source (the pipelines' 1024^2) and, for Plus, of the text
    #: encoder's view (384^2)
    vae_image_area = 1024 * 1024
    condition_image_area = 384 * 384

    def __init__(self, pipe, *, max_sequence_length: int | None = None, source_size: int | None = None) -> None:
        super().__init__(pipe, max_sequence_length=max_sequence_length)
        from diffusers import QwenImageEditPlusPipeline

        self.plus = isinstance(pipe, QwenImageEditPlusPipeline)
        if source_size is not None:  # model.source_size: the VAE's view (and at most that for the encoder's)
            self.vae_image_area = int(source_size) ** 2
            self.condition_image_area = min(self.condition_image_area, self.vae_image_area)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        source_size: int | None = None, **pipeline_kwargs: Any) -> "QwenImageEditAdapter":
        """Load with the folder's pipeline class (``QwenImageEditPipeline`` or
        ``QwenImageEditPlusPipeline``, from its ``model_index.json``; Edit when unknown)."""
        import diffusers

        try:
            index = diffusers.QwenImageEditPipeline.load_config(
                path, local_files_only=pipeline_kwargs.get("local_files_only", False))
        except Exception:  # noqa: BLE001 - from_pretrained below reports the real problem
            index = {}
        name = index.get("_class_name")
        pipeline_class = getattr(diffusers, name if name == "QwenImageEditPlusPipeline" else "QwenImageEditPipeline")
        pipe = load_pipeline(pipeline_class, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, source_size=source_size)

    @staticmethod
    def _dimensions(area: int, image) -> tuple[int, int]:
        """(height, width) of the pipelines' rule: ``area`` pixels at the image's aspect, sides
        rounded to multiples of 32."""
        from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit

        height, width = image_size(image)
        found = pipeline_qwenimage_edit.calculate_dimensions(area, width / height)
        return int(found[1]), int(found[0])

    def _row_inputs(self, images: list) -> tuple[list, Tensor, list[tuple[int, int, int]]]:
        """One row's sources -> (the images the text encoder sees, their packed normalised VAE
        latents (1, tokens, 4C), their latent grids)."""
        processor, grids, latents, seen = self.pipe.image_processor, [], [], []
        for image in images:
            height, width = self._dimensions(self.vae_image_area, image)
            if self.plus:
                cond_height, cond_width = self._dimensions(self.condition_image_area, image)
                seen.append(processor.resize(image, cond_height, cond_width))
                pixels = processor.preprocess(image, height, width)
            else:
                resized = processor.resize(image, height, width)
                seen.append(resized)
                pixels = processor.preprocess(resized, height, width)
            with torch.no_grad():
                raw = self.pipe._encode_vae_image(pixels.unsqueeze(2).to(self.vae.device, self.vae.dtype), None)
            latents.append(self.pack(raw))
            scale = self.vae_scale_factor * 2
            grids.append((1, height // scale, width // scale))
        return seen, torch.cat(latents, dim=1), grids

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, height: int | None = None,
               width: int | None = None, images: Sequence | None = None) -> Conditioning:
        """Instructions with their source images (``images``: one entry per prompt, an image or a list
        of them; or each :class:`~pipelines.base.Prompt`'s ``.image``). Edit takes one image a row,
        Plus several. ``guidance_scale`` is the pipelines' ``true_cfg_scale`` (default 4.0)."""
        prompts = prompt_list(prompts)
        found = prompt_images(prompts, images)
        if found is None:
            raise ValueError(f"the {self.name} model edits images: give each prompt its source image "
                             "(images=, or a JSONL prompt file with \"image\")")
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        negatives = negative_list(negative_prompt, len(prompts))
        rows: dict[str, list] = {"embeds": [], "masks": [], "neg_embeds": [], "neg_masks": [], "latents": []}
        grids = None
        for prompt, negative, entry in zip(prompts, negatives, found):
            entry = [open_image(image) for image in (entry if isinstance(entry, (list, tuple)) else [entry])]
            if not self.plus and len(entry) != 1:
                raise ValueError(f"Qwen-Image-Edit takes one source image a prompt, got {len(entry)}: "
                                 "use a Qwen-Image-Edit Plus checkpoint for several")
            seen, latents, row_grids = self._row_inputs(entry)
            if grids is not None and row_grids != grids:
                raise ValueError(f"every row of a batch needs source images of the same sizes: {grids} and {row_grids}")
            grids = row_grids
            shown = seen if self.plus else seen[0]
            with torch.no_grad():
                embeds, mask = self.pipe.encode_prompt(prompt=[str(prompt)], image=shown, device=self.device,
                                                       max_sequence_length=self.max_sequence_length)
                rows["embeds"].append(embeds)
                rows["masks"].append(mask)
                if use_cfg:
                    embeds, mask = self.pipe.encode_prompt(prompt=[negative], image=shown, device=self.device,
                                                           max_sequence_length=self.max_sequence_length)
                    rows["neg_embeds"].append(embeds)
                    rows["neg_masks"].append(mask)
            rows["latents"].append(latents)
        length = max(e.shape[1] for e in rows["embeds"] + rows["neg_embeds"])
        # no mask when no row (of either branch) is padded: the pipelines pass none then
        unpadded = all(m is None and e.shape[1] == length for e, m in
                       zip(rows["embeds"] + rows["neg_embeds"], rows["masks"] + rows["neg_masks"]))

        def stack(embeds: list, masks: list) -> dict[str, Tensor]:
            padded = [_pad_text(e, m, length) for e, m in zip(embeds, masks)]
            return {"prompt_embeds": torch.cat([p[0] for p in padded]),
                    "prompt_embeds_mask": torch.cat([p[1] for p in padded])}

        image_latents = torch.cat(rows["latents"]).to(self.device)
        tensors = {**stack(rows["embeds"], rows["masks"]), "image_latents": image_latents}
        negative = {**stack(rows["neg_embeds"], rows["neg_masks"]), "image_latents": image_latents} if use_cfg else None
        extra: dict = {"text_unpadded": unpadded, "source_grids": grids}
        if height is not None or width is not None:
            extra["latent_grid"] = self._grid_of(height or self.default_height, width or self.default_width)
        return Conditioning(tensors, negative, scale, extra)

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        rows, cols = self._grid_for(x.shape[1], extra)
        mask = None if extra.get("text_unpadded", False) else tensors["prompt_embeds_mask"]
        sources = tensors["image_latents"]
        out = self.denoiser(
            hidden_states=torch.cat([x, sources.to(x.dtype)], dim=1),
            timestep=t.to(x.dtype) / 1000,
            encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype),
            encoder_hidden_states_mask=mask,
            img_shapes=[[(1, rows, cols), *extra["source_grids"]]] * x.shape[0],
            attention_kwargs=extra.get("attention_kwargs"),
            return_dict=False,
        )[0]
        return out[:, : x.shape[1]]
