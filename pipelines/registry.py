"""Adapters by name. Modules are imported only when their adapter is loaded, so listing adapters or
loading the toy model never imports diffusers."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from align.errors import unknown_name_error
from pipelines.base import ModelAdapter

#: adapter name -> "module:Class"; every class offers ``from_pretrained(path, **kwargs)``
ADAPTERS: dict[str, str] = {
    "toy": "pipelines.toy:ToyAdapter",
    "toy_video": "pipelines.toy_video:ToyVideoAdapter",
    "sd3": "pipelines.sd3:SD3Adapter",
    "flux": "pipelines.flux:FluxAdapter",
    "wan": "pipelines.wan:WanAdapter",
    "sd": "pipelines.sd_unet:SDAdapter",
    "sdxl": "pipelines.sd_unet:SDXLAdapter",
    "qwen_image": "pipelines.qwen_image:QwenImageAdapter",
    "flux2": "pipelines.flux2:Flux2Adapter",
    "flux2_klein": "pipelines.flux2:Flux2KleinAdapter",
    "z_image": "pipelines.z_image:ZImageAdapter",
    "wan22": "pipelines.wan:Wan22Adapter",
    "hunyuan_video15": "pipelines.hunyuan_video15:HunyuanVideo15Adapter",
    "hunyuan_video15_i2v": "pipelines.hunyuan_video15:HunyuanVideo15I2VAdapter",
}

#: adapters of flow-matching (velocity) models; the others are DDPM-family UNets
FLOW_ADAPTERS = ("toy", "toy_video", "sd3", "flux", "wan", "qwen_image", "flux2", "flux2_klein", "z_image", "wan22",
                 "hunyuan_video15", "hunyuan_video15_i2v")
#: held-out rewards a run watches when its config names none (``heldout_rewards: null``): the toy
#: model's digits are read by an independent judge, so hacking the digit classifier shows
DEFAULT_HELDOUT_REWARDS: dict[str, list] = {"toy": ["digit_judge"]}

#: the checkpoint each adapter loads when no path is given (hub names)
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
    "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "qwen_image": "Qwen/Qwen-Image",
    "flux2": "black-forest-labs/FLUX.2-dev",
    "flux2_klein": "black-forest-labs/FLUX.2-klein-4B",
    "z_image": "Tongyi-MAI/Z-Image-Turbo",
    "wan22": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "hunyuan_video15": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
    "hunyuan_video15_i2v": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v",
}


def list_adapters() -> list[str]:
    return sorted(ADAPTERS)


def check_adapter_name(name, field: str = "model.name") -> None:
    """A one-line ConfigError naming ``field`` and the closest adapter unless ``name`` is one."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ADAPTERS:
        raise unknown_name_error("model", name, ADAPTERS, field=field)


def adapter_class(name: str) -> type[ModelAdapter]:
    """The adapter class registered as ``name`` (imported on first use)."""
    check_adapter_name(name)
    key = name.strip().lower()
    module_name, class_name = ADAPTERS[key].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def load_adapter(name: str, path: str | None = None, **kwargs: Any) -> ModelAdapter:
    """``load_adapter("sd3", "stabilityai/stable-diffusion-3.5-medium", torch_dtype=torch.bfloat16)``:
    the adapter ``name`` loaded from ``path`` (a hub name or local directory; without one, the
    family's :data:`DEFAULT_CHECKPOINTS` entry, and nothing for the toy model). ``kwargs`` go to
    the adapter's ``from_pretrained``."""
    cls = adapter_class(name)
    # accept ``dtype`` and ``torch_dtype`` alike, whichever the adapter's from_pretrained names
    params = inspect.signature(cls.from_pretrained).parameters
    for given, wanted in (("dtype", "torch_dtype"), ("torch_dtype", "dtype")):
        if given in kwargs and given not in params and wanted in params and wanted not in kwargs:
            kwargs[wanted] = kwargs.pop(given)
    key = name.strip().lower()
    if path is None:
        path = DEFAULT_CHECKPOINTS.get(key)
    if path is None:
        return cls.from_pretrained(**kwargs)
    return cls.from_pretrained(path, **kwargs)
