"""CLIP backbones for the rewards: loading (open-clip-torch or transformers) and torch preprocessing.

:class:`ClipBackbone` wraps either an ``open_clip`` model or a transformers ``CLIPModel`` behind the
same three calls -- ``encode_image`` (images in [0, 1], differentiable), ``encode_text`` (cached, no
gradient) and ``logit_scale`` -- with the preprocessing of the checkpoint (resize, crop or pad,
normalise) done in torch, so reward gradients reach the pixels.

Loading:

* :func:`load_open_clip` -- an open_clip architecture by name (``"ViT-L-14"``), by a JSON config
  file, or by a config dict (tests build tiny ones in code); weights from a local file (checked key by
  key, shape by shape), or an open_clip pretrained tag / ``hf-hub:`` name when online.
* :func:`load_hf_clip` -- a transformers ``CLIPModel`` directory or hub name (PickScore), with its
  tokenizer and image-processor settings.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from align.errors import ConfigError
from rewards.loading import CheckpointError, freeze, load_into, parse_dtype

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_MODES = ("shortest", "longest", "squash")


# --- preprocessing --------------------------------------------------------------------------------
def _pair(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        return int(size[0]), int(size[1])
    return int(size), int(size)


def resize_to(images: Tensor, size, *, mode: str = "shortest", interpolation: str = "bicubic",
              fill: float = 0.0, resize_size: int | None = None) -> Tensor:
    """Resize (B, C, H, W) to ``size`` (int or (h, w)) in torch (differentiable):

    * ``shortest``: scale the short side to ``resize_size`` (default: covering ``size``), then
      centre-crop ``size`` (CLIP / torchvision ``Resize(s) + CenterCrop(s)``);
    * ``longest``: scale so the image fits inside ``size``, then pad centred with ``fill``
      (HPSv2's ``resize_longest_max``);
    * ``squash``: resize to ``size`` ignoring the aspect ratio.
    """
    if mode not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode {mode!r} (valid: {', '.join(RESIZE_MODES)})")
    th, tw = _pair(size)
    h, w = images.shape[-2:]
    if (h, w) == (th, tw) and (resize_size is None or resize_size == min(th, tw)):
        return images
    kwargs: dict[str, Any] = {"mode": interpolation}
    if interpolation in ("bilinear", "bicubic"):
        kwargs.update(align_corners=False, antialias=True)
    if mode == "squash":
        return F.interpolate(images, size=(th, tw), **kwargs)
    if mode == "shortest":
        short = resize_size if resize_size is not None else None
        if short is None:  # the smallest scale at which the image covers the crop
            nh, nw = (th, max(tw, int(w * th / h))) if th / h >= tw / w else (max(th, int(h * tw / w)), tw)
        else:  # torchvision: the short side becomes `short`, the long one is truncated
            nh, nw = (short, int(w * short / h)) if h <= w else (int(h * short / w), short)
    else:
        scale = min(th / h, tw / w)
        nh, nw = min(th, max(1, round(h * scale))), min(tw, max(1, round(w * scale)))
    x = F.interpolate(images, size=(nh, nw), **kwargs) if (nh, nw) != (h, w) else images
    if mode == "shortest":
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return x[..., top:top + th, left:left + tw]
    pad_h, pad_w = th - nh, tw - nw
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)


def normalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(-1, 1, 1)
    return (images - mean_t) / std_t


def to_rgb(images: Tensor) -> Tensor:
    """(B, 1 or 3, H, W) -> (B, 3, H, W)."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def clip_preprocess(images: Tensor, size=224, mean=OPENAI_MEAN, std=OPENAI_STD, *,
                    interpolation: str = "bicubic", resize_mode: str = "shortest",
                    resize_size: int | None = None) -> Tensor:
    """Images in [0, 1] -> CLIP input, in torch: resize (bicubic, antialiased), crop or pad, normalise."""
    x = to_rgb(images.float())
    x = resize_to(x, size, mode=resize_mode, interpolation=interpolation, resize_size=resize_size)
    return normalize(x, mean, std)


# --- the backbone ---------------------------------------------------------------------------------
class ClipBackbone(nn.Module):
    """An open_clip or transformers CLIP model, frozen, with its tokenizer and preprocessing."""

    def __init__(self, model: nn.Module, tokenizer: Callable, *, backend: str, image_size, mean=OPENAI_MEAN,
                 std=OPENAI_STD, interpolation: str = "bicubic", resize_mode: str = "shortest",
                 dtype: str | torch.dtype = "float32", chunk_size: int = 64, name: str = "clip",
                 resize_size: int | None = None) -> None:
        super().__init__()
        if backend not in ("open_clip", "transformers"):
            raise ConfigError(f"unknown CLIP backend {backend!r} (valid: open_clip, transformers)")
        if resize_mode not in RESIZE_MODES:
            raise ConfigError(f"unknown resize mode {resize_mode!r} (valid: {', '.join(RESIZE_MODES)})")
        self.dtype = parse_dtype(dtype)
        self.model = freeze(model).to(self.dtype)
        self.tokenizer = tokenizer
        self.backend = backend
        self.image_size = _pair(image_size)
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.resize_mode = interpolation, resize_mode
        self.resize_size = None if resize_size is None else int(resize_size)
        self.chunk_size = int(chunk_size)
        self.name = name
        self._text_cache: dict[tuple[str, str], Tensor] = {}

    # features
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def embed_dim(self) -> int:
        with torch.no_grad():
            probe = torch.zeros(1, 3, *self.image_size, device=self.device)
            return int(self._image_features(probe).shape[-1])

    def preprocess(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.image_size, self.mean, self.std, interpolation=self.interpolation,
                               resize_mode=self.resize_mode, resize_size=self.resize_size)

    def _image_features(self, pixels: Tensor) -> Tensor:
        pixels = pixels.to(self.device, self.dtype)
        if self.backend == "open_clip":
            return self.model.encode_image(pixels)
        return _pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, D) float32 image embeddings (not normalised) of images (B, C, H, W) in [0, 1]."""
        pixels = self.preprocess(images)
        feats = [self._image_features(chunk) for chunk in pixels.split(self.chunk_size)]
        return torch.cat(feats).float()

    def _text_features(self, prompts: list[str]) -> Tensor:
        if self.backend == "open_clip":
            tokens = self.tokenizer(prompts).to(self.device)
            return self.model.encode_text(tokens)
        enc = self.tokenizer(prompts, padding=True, truncation=True, max_length=_max_length(self.tokenizer, self.model),
                             return_tensors="pt")
        return _pooled(self.model.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                    attention_mask=enc["attention_mask"].to(self.device)))

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """(B, D) float32 text embeddings (not normalised); cached per prompt."""
        key_dev = str(self.device)
        todo = sorted({p for p in prompts if (p, key_dev) not in self._text_cache})
        if todo:
            if len(self._text_cache) > 8192:
                self._text_cache.clear()
            feats = torch.cat([self._text_features(list(chunk)) for chunk in _chunks(todo, self.chunk_size)])
            for prompt, feat in zip(todo, feats.float()):
                self._text_cache[(prompt, key_dev)] = feat
        return torch.stack([self._text_cache[(p, key_dev)] for p in prompts])

    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.detach().float().exp().reshape(())

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """cos(image embedding, text embedding) (B,), differentiable in ``images``."""
        img = F.normalize(self.encode_image(images), dim=-1)
        txt = F.normalize(self.encode_text(prompts), dim=-1).to(img.device)
        return (img * txt).sum(-1)

    def _apply(self, fn, *args, **kwargs):
        self._text_cache.clear()
        return super()._apply(fn, *args, **kwargs)


def _pooled(out) -> Tensor:
    """transformers >= 5 returns a model output whose ``pooler_output`` holds the projection."""
    return out if isinstance(out, Tensor) else out.pooler_output


def _max_length(tokenizer, model) -> int:
    cfg = getattr(getattr(model, "config", None), "text_config", None)
    limit = getattr(cfg, "max_position_embeddings", 77)
    return min(int(getattr(tokenizer, "model_max_length", limit) or limit), int(limit))


def _chunks(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


# --- open_clip ------------------------------------------------------------------------------------
def _open_clip_config(model: str | dict | Path) -> tuple[dict, dict, str]:
    """(model config, preprocess config, display name) of a name, a JSON file or a dict."""
    import open_clip

    if isinstance(model, dict):
        cfg = dict(model)
        return dict(cfg.get("model_cfg", cfg)), dict(cfg.get("preprocess_cfg", {})), "custom CLIP config"
    text = str(model)
    if text.endswith(".json") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise CheckpointError(f"CLIP config: no file at {path} (expected an open_clip model config JSON)")
        cfg = json.loads(path.read_text())
        if "model_cfg" not in cfg and not {"embed_dim", "vision_cfg", "text_cfg"} <= set(cfg):
            raise CheckpointError(f"CLIP config: {path} is not an open_clip model config "
                                  "(expected keys embed_dim, vision_cfg, text_cfg or model_cfg)")
        return dict(cfg.get("model_cfg", cfg)), dict(cfg.get("preprocess_cfg", {})), str(path)
    cfg = open_clip.get_model_config(text)
    if cfg is None:
        from align.errors import unknown_name_error

        raise unknown_name_error("open_clip model", text, open_clip.list_models())
    return dict(cfg), {}, text


def _build_open_clip(model_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    import open_clip

    model_cfg = dict(model_cfg)
    model_cfg.pop("custom_text", None)
    quick_gelu = model_cfg.pop("quick_gelu", quick_gelu)
    text_cfg = model_cfg.get("text_cfg", {})
    custom = "hf_model_name" in text_cfg
    cls = open_clip.CustomTextCLIP if custom else open_clip.CLIP
    try:
        return cls(**model_cfg, quick_gelu=quick_gelu)
    except TypeError as err:
        raise ConfigError(f"bad open_clip model config: {err}") from None


def _open_clip_tokenizer(model_cfg: dict, name: str | None):
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    context = int(text_cfg.get("context_length", 77))
    if text_cfg.get("hf_tokenizer_name"):
        return open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context)
    if name is not None and open_clip.get_model_config(name) is not None:
        return open_clip.get_tokenizer(name)
    vocab = int(text_cfg.get("vocab_size", 49408))
    if vocab < 49408:
        raise ConfigError(f"CLIP text vocab_size {vocab} is smaller than the CLIP BPE tokenizer's 49408")
    return open_clip.SimpleTokenizer(context_length=context)


def load_open_clip(model: str | dict | Path = "ViT-L-14", pretrained: str | Path | None = None, *,
                   device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                   resize_mode: str | None = None, what: str = "CLIP backbone") -> ClipBackbone:
    """An open_clip model, frozen, as a :class:`ClipBackbone`.

    ``model``: an open_clip architecture name (``open_clip.list_models()``; use the ``-quickgelu``
    variant for OpenAI-trained weights given as a local file), an open_clip config JSON file (the
    ``open_clip_config.json`` of a hub repository works), or such a config as a dict.
    ``pretrained``: a local checkpoint file (``.safetensors`` / ``.bin`` / ``.pt``; a
    ``{"state_dict": ...}`` wrapper is fine), checked against the architecture; an open_clip pretrained
    tag (``"openai"``, ``"laion2b_s32b_b79k"``) or ``"hf-hub:org/name"`` (needs the network); or None
    for random weights (tests).
    """
    import open_clip

    model_cfg, preprocess_cfg, display = _open_clip_config(model)
    is_name = isinstance(model, str) and not str(model).endswith(".json") and not Path(str(model)).is_file()
    name = model if is_name else None
    local = pretrained is not None and (Path(str(pretrained)).exists() or any(s in str(pretrained) for s in "/\\")
                                        or Path(str(pretrained)).suffix in (".pt", ".pth", ".bin", ".safetensors"))
    if pretrained is None or local:
        net = _build_open_clip(model_cfg)
        if pretrained is None:
            if name is not None:
                warnings.warn(f"{what}: open_clip {name!r} built with random weights (no pretrained given)",
                              stacklevel=2)
        else:
            load_into(net, pretrained, f"{what} ({display})",
                      ignore=("input_resolution", "context_length", "vocab_size",
                              "text.transformer.embeddings.position_ids"))
    else:
        if name is None:
            raise ConfigError(f"{what}: pretrained tag {pretrained!r} needs an open_clip model name, not a config")
        tags = open_clip.list_pretrained_tags_by_model(name)
        if not str(pretrained).startswith("hf-hub:") and str(pretrained) not in tags:
            raise ConfigError(f"{what}: {pretrained!r} is neither a local file nor a pretrained tag of "
                              f"{name!r} (tags: {', '.join(tags) or 'none'})")
        try:
            net = open_clip.create_model(name, pretrained=str(pretrained), device="cpu")
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointError(f"{what}: could not fetch open_clip {name!r} weights {pretrained!r} "
                                  f"(offline? give a local checkpoint file instead): {first}") from None
        preprocess_cfg = {**getattr(net.visual, "preprocess_cfg", {}), **preprocess_cfg}
    visual_cfg = getattr(net.visual, "preprocess_cfg", {}) or {}
    image_size = preprocess_cfg.get("size", visual_cfg.get("size", net.visual.image_size))
    tokenizer = _open_clip_tokenizer(model_cfg, name)
    backbone = ClipBackbone(
        net, tokenizer, backend="open_clip", image_size=image_size,
        mean=preprocess_cfg.get("mean", visual_cfg.get("mean", OPENAI_MEAN)),
        std=preprocess_cfg.get("std", visual_cfg.get("std", OPENAI_STD)),
        interpolation=preprocess_cfg.get("interpolation", visual_cfg.get("interpolation", "bicubic")),
        resize_mode=resize_mode or preprocess_cfg.get("resize_mode", "shortest"),
        dtype=dtype, name=display)
    return backbone.to(device)


# --- transformers ---------------------------------------------------------------------------------
def load_hf_clip(model_path: str | Path, processor_path: str | Path | None = None, *,
                 device: str | torch.device = "cpu", dtype: str | torch.dtype = "float32",
                 what: str = "CLIP model") -> ClipBackbone:
    """A transformers ``CLIPModel`` (a local directory or a hub name) with the tokenizer and image
    settings of ``processor_path`` (default: the model's own). Missing or mismatched weights are an
    error, not a silent random initialisation."""
    from transformers import AutoTokenizer, CLIPModel

    processor_path = processor_path or model_path
    for path in (model_path, processor_path):
        text = str(path)
        if (text.startswith((".", "/", "~")) or Path(text).suffix) and not Path(text).expanduser().exists():
            raise CheckpointError(f"{what}: no model directory at {text} (expected a transformers CLIPModel "
                                  "directory with config.json and weights)")
    try:
        model, info = CLIPModel.from_pretrained(str(model_path), output_loading_info=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what}: cannot load a CLIPModel from {model_path}: {first}") from None
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    mismatched = sorted(info.get("mismatched_keys", []), key=str)
    if missing or mismatched:
        names = [str(m[0] if isinstance(m, (tuple, list)) else m) for m in list(mismatched)[:3]]
        detail = (f"missing keys {', '.join(sorted(missing)[:3])}" if missing else
                  f"mismatched shapes at {', '.join(names)}")
        raise CheckpointError(f"{what}: weights in {model_path} do not fit its CLIPModel config: {detail}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(processor_path))
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{what}: no CLIP tokenizer in {processor_path}: {first}") from None
    size, crop, mean, std, interpolation = _hf_image_settings(processor_path, model)
    if crop is not None:
        resize_size = size if isinstance(size, int) else None
        backbone = ClipBackbone(model, tokenizer, backend="transformers", image_size=crop, mean=mean, std=std,
                                interpolation=interpolation, resize_mode="shortest", resize_size=resize_size,
                                dtype=dtype, name=str(model_path))
    else:
        backbone = ClipBackbone(model, tokenizer, backend="transformers", image_size=size, mean=mean, std=std,
                                interpolation=interpolation, resize_mode="squash", dtype=dtype, name=str(model_path))
    return backbone.to(device)


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _hf_image_settings(path, model):
    """(resize size, crop size or None, mean, std, interpolation) from ``preprocessor_config.json``."""
    image_size = model.config.vision_config.image_size
    cfg: dict = {}
    local = Path(str(path)) / "preprocessor_config.json"
    if local.is_file():
        cfg = json.loads(local.read_text())
    elif not Path(str(path)).exists():
        try:
            from transformers import AutoImageProcessor

            cfg = AutoImageProcessor.from_pretrained(str(path)).to_dict()
        except Exception:  # no image processor published: CLIP defaults
            cfg = {}
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
        size = size.get("shortest_edge") or (size.get("height"), size.get("width"))
    crop = cfg.get("crop_size", image_size) if cfg.get("do_center_crop", True) else None
    if isinstance(crop, dict):
        crop = (crop["height"], crop["width"])
    mean = cfg.get("image_mean", OPENAI_MEAN)
    std = cfg.get("image_std", OPENAI_STD)
    interpolation = _RESAMPLE.get(cfg.get("resample", 3), "bicubic")
    return size, crop, mean, std, interpolation


__all__ = ["ClipBackbone", "OPENAI_MEAN", "OPENAI_STD", "IMAGENET_MEAN", "IMAGENET_STD", "clip_preprocess",
           "load_hf_clip", "load_open_clip", "normalize", "resize_to", "to_rgb"]
