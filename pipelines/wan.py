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

    @classmethod
    def folder_problem(cls, index: dict) -> str | None:
        """Wan 2.2 folders share ``WanPipeline`` with Wan 2.1's."""
        if index.get("boundary_ratio") is not None or index.get("expand_timesteps", False):
            return "holds a Wan 2.2 pipeline (boundary_ratio / expand_timesteps); use model.name=wan22"
        return None

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


# --- Wan 2.2 ------------------------------------------------------------------------------------
#: the two experts of Wan 2.2 A14B, by index: the pipeline's component names
EXPERT_COMPONENTS = ("transformer", "transformer_2")
#: ``model.train_experts`` -> the experts that train (indices into EXPERT_COMPONENTS)
TRAIN_EXPERTS = {"both": (0, 1), "high_noise": (0,), "low_noise": (1,)}
#: the low-noise expert's LoRA in an exported folder; ``pytorch_lora_weights.safetensors`` holds the
#: high-noise expert's, so the stock ``load_lora_weights(dir)`` loads that one, and
#: ``load_lora_weights(dir, weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)`` this one
LOW_NOISE_LORA_FILE = "pytorch_lora_weights_transformer_2.safetensors"
HIGH_NOISE_LORA_FILE = "pytorch_lora_weights.safetensors"


class WanExperts(torch.nn.Module):
    """Wan 2.2's denoising transformers as one module: ``transformer`` (the high-noise expert, or the
    only one) and ``transformer_2`` (the low-noise expert, or None). One module is what the runtime
    moves, wraps (DDP, FSDP, compile), checkpoints and counts the parameters of; a call names the
    expert that runs (``forward(..., expert=i)``), so every call still goes through the wrapper.

    Experts that are frozen while another one trains still get a graph: a call of a frozen expert
    under autograd adds ``0 * w`` for one trainable weight ``w``, so a loss on its steps alone has a
    (zero) gradient instead of none."""

    _supports_gradient_checkpointing = True
    _no_split_modules = ["WanTransformerBlock"]
    _repeated_blocks = ["WanTransformerBlock"]

    def __init__(self, transformer: torch.nn.Module, transformer_2: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.transformer_2 = transformer_2

    @property
    def experts(self) -> list[torch.nn.Module]:
        return [self.transformer] + ([self.transformer_2] if self.transformer_2 is not None else [])

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def gradient_checkpointing(self) -> bool:
        return any(expert.gradient_checkpointing for expert in self.experts)

    def enable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.enable_gradient_checkpointing()

    def disable_gradient_checkpointing(self) -> None:
        for expert in self.experts:
            expert.disable_gradient_checkpointing()

    def set_attention_backend(self, name: str) -> None:
        for expert in self.experts:
            expert.set_attention_backend(name)

    def forward(self, hidden_states: Tensor, timestep: Tensor, encoder_hidden_states: Tensor, *, expert: int = 0,
                attention_kwargs: dict | None = None) -> Tensor:
        """Expert ``expert``'s output (B, C, F', h, w) for ``hidden_states`` of the same shape;
        ``timestep`` (B,) or, with per-token timesteps, (B, tokens)."""
        model = self.experts[expert]
        out = model(hidden_states=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                    attention_kwargs=attention_kwargs, return_dict=False)[0]
        if torch.is_grad_enabled() and not out.requires_grad:
            anchor = next((p for other in self.experts if other is not model
                           for p in other.parameters() if p.requires_grad), None)
            if anchor is not None:  # the trained expert's weight (its local shard), with a zero gradient
                local = anchor.to_local() if hasattr(anchor, "to_local") else anchor
                out = out + 0 * local.reshape(-1)[:1].sum()
        return out


class Wan22Adapter(WanAdapter):
    """Adapter over a Wan 2.2 ``WanPipeline``: the A14B text-to-video model (two experts) or TI2V-5B
    (one transformer, per-token timesteps; text- and image-to-video).

    Args:
        pipe: the pipeline (``self.pipe``); ``self.denoiser`` is a :class:`WanExperts` holding
            ``pipe.transformer`` and ``pipe.transformer_2``.
        max_sequence_length: UMT5 tokens per prompt (the pipeline's default, 512).
        flow_shift: the schedule's shift when the pipeline's scheduler is not a flow-matching one
            (None: the family's, 12 for A14B T2V and 5 for TI2V-5B); ignored otherwise.
        train_experts: which experts train (LoRA or full fine-tuning) on A14B: "both", "high_noise"
            (``transformer``) or "low_noise" (``transformer_2``); the others stay bit-identical.
            TI2V-5B has one transformer: "both" only.
        guidance_scale_2: the low-noise expert's CFG scale when :meth:`encode` is not given one.

    Experts (A14B): the pipeline's rule, t >= ``boundary_ratio * num_train_timesteps`` -> expert 0
    (``transformer``, CFG scale ``guidance_scale``), else expert 1 (``transformer_2``,
    ``guidance_scale_2``). :meth:`expert_at` tells which, :meth:`pinned_expert` forces one; rows of
    one batch at timesteps on both sides of the boundary are split between the experts.

    Conditioning: ``tensors`` = ``prompt_embeds`` (B, L, 4096) and, for image-to-video,
    ``image_latents`` (B, C, 1, h, w): the normalised VAE latent of each row's first frame (in
    ``negative`` too: both CFG branches see it); ``extra["guidance_scale_2"]`` (A14B).

    Image-to-video (TI2V-5B, as ``WanImageToVideoPipeline`` with ``expand_timesteps``): the model
    sees the image latent as the first latent frame, with timestep 0 on that frame's tokens; the
    first frame's velocity is zero, so it carries no log-prob gradient, and
    :meth:`apply_condition` puts the image latent back in place before decoding.
    """

    name = "wan22"
    tasks = ("t2v", "i2v")  # the family's; an instance lists its checkpoint's (A14B T2V: t2v only)
    # Wan 2.2 T2V-A14B settings (720p; the TI2V-5B ones are set in __init__)
    default_steps = 40
    default_guidance = 4.0
    #: the low-noise expert's CFG scale (A14B) when encode() is given no guidance scale
    default_guidance_2 = 3.0
    default_height = 720
    default_width = 1280
    default_num_frames = 81

    def __init__(self, pipe, *, max_sequence_length: int = 512, flow_shift: float | None = None,
                 train_experts: str = "both", guidance_scale_2: float | None = None) -> None:
        config = getattr(pipe, "config", {})
        self.expand_timesteps = bool(config.get("expand_timesteps", False))
        two_experts = config.get("boundary_ratio") is not None
        if flow_shift is None:
            flow_shift = 5.0 if self.expand_timesteps else 12.0
        super().__init__(pipe, max_sequence_length=max_sequence_length, flow_shift=flow_shift)
        self._pinned: int | None = None
        #: expert 0 predicts at timesteps >= this (None: one transformer)
        self.boundary_timestep = (float(config["boundary_ratio"]) * pipe.scheduler.config.num_train_timesteps
                                  if two_experts else None)
        self.guidance_scale_2 = guidance_scale_2
        if self.expand_timesteps:  # TI2V-5B: text- and image-to-video at 720p, 121 frames
            self.tasks = ("t2v", "i2v")
            self.default_steps, self.default_guidance = 50, 5.0
            self.default_height, self.default_width, self.default_num_frames = 704, 1280, 121
        else:
            self.tasks = ("t2v",)
        self.train_experts = train_experts

    @classmethod
    def folder_tasks(cls, index: dict) -> tuple[str, ...]:
        """TI2V-5B (``expand_timesteps``) animates images too; A14B T2V is text-to-video only."""
        return ("t2v", "i2v") if index.get("expand_timesteps", False) else ("t2v",)

    @classmethod
    def folder_problem(cls, index: dict) -> str | None:
        """Wan 2.1 folders share ``WanPipeline``; Wan image-to-video with channel-concatenated image
        latents (I2V-A14B, Wan 2.1 I2V) shares ``WanImageToVideoPipeline`` with TI2V-5B."""
        expand = index.get("expand_timesteps", False)
        if index.get("_class_name") == "WanImageToVideoPipeline" and not expand:
            return ("holds a Wan image-to-video pipeline with channel-concatenated image latents (I2V-A14B or "
                    "Wan 2.1 I2V), which is not supported: Wan 2.2 image-to-video runs on TI2V-5B")
        if index.get("boundary_ratio") is None and not expand:
            return "holds a Wan 2.1 pipeline (neither boundary_ratio nor expand_timesteps); use model.name=wan"
        return None

    def _check_pipeline(self, pipe) -> None:
        config = getattr(pipe, "config", {})
        two_experts = config.get("boundary_ratio") is not None
        transformer_2 = getattr(pipe, "transformer_2", None)
        if two_experts != (transformer_2 is not None):
            raise ValueError("a Wan 2.2 A14B pipeline needs both transformer_2 and boundary_ratio"
                             + (" (transformer_2 is missing)" if two_experts else " (boundary_ratio is not set)"))
        if not two_experts and not config.get("expand_timesteps", False):
            raise ValueError("a Wan 2.1 pipeline (one transformer, neither boundary_ratio nor expand_timesteps): "
                             "load it as 'wan'")
        for transformer in (pipe.transformer, transformer_2):
            if transformer is None:
                continue
            if transformer.config.image_dim is not None or transformer.config.in_channels != pipe.vae.config.z_dim:
                raise ValueError(f"a Wan image-to-video transformer with channel-concatenated image latents "
                                 f"(in_channels {transformer.config.in_channels}, VAE z_dim {pipe.vae.config.z_dim}) "
                                 f"is not supported: Wan 2.2 image-to-video runs on TI2V-5B")

    def _build_denoiser(self, pipe) -> torch.nn.Module:
        return WanExperts(pipe.transformer, getattr(pipe, "transformer_2", None))

    @classmethod
    def from_pretrained(cls, path: str, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None, max_sequence_length: int = 512,
                        flow_shift: float | None = None, train_experts: str = "both",
                        guidance_scale_2: float | None = None, **pipeline_kwargs: Any) -> "Wan22Adapter":
        """Load with ``WanPipeline.from_pretrained`` (hub name or local directory): a T2V-A14B or
        TI2V-5B folder (TI2V-5B's image-to-video needs no other pipeline class: the adapter encodes
        the image itself)."""
        from diffusers import WanPipeline

        pipe = load_pipeline(WanPipeline, path, torch_dtype=torch_dtype, device=device, **pipeline_kwargs)
        return cls(pipe, max_sequence_length=max_sequence_length, flow_shift=flow_shift,
                   train_experts=train_experts, guidance_scale_2=guidance_scale_2)

    # --- experts ----------------------------------------------------------------------------------
    @property
    def train_experts(self) -> str:
        return self._train_experts

    @train_experts.setter
    def train_experts(self, value: str) -> None:
        """Which experts train; the chosen ones are trainable (full fine-tuning by default), the
        others frozen."""
        if value not in TRAIN_EXPERTS:
            raise ValueError(f"train_experts must be one of {', '.join(TRAIN_EXPERTS)}, got {value!r}")
        if value != "both" and self.boundary_timestep is None:
            raise ValueError(f"train_experts={value!r} needs the two experts of Wan 2.2 A14B; this pipeline has "
                             f"one transformer (use 'both')")
        if self._with_lora() and value != getattr(self, "_train_experts", value):
            raise ValueError("choose train_experts before adding a LoRA (the LoRA sits on the experts chosen then)")
        self._train_experts = value
        for index, expert in enumerate(self.base_denoiser.experts):
            expert.requires_grad_(index in self.trained_expert_indices)

    @property
    def trained_expert_indices(self) -> tuple[int, ...]:
        count = len(self.base_denoiser.experts)
        return tuple(i for i in TRAIN_EXPERTS[self._train_experts] if i < count)

    def fine_tune_modules(self) -> list[torch.nn.Module]:
        experts = self.base_denoiser.experts
        return [experts[i] for i in self.trained_expert_indices]

    def forward_may_skip_trainables(self) -> bool:
        return len(self.base_denoiser.experts) > 1

    def expert_at(self, t: Tensor | float) -> int | None:
        """0 (``transformer``) at t >= the boundary timestep, else 1 (``transformer_2``); None for
        one transformer. The comparison is the pipeline's (a float32 tensor against the boundary)."""
        if self.boundary_timestep is None:
            return None
        t = torch.as_tensor(t, dtype=torch.float32)
        if t.numel() != 1:
            raise ValueError(f"expert_at takes one timestep, got {t.numel()}")
        return 0 if bool(t.reshape(()) >= self.boundary_timestep) else 1

    @contextlib.contextmanager
    def pinned_expert(self, index: int | None) -> Iterator[None]:
        if index is not None and not 0 <= index < len(self.base_denoiser.experts):
            raise ValueError(f"expert {index} does not exist: this model has {len(self.base_denoiser.experts)}")
        previous, self._pinned = self._pinned, index
        try:
            yield
        finally:
            self._pinned = previous

    def _routes(self, t: Tensor, batch: int) -> list[tuple[int, Tensor | None]]:
        """(expert, rows) pairs covering a batch at timesteps ``t`` (B,); rows None: all of them."""
        if self._pinned is not None:
            return [(self._pinned, None)]
        if self.boundary_timestep is None:
            return [(0, None)]
        high = _as_batch(t, batch, t.device if isinstance(t, Tensor) else "cpu") >= self.boundary_timestep
        if bool(high.all()):
            return [(0, None)]
        if not bool(high.any()):
            return [(1, None)]
        return [(0, high.nonzero()[:, 0]), (1, (~high).nonzero()[:, 0])]

    # --- interface --------------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None, *, guidance_scale_2: float | None = None,
               images: Sequence | None = None, height: int | None = None,
               width: int | None = None) -> Conditioning:
        """Prompts (and, for image-to-video, one image each: ``images``, or each
        :class:`~pipelines.base.Prompt`'s ``.image``) -> Conditioning. ``guidance_scale_2``: the
        low-noise expert's CFG scale (A14B); without one, the adapter's ``guidance_scale_2``, else
        the default pair (4.0, 3.0) when ``guidance_scale`` is None and ``guidance_scale`` itself
        otherwise (the pipeline's rule). The images are resized to ``height`` x ``width`` (the
        adapter's default size, i.e. the configured model size, when not given)."""
        prompts = prompt_list(prompts)
        images = prompt_images(prompts, images)
        if images is not None and "i2v" not in self.tasks:
            raise ValueError("this Wan 2.2 checkpoint is text-to-video only (tasks: t2v): it takes no images")
        cond = super().encode(prompts, negative_prompt, guidance_scale)
        if self.boundary_timestep is not None:
            if guidance_scale_2 is None:
                guidance_scale_2 = self.guidance_scale_2
            if guidance_scale_2 is None:
                guidance_scale_2 = self.default_guidance_2 if guidance_scale is None else guidance_scale
            cond.extra["guidance_scale_2"] = float(guidance_scale_2)
        if images is not None:
            latents = self.encode_condition_images(images, height, width)
            cond.tensors["image_latents"] = latents
            if cond.negative is not None:
                cond.negative["image_latents"] = latents
        return cond

    def encode_condition_images(self, images: Sequence, height: int | None = None,
                                width: int | None = None) -> Tensor:
        """Images (paths, PIL images or (3, H, W) tensors in [0, 1]) -> the first latent frame of each
        (B, C, 1, h, w), as ``WanImageToVideoPipeline`` makes it: brought to the video size by the
        pipeline's own ``video_processor.preprocess`` (PIL images and paths as the pipeline resizes
        them), the VAE's mean latent of the image (a one-frame video), normalised by the VAE's
        latent mean and std."""
        from PIL import Image

        height, width = height or self.default_height, width or self.default_width
        self.latent_shape(height, width, 1)  # size errors first
        pixels = []
        for image in images:
            if isinstance(image, (str, Path)):
                if not Path(image).is_file():
                    raise FileNotFoundError(f"conditioning image not found: {image}")
                image = Image.open(image).convert("RGB")
            elif isinstance(image, Tensor):
                image = load_image(image, height, width)[None]  # (1, 3, H, W) in [0, 1]
            pixels.append(self.pipe.video_processor.preprocess(image, height=height, width=width))
        pixels = (torch.cat(pixels) + 1) / 2  # vae_encode takes [0, 1]
        latents = vae_encode(self.vae, pixels[:, :, None]).float()  # (B, C, 1, h, w)
        mean, std = self._latent_stats(latents)
        return ((latents - mean) * (1.0 / std)).to(self.device)  # the pipeline's product with 1 / std

    def apply_condition(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """Image-to-video rows: the first latent frame replaced by the image latent (rows of
        ``latents`` and ``cond`` match); other rows unchanged."""
        image = cond.tensors.get("image_latents")
        if image is None:
            return latents
        return torch.cat([image.to(latents.device, latents.dtype), latents[:, :, image.shape[2]:]], dim=2)

    def predict(self, x: Tensor, t: Tensor | float, cond: Conditioning, **kwargs):
        """:meth:`ModelAdapter.predict`, with the low-noise expert's own CFG scale (A14B): rows of
        each expert are guided with that expert's scale (a batch across the boundary is split)."""
        scale_2 = cond.extra.get("guidance_scale_2")
        if not cond.uses_cfg or scale_2 is None or scale_2 == cond.guidance_scale:
            return super().predict(x, t, cond, **kwargs)
        t = _as_batch(t, x.shape[0], x.device)
        routes = self._routes(t, x.shape[0])
        if len(routes) == 1:
            return super().predict(x, t, self._scaled(cond, routes[0][0]), **kwargs)
        uncond = kwargs.pop("uncond", None)
        parts = []
        for expert, rows in routes:
            with self.pinned_expert(expert):
                parts.append(super().predict(x[rows], t[rows], self._scaled(cond.select(rows.cpu()), expert),
                                             uncond=None if uncond is None else uncond[rows.to(uncond.device)],
                                             **kwargs))
        order = torch.argsort(torch.cat([rows for _, rows in routes]))
        if not kwargs.get("return_uncond"):
            return torch.cat(parts)[order.to(x.device)]
        outs, unconds = zip(*parts)
        kept = None if unconds[0] is None else torch.cat(unconds)[order.to(unconds[0].device)]
        return torch.cat(outs)[order.to(x.device)], kept

    def _scaled(self, cond: Conditioning, expert: int) -> Conditioning:
        """``cond`` with expert ``expert``'s CFG scale (its [negative; positive] batch shared)."""
        if expert == 0:
            return cond
        scaled = dataclasses.replace(cond, guidance_scale=float(cond.extra["guidance_scale_2"]))
        if "_cfg_batch" in cond.__dict__:
            scaled.__dict__["_cfg_batch"] = cond.__dict__["_cfg_batch"]
        return scaled

    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        routes = self._routes(t, x.shape[0])
        if len(routes) == 1:
            return self._expert_forward(routes[0][0], x, t, tensors, extra)
        parts = [self._expert_forward(expert, x[rows], t[rows], {k: v[rows.to(v.device)] for k, v in tensors.items()},
                                      extra) for expert, rows in routes]
        order = torch.argsort(torch.cat([rows for _, rows in routes]))
        return torch.cat(parts)[order.to(x.device)]

    def _expert_forward(self, expert: int, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        """One call of one expert, as the pipelines make it: an image-to-video row's first latent
        frame is its image latent, with timestep 0 on its tokens and zero velocity out."""
        image = tensors.get("image_latents")
        if image is not None:
            if image.shape[1] != x.shape[1] or image.shape[3:] != x.shape[3:]:
                raise ValueError(f"the conditioning image's latent {tuple(image.shape[1:])} does not fit video latents "
                                 f"{tuple(x.shape[1:])}: encode the images at the video's height and width")
            x = torch.cat([image.to(x.dtype), x[:, :, image.shape[2]:]], dim=2)
        timestep = self._token_timesteps(t, x, image) if self.expand_timesteps else t
        out = self.denoiser(hidden_states=x, timestep=timestep,
                            encoder_hidden_states=tensors["prompt_embeds"].to(self.dtype), expert=expert,
                            attention_kwargs=extra.get("attention_kwargs"))
        if image is not None:
            out = torch.cat([torch.zeros_like(out[:, :, :image.shape[2]]), out[:, :, image.shape[2]:]], dim=2)
        return out

    def _token_timesteps(self, t: Tensor, x: Tensor, image: Tensor | None) -> Tensor:
        """Per-token timesteps (B, tokens) of ``expand_timesteps``: ``t`` on every token, 0 on the
        tokens of the image's latent frame(s)."""
        _, _, frames, height, width = x.shape
        p_t, p_h, p_w = self.patch_size
        mask = torch.ones(frames // p_t, (height // p_h) * (width // p_w), device=x.device, dtype=torch.float32)
        if image is not None:
            mask[: image.shape[2] // p_t] = 0
        return t.to(torch.float32)[:, None] * mask.reshape(1, -1)

    # --- LoRA on each trained expert --------------------------------------------------------------
    def add_lora(self, rank: int = 32, alpha: float = 64, target_modules: Sequence[str] | None = None,
                 adapter_name: str = "default") -> None:
        """A LoRA (peft, through diffusers' ``add_adapter``) on each expert that trains."""
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(target_modules or self.default_lora_targets))
        for expert in self.fine_tune_modules():
            expert.add_adapter(copy.deepcopy(config), adapter_name=adapter_name)

    def _with_lora(self) -> list[tuple[int, torch.nn.Module]]:
        return [(i, e) for i, e in enumerate(self.base_denoiser.experts) if getattr(e, "_hf_peft_config_loaded", False)]

    @staticmethod
    def _lora_enabled(expert: torch.nn.Module) -> bool:
        from peft.tuners.tuners_utils import BaseTunerLayer

        return any(not m.disable_adapters for m in expert.modules() if isinstance(m, BaseTunerLayer))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Every expert's LoRA off (or, after :meth:`keep_reference_copy`, the reference copy)."""
        if getattr(self, "_reference_copy", None) is not None:
            with super().disable_adapter():
                yield
            return
        switched = [e for _, e in self._with_lora() if self._lora_enabled(e)]
        for expert in switched:
            expert.disable_adapters()
        try:
            yield
        finally:
            for expert in switched:
                expert.enable_adapters()

    def keep_reference_copy(self) -> None:
        """A frozen copy of the experts that train; the frozen ones are shared (not copied)."""
        trained = self.trained_expert_indices
        experts = [copy.deepcopy(e).requires_grad_(False).eval() if i in trained else e
                   for i, e in enumerate(self.base_denoiser.experts)]
        self._reference_copy = WanExperts(*experts)

    def lora_state(self) -> dict[str, Tensor]:
        """The LoRA weights of every expert, keyed ``<component>.<peft key>`` (component
        ``transformer`` or ``transformer_2``)."""
        from peft import get_peft_model_state_dict

        return {f"{EXPERT_COMPONENTS[i]}.{k}": v for i, expert in self._with_lora()
                for k, v in get_peft_model_state_dict(expert).items()}

    def export_lora(self, directory: str | Path, state: dict | None = None) -> Path:
        """Write each trained expert's LoRA in the files the stock pipeline loads: the high-noise
        expert's as ``pytorch_lora_weights.safetensors`` (``pipe.load_lora_weights(dir)``), the
        low-noise expert's as :data:`LOW_NOISE_LORA_FILE` (``pipe.load_lora_weights(dir,
        weight_name=LOW_NOISE_LORA_FILE, load_into_transformer_2=True)``). Without a high-noise
        LoRA the first file holds no weights (the stock call then loads nothing). ``state``: the
        weights of :meth:`lora_state`, already gathered (a sharded model)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.lora_state() if state is None else state
        experts = self.base_denoiser.experts
        for index, component in enumerate(EXPERT_COMPONENTS):
            prefix = component + "."
            layers = {k[len(prefix):]: v.detach().cpu().contiguous() for k, v in state.items() if k.startswith(prefix)}
            file = HIGH_NOISE_LORA_FILE if index == 0 else LOW_NOISE_LORA_FILE
            (directory / file).unlink(missing_ok=True)
            if not layers:
                if index == 0:
                    save_file({}, str(directory / file), metadata={"format": "pt"})
                continue
            metadata = experts[index].peft_config["default"].to_dict()  # keeps lora_alpha / rank on reload
            type(self.pipe).save_lora_weights(str(directory), transformer_lora_layers=layers,
                                              transformer_lora_adapter_metadata=metadata, weight_name=file)
        return directory

    def load_lora(self, directory: str | Path, name: str = "default") -> None:
        """Attach a LoRA folder of :meth:`export_lora` (each expert's file into its expert; a folder
        with only ``pytorch_lora_weights.safetensors``, e.g. a Wan 2.1 or one-expert LoRA, goes
        into ``transformer``) under ``name`` and make it the active one."""
        directory = Path(directory)
        problem = wan22_lora_folder_problem(directory)
        if problem is not None:
            raise ValueError(f"LoRA folder {directory}: {problem}")
        if name in self.lora_names():
            raise ValueError(f"a LoRA named {name!r} is already loaded: give another name")
        files = [(f, into_2) for f, into_2 in ((HIGH_NOISE_LORA_FILE, False), (LOW_NOISE_LORA_FILE, True))
                 if _lora_file_keys(directory / f)]
        if any(into_2 for _, into_2 in files) and len(self.base_denoiser.experts) < 2:
            raise ValueError(f"LoRA folder {directory} holds a low-noise expert's LoRA ({LOW_NOISE_LORA_FILE}), "
                             f"but this {self.name} model has one transformer")
        try:
            for file, into_2 in files:
                self.pipe.load_lora_weights(str(directory), weight_name=file, adapter_name=name,
                                            **({"load_into_transformer_2": True} if into_2 else {}))
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # shapes / layers of another model
            lines = str(err).strip().splitlines()
            problem = next((line.strip() for line in lines if "size mismatch" in line),
                           lines[0] if lines else type(err).__name__)
            for expert in self.base_denoiser.experts:  # a half-attached LoRA must not stay
                if name in (getattr(expert, "peft_config", None) or {}):
                    expert.delete_adapters(name)
            raise ValueError(f"LoRA folder {directory} does not fit this {self.name} model: {problem}") from None
        self.use_lora(name)

    def lora_names(self) -> list[str]:
        names: list[str] = []
        for expert in self.base_denoiser.experts:
            names += [n for n in (getattr(expert, "peft_config", None) or {}) if n not in names]
        return names

    def use_lora(self, name: str | None) -> None:
        """Make the LoRA ``name`` active on the experts that have it (the others run their base
        weights); None: every LoRA off."""
        from align.errors import unknown_name_error

        if name is not None and name not in self.lora_names():
            raise unknown_name_error("LoRA", name, self.lora_names())
        for _, expert in self._with_lora():
            if name is not None and name in expert.peft_config:
                expert.set_adapter(name)
                expert.enable_adapters()
            else:
                expert.disable_adapters()


def _lora_file_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file ([] when it is missing)."""
    from safetensors import safe_open

    if not path.is_file():
        return []
    with safe_open(str(path), framework="pt") as f:
        return list(f.keys())


def wan22_lora_folder_problem(directory: str | Path) -> str | None:
    """Why a Wan 2.2 LoRA folder cannot be loaded (one line), found without the model: the checks
    of :func:`pipelines.base.lora_folder_problem` on ``pytorch_lora_weights.safetensors``, and the
    low-noise expert's file readable when present. None when it looks loadable."""
    from safetensors import safe_open

    from pipelines.base import lora_folder_problem

    problem = lora_folder_problem(directory)
    if problem is not None:
        return problem
    low = Path(directory) / LOW_NOISE_LORA_FILE
    if low.exists():
        try:
            with safe_open(str(low), framework="pt") as f:
                list(f.keys())
        except Exception as err:  # noqa: BLE001 - any failure to parse means unusable
            return f"{low.name} is not readable safetensors (corrupt or truncated: {str(err).splitlines()[0]})"
    return None
