"""HunyuanVideo 1.5: text-to-video (``HunyuanVideo15Pipeline``) and image-to-video
(``HunyuanVideo15ImageToVideoPipeline``), a ``HunyuanVideo15Transformer3DModel`` over the latents of
``AutoencoderKLHunyuanVideo15`` (16x spatial, 4x temporal compression, 32 channels).

Latents: (B, C, F', H/16, W/16) with F' = (F - 1) // 4 + 1, scaled by the VAE's ``scaling_factor``
(no shift, no per-channel statistics); :meth:`HunyuanVideo15Adapter.decode` divides it out.

The transformer takes 2C + 1 channels: the noisy latent, a condition latent and a condition mask,
concatenated along the channels. Text-to-video conditions on nothing (both zero); image-to-video puts
the conditioning image's VAE latent in the first latent frame of the condition (later frames zero)
and ones in the mask's first frame.

Text: two encoders, as the pipeline runs them. Qwen2.5-VL encodes the prompt inside its chat template
(a system message describing videos), the third-last hidden state, with the template's first 108
tokens cropped; a ByT5 encoder encodes the quoted text of the prompt ("..." or “...”, the glyphs to
draw), zeros with an all-zero mask when there is none. Both are padded to fixed lengths (1000 and
256 tokens) with masks; the transformer moves the valid tokens of each row first and masks the rest
out of attention, so the adapter trims both to the longest valid length in the batch (negatives
included): fewer keys, the same result. Image-to-video adds SigLIP's image tokens; text-to-video's
are zeros, which the transformer masks out, and are passed as one token.

Guidance: the pipeline's ``guider`` (``ClassifierFreeGuidance``): u + g (c - u) against a negative
prompt, with its ``guidance_rescale`` when set; the scale defaults to the guider's.

Schedule: sigmas linspace(1, 0, T + 1)[:-1] shifted by the scheduler's ``shift``
(``FlowMatchEulerDiscreteScheduler``), timesteps ``sigma * 1000``, which the transformer takes as
they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Conditioning, ModelAdapter, Schedule, prompt_images
from pipelines.diffusers_common import (flow_schedule, freeze_except, load_pipeline, negative_list, prompt_list,
                                        vae_encode)

#: the conditioning tensors of the two text encoders: (embeddings, mask) pairs
TEXT_KEYS = (("prompt_embeds", "prompt_embeds_mask"), ("prompt_embeds_2", "prompt_embeds_mask_2"))


def _trim_text(branches: list[dict[str, Tensor]]) -> None:
    """Cut the padded tail of every text sequence, in place: to the last position any row of any
    branch (positive, negative) has a valid token, so the branches keep one common length (at least
    one token). Padded tokens are masked out of the transformer's attention: dropping them changes
    no valid token's output."""
    for embeds_key, mask_key in TEXT_KEYS:
        valid = torch.stack([b[mask_key].ne(0).any(0) for b in branches]).any(0)
        length = max(1, int(valid.nonzero().max()) + 1) if valid.any() else 1
        for branch in branches:
            branch[embeds_key] = branch[embeds_key][:, :length]
            branch[mask_key] = branch[mask_key][:, :length]


class HunyuanVideo15Adapter(ModelAdapter):
    """Adapter over a ``HunyuanVideo15Pipeline`` (text-to-video).

    Args:
        pipe: the pipeline (``self.pipe``; ``self.denoiser`` is ``pipe.transformer``).
        max_sequence_length: Qwen2.5-VL prompt tokens after the template (the pipeline's 1000).

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, 3584) with ``prompt_embeds_mask`` (B, L), and
    the glyph encoder's ``prompt_embeds_2`` (B, L2, 1472) with ``prompt_embeds_mask_2`` (B, L2), masks
    1 for valid tokens, in the transformer's dtype as the pipeline casts them; ``negative`` likewise,
    trimmed to the same lengths, for CFG. Image-to-video adds ``image_latents`` (B, C, 1, h, w) and
    ``image_embeds`` (B, N, 1152) to both.
    """

    name = "hunyuan_video15"
    prediction_type = "flow"
    tasks = ("t2v",)
    guidance_kind = "cfg"
    is_video = True
    # the pipeline's defaults (50 steps, 121 frames; 480p: the 16:9 bucket of target size 640); the
    # guidance scale and the size are replaced at load by the checkpoint's guider and target size
    default_steps = 50
    default_guidance = 6.0
    default_height = 480
    default_width = 848
    default_num_frames = 121
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                            "to_add_out")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "HunyuanVideo15Pipeline"

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        super().__init__()
        from diffusers import ClassifierFreeGuidance, HunyuanVideo15Transformer3DModel

        cls_name = type(self).__name__
        if getattr(pipe, "transformer", None) is None or getattr(pipe, "vae", None) is None:
            raise TypeError(f"{cls_name} needs a {self.pipeline_class_name} with a transformer and a VAE")
        if not isinstance(pipe.transformer, HunyuanVideo15Transformer3DModel):
            raise TypeError(f"{cls_name} needs a HunyuanVideo15Transformer3DModel, got "
                            f"{type(pipe.transformer).__name__}")
        guider = getattr(pipe, "guider", None)
        if not isinstance(guider, ClassifierFreeGuidance):
            raise TypeError(f"{cls_name} needs the pipeline's ClassifierFreeGuidance guider, got "
                            f"{type(guider).__name__}")
        config = guider.config
        if config.start != 0.0 or config.stop != 1.0 or config.use_original_formulation:
            # step-dependent guidance or c + g (c - u): not what predict's u + g (c - u) computes
            raise ValueError("guiders with start / stop or use_original_formulation are not supported: guidance "
                             "here is u + g (c - u) at every step")
        self.pipe = pipe
        self.denoiser = pipe.transformer
        self.vae = pipe.vae
        self.latent_channels = int(pipe.num_channels_latents)
        expected = 2 * self.latent_channels + 1
        if int(self.denoiser.config.in_channels) != expected:
            raise ValueError(f"the transformer takes {self.denoiser.config.in_channels} channels, expected "
                             f"{expected} (latent, condition latent and mask of a {self.latent_channels}-channel VAE)")
        self.guidance_rescale = float(config.guidance_rescale)
        self.default_guidance = float(config.guidance_scale) if config.enabled else 1.0
        self.max_sequence_length = int(pipe.tokenizer_max_length if max_sequence_length is None
                                       else max_sequence_length)
        self.temporal_factor = int(pipe.vae_scale_factor_temporal)
        self.spatial_factor = int(pipe.vae_scale_factor_spatial)
        # the pipeline's own default size: the 16:9 bucket of the transformer's target size
        self.default_height, self.default_width = pipe.video_processor.calculate_default_height_width(
            9, 16, pipe.target_size)
        freeze_except(pipe, self.denoiser)

    @classmethod
    def pipeline_class(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int | None = None,
                        **pipeline_kwargs: Any) -> "HunyuanVideo15Adapter":
        """Load with ``HunyuanVideo15Pipeline.from_pretrained`` (the image-to-video adapter:
        ``HunyuanVideo15ImageToVideoPipeline``), hub name or local directory."""
        pipeline_cls = cls.pipeline_class()
        try:
            index = pipeline_cls.load_config(path, local_files_only=pipeline_kwargs.get("local_files_only", False))
        except Exception:  # noqa: BLE001 - from_pretrained below reports the real problem
            index = {}
        found = index.get("_class_name")
        other = {"HunyuanVideo15Pipeline": "hunyuan_video15",
                 "HunyuanVideo15ImageToVideoPipeline": "hunyuan_video15_i2v"}
        if found in other and found != cls.pipeline_class_name:
            raise ValueError(f"{path} holds a {found}, not a {cls.pipeline_class_name}: use the {other[found]!r} "
                             "adapter")
        pipe = load_pipeline(pipeline_cls, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length)

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, images: Sequence | None = None,
               height: int | None = None, width: int | None = None) -> Conditioning:
        """Prompts -> Conditioning; CFG against ``negative_prompt`` unless the scale is 1 (the
        pipeline's ``negative_prompt=None`` is the empty prompt, as here)."""
        if images is not None:
            raise ValueError(f"the {self.name!r} model is text-to-video and takes no images: use "
                             "'hunyuan_video15_i2v' for image-to-video")
        return self._encode(prompt_list(prompts), negative_prompt, guidance_scale, {})

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        """One transformer call on latents x (B, C, F', h, w) at timesteps t (B,) = sigma * 1000."""
        dtype, batch = self.dtype, x.shape[0]
        condition, mask = self._condition(x, tensors)
        image_embeds = tensors.get("image_embeds")
        if image_embeds is None:  # text-to-video: zeros, masked out by the transformer
            image_embeds = x.new_zeros(batch, 1, self.denoiser.config.image_embed_dim, dtype=dtype)
        return self.denoiser(
            hidden_states=torch.cat([x, condition.to(x.dtype), mask.to(x.dtype)], dim=1),
            image_embeds=image_embeds.to(dtype),
            timestep=t.to(x.dtype),
            encoder_hidden_states=tensors["prompt_embeds"].to(dtype),
            encoder_attention_mask=tensors["prompt_embeds_mask"].to(dtype),
            encoder_hidden_states_2=tensors["prompt_embeds_2"].to(dtype),
            encoder_attention_mask_2=tensors["prompt_embeds_mask_2"].to(dtype),
            attention_kwargs=extra.get("attention_kwargs"),
            return_dict=False,
        )[0]

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """The guider's CFG: u + g (c - u), then, with ``guidance_rescale`` r > 0, each row mixed with
        its rescale to the conditional prediction's standard deviation: r out std(c)/std(out) + (1 - r) out."""
        out = uncond + scale * (cond - uncond)
        if self.guidance_rescale > 0.0:
            from diffusers.guiders.guider_utils import rescale_noise_cfg

            out = rescale_noise_cfg(out, cond, self.guidance_rescale)
        return out

    def decode(self, latents: Tensor) -> Tensor:
        """Latents (B, C, F', h, w) -> videos (B, F, 3, H, W) in [0, 1]. One video at a time: the VAE's
        causal attention mask (diffusers 0.42) does not broadcast over a batch of more than one."""
        latents = latents.to(self.vae.device, self.vae.dtype) / self.vae.config.scaling_factor
        video = torch.cat([self.vae.decode(z, return_dict=False)[0] for z in latents.split(1)])  # (B, 3, F, H, W)
        return self.pipe.video_processor.postprocess_video(video, output_type="pt").float()

    def encode_images(self, images: Tensor) -> Tensor:
        """Videos (B, F, 3, H, W) in [0, 1] (or images, as one-frame videos) -> latents (B, C, F', h, w):
        the VAE posterior's mean times ``scaling_factor``, as :meth:`decode` expects (one video at a
        time, as there)."""
        videos = images[:, None] if images.ndim == 4 else images
        videos = videos.permute(0, 2, 1, 3, 4)  # the VAE takes (B, 3, F, H, W)
        latents = torch.cat([vae_encode(self.vae, video) for video in videos.split(1)])
        return (latents * self.vae.config.scaling_factor).to(self.device)

    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        import numpy as np

        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # as the pipeline: linear sigmas 1 -> 1/T, shifted by the scheduler
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)[:-1]
        return flow_schedule(self.pipe.scheduler, num_steps, sigmas=sigmas)

    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        num_frames = num_frames or self.default_num_frames
        if num_frames < 1 or (num_frames - 1) % self.temporal_factor:
            raise ValueError(f"num_frames - 1 must be a multiple of {self.temporal_factor}, got {num_frames}")
        rows, cols = self._grid(height, width)
        return (self.latent_channels, (num_frames - 1) // self.temporal_factor + 1, rows, cols)

    def export_lora(self, directory: str | Path, state: dict | None = None) -> Path:
        """The trained LoRA in two layouts in one folder: ``lora.safetensors`` + ``lora_config.json``
        (what :meth:`load_lora` reads), and diffusers' ``pytorch_lora_weights.safetensors``
        ("transformer."-prefixed keys with the adapter config as metadata). diffusers has no LoRA
        loader for the HunyuanVideo 1.5 pipelines (no ``load_lora_weights``); its transformer loads
        the folder: ``pipe.transformer.load_lora_adapter(folder, weight_name="pytorch_lora_weights.safetensors",
        adapter_name=...)``, and ``pipe.transformer.unload_lora()`` removes it."""
        from diffusers.loaders.lora_base import LoraBaseMixin
        from peft import get_peft_model_state_dict

        base = self.base_denoiser
        state = get_peft_model_state_dict(base) if state is None else state
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        directory = super().export_lora(directory, state)
        metadata = base.peft_config["default"].to_dict()
        LoraBaseMixin.write_lora_layers(
            state_dict={f"transformer.{k}": v for k, v in state.items()}, save_directory=str(directory),
            is_main_process=True, weight_name="pytorch_lora_weights.safetensors", save_function=None,
            safe_serialization=True, lora_adapter_metadata={f"transformer.{k}": v for k, v in metadata.items()})
        return directory

    # --- helpers ----------------------------------------------------------------------------------
    def _grid(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(h, w) of the latent of a ``height`` x ``width`` video (defaults: the adapter's size)."""
        height, width = height or self.default_height, width or self.default_width
        patch = int(self.denoiser.config.patch_size)
        multiple = self.spatial_factor * patch
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return height // self.spatial_factor, width // self.spatial_factor

    def _encode(self, prompts: list[str], negative_prompt, guidance_scale: float | None,
                image_tensors: dict[str, Tensor]) -> Conditioning:
        scale = self.default_guidance if guidance_scale is None else float(guidance_scale)
        use_cfg = scale != 1.0
        with torch.no_grad():
            branches = [self._encode_text(prompts)]
            if use_cfg:
                branches.append(self._encode_text(negative_list(negative_prompt, len(prompts))))
        _trim_text(branches)
        for branch in branches:
            branch.update(image_tensors)
        return Conditioning(branches[0], branches[1] if use_cfg else None, scale)

    def _encode_text(self, prompts: list[str]) -> dict[str, Tensor]:
        """Both encoders' embeddings and masks, padded to their fixed lengths, in the transformer's
        dtype (the pipeline's ``encode_prompt`` with this adapter's Qwen token budget)."""
        pipe, device, dtype = self.pipe, self.device, self.dtype
        embeds, mask = pipe._get_mllm_prompt_embeds(
            text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, prompt=prompts, device=device,
            tokenizer_max_length=self.max_sequence_length, system_message=pipe.system_message,
            crop_start=pipe.prompt_template_encode_start_idx)
        embeds_2, mask_2 = pipe._get_byt5_prompt_embeds(
            tokenizer=pipe.tokenizer_2, text_encoder=pipe.text_encoder_2, prompt=prompts, device=device,
            tokenizer_max_length=pipe.tokenizer_2_max_length)
        out = {"prompt_embeds": embeds, "prompt_embeds_mask": mask, "prompt_embeds_2": embeds_2,
               "prompt_embeds_mask_2": mask_2}
        return {k: v.to(device=device, dtype=dtype) for k, v in out.items()}

    def _condition(self, x: Tensor, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The condition latent and mask concatenated to x: zeros for text-to-video."""
        batch, _, frames, rows, cols = x.shape
        return x.new_zeros(x.shape), x.new_zeros(batch, 1, frames, rows, cols)


class HunyuanVideo15I2VAdapter(HunyuanVideo15Adapter):
    """Adapter over a ``HunyuanVideo15ImageToVideoPipeline``: a conditioning image per prompt, encoded
    into ``image_latents`` (its VAE latent, the first latent frame's condition) and ``image_embeds``
    (SigLIP's tokens), rows of the Conditioning that follow every row selection.

    The image is brought to the video size as the pipeline does (``resize_mode="crop"``: scaled to
    cover, centre-cropped); tensors in [0, 1] are first quantised to 8 bits, as the PIL image the
    pipeline takes. The video size is the adapter's (``model.height`` / ``model.width``), where the
    pipeline picks the size bucket of the image's aspect ratio:
    ``pipe.video_processor.calculate_default_height_width(h, w, pipe.target_size)``.
    """

    name = "hunyuan_video15_i2v"
    tasks = ("i2v",)
    # the SigLIP image encoder is left out of text-encoder offloading: accelerate's cpu_offload cannot
    # run its attention-pooling head (nn.MultiheadAttention reads out_proj's weight without calling it)
    text_encoder_names = ("text_encoder", "text_encoder_2")
    pipeline_class_name = "HunyuanVideo15ImageToVideoPipeline"

    def __init__(self, pipe, *, max_sequence_length: int | None = None) -> None:
        if getattr(pipe, "image_encoder", None) is None or getattr(pipe, "feature_extractor", None) is None:
            raise TypeError("HunyuanVideo15I2VAdapter needs a HunyuanVideo15ImageToVideoPipeline with an "
                            "image_encoder and a feature_extractor")
        transformer = getattr(pipe, "transformer", None)
        if transformer is not None and transformer.config.get("use_meanflow", False):
            # the pipeline feeds such transformers the next step's timestep as well, which one call here lacks
            raise ValueError("MeanFlow transformers (use_meanflow=True, step-distilled) are not supported")
        super().__init__(pipe, max_sequence_length=max_sequence_length)

    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, images: Sequence | None = None,
               height: int | None = None, width: int | None = None) -> Conditioning:
        """``images``: one conditioning image per prompt (a path, PIL image or (3, H, W) tensor in
        [0, 1]), else each :class:`~pipelines.base.Prompt`'s ``.image``; the video is ``height`` x
        ``width`` (default: the adapter's size). Both CFG branches see the same image."""
        prompts = prompt_list(prompts)
        images = prompt_images(prompts, images)
        if images is None:
            raise ValueError(f"the {self.name!r} model needs a conditioning image per prompt (images=, or "
                             "prompts with an image)")
        height, width = height or self.default_height, width or self.default_width
        self._grid(height, width)
        encoded: dict[object, tuple[Tensor, Tensor]] = {}  # prompts of a group share one image
        rows = []
        for image in images:
            key = str(image) if isinstance(image, (str, Path)) else id(image)
            if key not in encoded:
                encoded[key] = self._encode_image(image, height, width)
            rows.append(encoded[key])
        image_tensors = {"image_latents": torch.cat([r[0] for r in rows]),
                         "image_embeds": torch.cat([r[1] for r in rows])}
        return self._encode(prompts, negative_prompt, guidance_scale, image_tensors)

    def _encode_image(self, image, height: int, width: int) -> tuple[Tensor, Tensor]:
        """One image -> its VAE latent (1, C, 1, h, w) times ``scaling_factor`` and its SigLIP tokens
        (1, N, D), in the transformer's dtype, by the pipeline's own helpers."""
        pipe, device = self.pipe, self.device
        image = pipe.video_processor.resize(self._pil_image(image), height=height, width=width, resize_mode="crop")
        with torch.no_grad():
            latents = pipe._get_image_latents(vae=pipe.vae, image_processor=pipe.video_processor, image=image,
                                              height=height, width=width, device=device)
            embeds = pipe._get_image_embeds(image_encoder=pipe.image_encoder, feature_extractor=pipe.feature_extractor,
                                            image=image, device=device)
        return latents.to(device, self.dtype), embeds.to(device, self.dtype)

    def _pil_image(self, image):
        """A path, PIL image or (3, H, W) / (H, W, 3) tensor in [0, 1] -> an RGB PIL image."""
        from PIL import Image

        if isinstance(image, (str, Path)):
            path = Path(image)
            if not path.is_file():
                raise FileNotFoundError(f"conditioning image not found: {path}")
            image = Image.open(path)
        if isinstance(image, Tensor):
            pixels = image.detach().float().cpu()
            if pixels.ndim == 3 and pixels.shape[0] != 3 and pixels.shape[-1] == 3:
                pixels = pixels.permute(2, 0, 1)
            if pixels.ndim != 3 or pixels.shape[0] != 3:
                raise ValueError(f"a conditioning image must be RGB (3, H, W), got shape {tuple(image.shape)}")
            array = self.pipe.video_processor.pt_to_numpy(pixels[None].clamp(0, 1))
            return self.pipe.video_processor.numpy_to_pil(array)[0]
        if not isinstance(image, Image.Image):
            raise ValueError(f"a conditioning image must be a path, PIL image or tensor, got {type(image).__name__}")
        return image.convert("RGB")

    def _condition(self, x: Tensor, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """The image's latent in the first latent frame (later frames zero), and a mask of ones there."""
        batch, channels, frames, rows, cols = x.shape
        latents = tensors["image_latents"]
        if tuple(latents.shape[-2:]) != (rows, cols):
            raise ValueError(f"the conditioning image's latent is {tuple(latents.shape[-2:])} but the video's is "
                             f"{(rows, cols)}: encode with the video's height and width")
        condition = torch.cat([latents.to(x.dtype), x.new_zeros(batch, channels, frames - 1, rows, cols)], dim=2)
        mask = x.new_zeros(batch, 1, frames, rows, cols)
        mask[:, :, 0] = 1.0
        return condition, mask
