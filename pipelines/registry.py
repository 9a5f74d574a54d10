"""Adapters by name. Modules are imported only when their adapter is loaded, so listing adapters or
loading the toy model never imports diffusers."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any

from align.errors import unknown_name_error
from pipelines.base import ModelAdapter

#: adapter name -> "module:Class"; every class offers ``from_pretrained(path, **kwargs)``
ADAPTERS: dict[str, str] = {
    "toy": "pipelines.toy:ToyAdapter",
    "toy_video": "pipelines.toy_video:ToyVideoAdapter",
    "toy_edit": "pipelines.toy_edit:ToyEditAdapter",
    "sd3": "pipelines.sd3:SD3Adapter",
    "flux": "pipelines.flux:FluxAdapter",
    "flux_kontext": "pipelines.flux_kontext:FluxKontextAdapter",
    "wan": "pipelines.wan:WanAdapter",
    "sd": "pipelines.sd_unet:SDAdapter",
    "sdxl": "pipelines.sd_unet:SDXLAdapter",
    "qwen_image": "pipelines.qwen_image:QwenImageAdapter",
    "qwen_image_edit": "pipelines.qwen_image_edit:QwenImageEditAdapter",
    "flux2": "pipelines.flux2:Flux2Adapter",
    "flux2_klein": "pipelines.flux2:Flux2KleinAdapter",
    "z_image": "pipelines.z_image:ZImageAdapter",
    "wan22": "pipelines.wan:Wan22Adapter",
    "hunyuan_video15": "pipelines.hunyuan_video15:HunyuanVideo15Adapter",
    "hunyuan_video15_i2v": "pipelines.hunyuan_video15:HunyuanVideo15I2VAdapter",
}

#: adapters of flow-matching (velocity) models; the others are DDPM-family UNets
FLOW_ADAPTERS = ("toy", "toy_video", "toy_edit", "sd3", "flux", "flux_kontext", "wan", "qwen_image", "qwen_image_edit",
                 "flux2", "flux2_klein", "z_image", "wan22",
                 "hunyuan_video15", "hunyuan_video15_i2v")
#: held-out rewards a run watches when its config names none (``heldout_rewards: null``): the toy
#: model's digits are read by an independent judge, so hacking the digit classifier shows
DEFAULT_HELDOUT_REWARDS: dict[str, list] = {"toy": ["digit_judge"], "toy_video": ["frame_judge"],
                                            "toy_edit": ["edit_judge"]}

#: the checkpoint each adapter loads when no path is given (hub names)
DEFAULT_CHECKPOINTS: dict[str, str] = {
    "sd3": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
    "flux_kontext": "black-forest-labs/FLUX.1-Kontext-dev",
    "wan": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "sd": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "qwen_image": "Qwen/Qwen-Image",
    "qwen_image_edit": "Qwen/Qwen-Image-Edit-2509",
    "flux2": "black-forest-labs/FLUX.2-dev",
    "flux2_klein": "black-forest-labs/FLUX.2-klein-4B",
    "z_image": "Tongyi-MAI/Z-Image-Turbo",
    "wan22": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "hunyuan_video15": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v",
    "hunyuan_video15_i2v": "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_i2v",
}


#: the diffusers pipeline classes each adapter loads (a folder's model_index.json names its class)
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    "sd3": ("StableDiffusion3Pipeline",),
    "flux": ("FluxPipeline",),
    "flux_kontext": ("FluxKontextPipeline",),
    "wan": ("WanPipeline",),
    "sd": ("StableDiffusionPipeline",),
    "sdxl": ("StableDiffusionXLPipeline",),
    "qwen_image": ("QwenImagePipeline",),
    "qwen_image_edit": ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"),
    "flux2": ("Flux2Pipeline",),
    "flux2_klein": ("Flux2KleinPipeline",),
    "z_image": ("ZImagePipeline",),
    "wan22": ("WanPipeline", "WanImageToVideoPipeline"),
    "hunyuan_video15": ("HunyuanVideo15Pipeline",),
    "hunyuan_video15_i2v": ("HunyuanVideo15ImageToVideoPipeline",),
}


#: components an adapter needs even where its pipeline class lists them as optional (Wan's pipeline
#: may be saved without a transformer; no adapter can train one)
ADAPTER_COMPONENTS: dict[str, tuple[str, ...]] = {"sd": ("unet", "vae"), "sdxl": ("unet", "vae")}


def _looks_local(path: str) -> bool:
    """A path that names a folder on this machine (not a hub name ``owner/model``)."""
    return Path(path).expanduser().exists() or path.startswith((".", "/", "~")) or path.count("/") != 1 \
        or "\\" in path


def model_folder_problem(name: str, path: str | None) -> str | None:
    """Why ``path`` cannot load as adapter ``name`` (one line), found from the folder's
    ``model_index.json`` alone, before anything heavy: a missing folder, a folder that is not a
    diffusers pipeline, a pipeline of another family (naming the adapter that loads it), or a
    component the pipeline needs that the folder lacks. None for loadable-looking folders and for
    hub names (checked by the download)."""
    import json

    key = name.strip().lower()
    if path is None or key not in PIPELINE_CLASSES or not _looks_local(str(path)):
        return None
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return f"{path} not found"
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return f"{path} has no model_index.json: not a diffusers pipeline folder"
    try:
        index = json.loads(index_file.read_text())
    except ValueError as err:
        return f"{index_file} is not valid JSON ({str(err).splitlines()[0]})"
    found = index.get("_class_name")
    if found not in PIPELINE_CLASSES[key]:
        owner = next((n for n, classes in PIPELINE_CLASSES.items() if found in classes), None)
        hint = f"; use model.name={owner}" if owner else ""
        return f"{path} holds a {found}, not a {key} model ({' or '.join(PIPELINE_CLASSES[key])}){hint}"
    problem = adapter_class(key).folder_problem(index)
    if problem is not None:
        return f"{path} {problem}"
    import diffusers

    pipeline_cls = getattr(diffusers, found, None)
    if pipeline_cls is None:
        return None
    expected, _ = pipeline_cls._get_signature_keys(pipeline_cls)
    optional = set(getattr(pipeline_cls, "_optional_components", []) or [])
    needed = (set(expected) - optional) | set(ADAPTER_COMPONENTS.get(key, ("transformer", "vae")))
    for component in sorted(needed):
        entry = index.get(component)
        if not isinstance(entry, (list, tuple)):
            return f"{path} has no {component} (model_index.json), which {found} needs"
        if entry[0] is None:  # saved without it on purpose (SD3 without T5): loaded as None
            continue
        if not (folder / component).is_dir():
            return f"{path} lacks the folder {component}/ that its model_index.json names"
    return None


def model_tasks(name: str, path: str | None) -> tuple[str, ...]:
    """The tasks of adapter ``name`` on the checkpoint at ``path``, read from its
    ``model_index.json`` before anything loads (a family may hold text-to-video-only checkpoints
    beside text-and-image-to-video ones); the family's tasks when the folder is not local."""
    import json

    cls = adapter_class(name)
    index_file = Path(path).expanduser() / "model_index.json" if path else None
    if index_file is None or not index_file.is_file():
        return tuple(cls.tasks)
    try:
        index = json.loads(index_file.read_text())
    except ValueError:
        return tuple(cls.tasks)
    return tuple(cls.folder_tasks(index))


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
