"""Helpers every diffusers adapter (SD3, FLUX, Wan, SD 1.x / SDXL) shares: pipeline loading, the
flow-matching schedule, prompt lists, freezing, and the VAE encoder."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from pipelines.base import Schedule


class PackedLatentGrid:
    """The image grid of packed latents (FLUX.1, FLUX.2, Qwen-Image: 2x2 patches of the VAE latent
    as a token sequence, (B, (H/16) * (W/16), 4C) at an 8x VAE). A packed latent does not say its
    image's shape, so it comes from, in order: the size given, the Conditioning's ``latent_grid``,
    the adapter's default size (the configured ``model.height`` / ``model.width``) when the token
    count matches, else a square. Needs ``vae_scale_factor``, ``default_height`` and ``default_width``."""

    vae_scale_factor: int
    default_height: int
    default_width: int

    def _grid_of(self, height: int, width: int) -> tuple[int, int]:
        """(H/16, W/16) of an image of ``height`` x ``width`` pixels (multiples of 16, else a ValueError)."""
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {height}x{width}")
        return height // multiple, width // multiple

    def _grid_for(self, seq_len: int, extra: dict, height: int | None = None,
                  width: int | None = None) -> tuple[int, int]:
        """The grid of ``seq_len`` tokens; it depends on nothing an earlier call left behind."""
        if height is not None or width is not None:
            return self._grid_of(height or self.default_height, width or self.default_width)
        grid = extra.get("latent_grid")
        if grid is not None and grid[0] * grid[1] == seq_len:
            return tuple(grid)
        default = self._grid_of(self.default_height, self.default_width)
        if default[0] * default[1] == seq_len:
            return default
        side = math.isqrt(seq_len)
        if side * side != seq_len:
            raise ValueError(f"cannot tell the image size of a packed latent with {seq_len} tokens: pass "
                             "height / width (decode), encode(..., height=, width=), or set the model size "
                             "(model.height / model.width)")
        return side, side


def _dtype_keyword() -> str:
    """diffusers renamed ``from_pretrained(torch_dtype=...)`` to ``dtype=...`` (the old name now
    warns); use whichever the installed version takes."""
    from diffusers.pipelines import pipeline_utils

    return "dtype" if hasattr(pipeline_utils, "_resolve_dtype") else "torch_dtype"


def load_pipeline(pipeline_cls, path: str, *, torch_dtype: torch.dtype | None = None,
                  device: str | torch.device | None = None, **kwargs: Any):
    """``pipeline_cls.from_pretrained(path)`` that also loads checkpoints saved without some
    components (for example SD3 without its T5 encoder): components recorded as ``null`` in
    ``model_index.json`` are passed as ``None`` unless given in ``kwargs``. ``torch_dtype`` (or
    ``dtype`` in ``kwargs``) may be one dtype or a dict per component, as diffusers takes it."""
    try:
        index = pipeline_cls.load_config(path, local_files_only=kwargs.get("local_files_only", False))
    except Exception:  # noqa: BLE001 - from_pretrained below reports the real problem
        index = {}
    for name, value in index.items():
        if name.startswith("_") or name in kwargs:
            continue
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] is None and value[1] is None:
            kwargs[name] = None
    dtype = kwargs.pop("dtype", None) if torch_dtype is None else torch_dtype
    if dtype is not None:
        kwargs[_dtype_keyword()] = dtype
    pipe = pipeline_cls.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def freeze_except(pipe, keep: torch.nn.Module) -> None:
    """Put every module of ``pipe`` in eval mode and freeze all but ``keep`` (the denoiser)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
            if component is not keep:
                component.requires_grad_(False)


def prompt_list(prompts: str | Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("encode() needs at least one prompt")
    return prompts


def negative_list(negative_prompt: str | Sequence[str] | None, batch: int) -> list[str]:
    """The negative prompt as a list of ``batch`` strings (``None`` means the empty prompt)."""
    if negative_prompt is None:
        negative_prompt = ""
    if isinstance(negative_prompt, str):
        return [negative_prompt] * batch
    negative_prompt = list(negative_prompt)
    if len(negative_prompt) != batch:
        raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch} prompts")
    return negative_prompt


def is_flow_scheduler(scheduler) -> bool:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = scheduler.config
    return (isinstance(scheduler, FlowMatchEulerDiscreteScheduler) or bool(config.get("use_flow_sigmas", False))
            or config.get("prediction_type", None) == "flow_prediction")


def flow_schedule(scheduler, num_steps: int, **set_timesteps_kwargs: Any) -> Schedule:
    """A flow schedule from a fresh copy of ``scheduler`` (the pipeline's own scheduler is left
    untouched): ``levels`` are its sigmas (1 -> 0, the final 0 included, float32, length T+1) and
    ``timesteps`` the values it feeds the model (``sigma * num_train_timesteps``).

    Flow-matching schedulers other than ``FlowMatchEulerDiscreteScheduler`` (UniPC with
    ``use_flow_sigmas``, as Wan ships) round their timesteps to integers for their own multistep
    solver; here timesteps are the exact ``sigma * num_train_timesteps`` of the same sigmas.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not is_flow_scheduler(scheduler):
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler")
    fresh = type(scheduler).from_config(scheduler.config)
    fresh.set_timesteps(num_steps, **set_timesteps_kwargs)
    sigmas = torch.as_tensor(fresh.sigmas).detach().to("cpu", torch.float32).clone()
    if isinstance(fresh, FlowMatchEulerDiscreteScheduler) and fresh.timesteps.is_floating_point():
        timesteps = fresh.timesteps.detach().to("cpu", torch.float32).clone()
    else:
        timesteps = sigmas[:-1] * fresh.config.num_train_timesteps
    if len(sigmas) != len(timesteps) + 1:
        raise ValueError(f"{type(scheduler).__name__} gave {len(sigmas)} sigmas for {len(timesteps)} steps")
    return Schedule(timesteps=timesteps, levels=sigmas, kind="flow")



def vae_encode(vae, images: Tensor) -> Tensor:
    """Images in [0, 1] (B, 3, H, W), or videos for a video VAE (B, 3, F, H, W), -> the VAE latent
    distribution's mean (deterministic), before any scaling."""
    pixels = (images.to(vae.device, vae.dtype) * 2 - 1).clamp(-1, 1)
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean


def open_image(image):
    """A conditioning image as a diffusers image processor takes it: a path -> the RGB PIL image (a
    missing file is a FileNotFoundError naming it), a (3, H, W) / (H, W, 3) tensor in [0, 1] -> a
    (1, 3, H, W) float tensor; a PIL image as it is."""
    from pathlib import Path

    from pipelines.base import load_image

    if isinstance(image, (str, Path)):
        from PIL import Image

        if not Path(image).is_file():
            raise FileNotFoundError(f"conditioning image not found: {image}")
        return Image.open(image).convert("RGB")
    if isinstance(image, Tensor):
        image = image.permute(2, 0, 1) if image.ndim == 3 and image.shape[0] != 3 else image
        return load_image(image, image.shape[-2], image.shape[-1])[None]
    return image.convert("RGB") if hasattr(image, "convert") else image


def image_size(image) -> tuple[int, int]:
    """(height, width) of a PIL image or a (1, 3, H, W) tensor."""
    return (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[-2:])
