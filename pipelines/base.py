"""The one small interface every model adapter implements.

An adapter wraps a denoiser (a diffusers transformer / UNet, or the embedded toy model) and gives the
rollout engine five things: ``encode`` prompts into a :class:`Conditioning`, ``predict`` the model
output at (x, t) with classifier-free guidance run as one batch, ``decode`` latents to float
images / videos in [0, 1], the sampling ``schedule``, and LoRA attach / disable (the reference policy
is the same model with its adapters disabled).
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor


@dataclass
class Schedule:
    """Noise levels of one sampling run.

    ``timesteps[i]`` is what the model receives at step i; ``levels`` has one entry more than
    ``timesteps`` and holds, for flow models, the sigmas (1 = noise ... 0 = clean) and, for
    DDPM-family models (``kind == "ddpm"``), the cumulative alphas (alpha_bar) of each step.
    """

    timesteps: Tensor
    levels: Tensor
    kind: str = "flow"

    def __len__(self) -> int:
        return len(self.timesteps)


@dataclass
class Conditioning:
    """Batch-first prompt encodings; ``negative`` holds the unconditional branch for CFG.

    Every tensor in ``tensors`` / ``negative`` has the batch as its first dimension, so rows can be
    selected or repeated (trees, groups) with :meth:`select`. ``extra`` holds values shared by the
    whole batch (for example FLUX's distilled guidance or SDXL's image size).
    """

    tensors: dict[str, Tensor]
    negative: dict[str, Tensor] | None = None
    guidance_scale: float = 1.0
    extra: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    @property
    def uses_cfg(self) -> bool:
        return self.negative is not None and self.guidance_scale != 1.0

    def cfg_batch(self) -> dict[str, Tensor]:
        """[negative; positive] concatenated along the batch, built once per Conditioning."""
        cached = self.__dict__.get("_cfg_batch")
        if cached is None:
            cached = {k: torch.cat([self.negative[k], self.tensors[k]]) for k in self.tensors}
            self.__dict__["_cfg_batch"] = cached
        return cached

    def select(self, index: Tensor | Sequence[int]) -> "Conditioning":
        """Rows ``index`` of every tensor (repeats allowed)."""
        index = torch.as_tensor(index, dtype=torch.long)

        def pick(d):
            return None if d is None else {k: v[index.to(v.device)] for k, v in d.items()}

        return Conditioning(pick(self.tensors), pick(self.negative), self.guidance_scale, dict(self.extra))

    def repeat_interleave(self, n: int) -> "Conditioning":
        return self.select(torch.arange(len(self)).repeat_interleave(n))


class Prompt(str):
    """A prompt that names a conditioning image (image-to-video, editing): a plain ``str`` everywhere
    prompts go (rewards, logs, lists), with the image's path (or a PIL image / (3, H, W) tensor in
    [0, 1]; a list of several for multi-image editing) as ``.image``. Adapters that take images read
    it in ``encode`` when no ``images`` are passed; the JSONL prompt file (``{"prompt": ...,
    "image": ...}``) yields these. Editing data may add what rewards read: ``.mask`` (the region the
    edit may change, a greyscale image: white = editable) and ``.target`` (a reference edited image)."""

    image: object = None
    mask: object = None
    target: object = None

    def __new__(cls, text: str, image: object = None, mask: object = None, target: object = None) -> "Prompt":
        prompt = super().__new__(cls, text)
        prompt.image, prompt.mask, prompt.target = image, mask, target
        return prompt

    def __reduce__(self):  # keeps the images through pickling (Ray workers, multiprocessing)
        return (Prompt, (str(self), self.image, self.mask, self.target))

    @property
    def source(self) -> object:
        """The image an edit starts from: ``.image``, or the first of several."""
        return self.image[0] if isinstance(self.image, (list, tuple)) else self.image


#: the tasks whose prompts carry an image
IMAGE_TASKS = ("i2v", "edit")


def prompt_images(prompts: Sequence[str], images: Sequence | None = None) -> list | None:
    """The conditioning image of each prompt: ``images`` when given (one per prompt), else each
    :class:`Prompt`'s ``.image``; None when no prompt has one. A prompt without an image among
    prompts with images is an error naming it."""
    if images is not None:
        images = list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        return images
    found = [getattr(p, "image", None) for p in prompts]
    if all(image is None for image in found):
        return None
    missing = [p for p, image in zip(prompts, found) if image is None]
    if missing:
        raise ValueError(f"prompt {str(missing[0])!r} has no image, but others of the batch do")
    return found


def load_image(image, height: int, width: int) -> Tensor:
    """A path, PIL image or (3, H, W) / (H, W, 3) tensor in [0, 1] -> (3, height, width) float in
    [0, 1], resized (bilinear) when its size differs."""
    import numpy as np

    if isinstance(image, (str, Path)):
        from PIL import Image

        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"conditioning image not found: {path}")
        image = Image.open(path)
    if not isinstance(image, Tensor):
        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)
    image = image.float()
    if image.ndim == 3 and image.shape[0] != 3 and image.shape[-1] == 3:
        image = image.permute(2, 0, 1)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"a conditioning image must be RGB (3, H, W), got shape {tuple(image.shape)}")
    if tuple(image.shape[1:]) != (height, width):
        image = torch.nn.functional.interpolate(image[None], size=(height, width), mode="bilinear",
                                                align_corners=False)[0]
    return image.clamp(0, 1)


def _as_batch(t: Tensor | float, batch: int, device, dtype=torch.float32) -> Tensor:
    t = torch.as_tensor(t, device=device, dtype=dtype)
    return t.expand(batch) if t.ndim == 0 else t


class ModelAdapter(abc.ABC):
    """Base class: subclasses set ``denoiser`` and implement ``encode``, ``forward``, ``decode``,
    ``schedule`` and ``latent_shape``.

    ``nfe`` counts per-sample model evaluations made through :meth:`predict` (a CFG pair counts once;
    ``transformer_rows`` counts the rows the network actually saw, CFG rows included).
    """

    name: str = "base"
    #: "flow" (velocity, sigma schedule), "epsilon" or "v_prediction" (DDPM alphas)
    prediction_type: str = "flow"
    #: what the model makes: t2i (text to image), t2v (text to video), i2v (image to video)
    tasks: tuple[str, ...] = ("t2i",)
    #: how the pipeline guides: "cfg" (u + g (c - u) against a negative prompt), "cfg_rescaled"
    #: (the same, rescaled to the conditional prediction's norm: Qwen-Image's true CFG),
    #: "embedded" (a guidance value the transformer takes as input: FLUX.1-dev, FLUX.2-dev) or
    #: "none" (a distilled few-step model)
    guidance_kind: str = "cfg"
    #: the smallest guidance scale the adapter takes (None: any); checked before the model loads
    min_guidance_scale: float | None = None
    #: default sampling settings of this model family
    default_steps: int = 10
    default_guidance: float = 4.5
    default_height: int = 512
    default_width: int = 512
    is_video: bool = False

    denoiser: torch.nn.Module

    def __init__(self) -> None:
        self.nfe = 0
        self.transformer_rows = 0

    # --- to implement -------------------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, prompts: Sequence[str], negative_prompt: str | Sequence[str] | None = "",
               guidance_scale: float | None = None) -> Conditioning:
        """Prompts (and CFG negatives when the guidance scale is not 1) -> Conditioning. Adapters
        with an image task (i2v) also take ``images=`` (one per prompt), or read each
        :class:`Prompt`'s ``.image``; the image's encoding travels in the Conditioning's rows, so
        it follows every row selection of the rollout and re-scoring."""

    @abc.abstractmethod
    def forward(self, x: Tensor, t: Tensor, tensors: dict[str, Tensor], extra: dict) -> Tensor:
        """One raw network call on a batch; ``t`` has shape (B,) in the model's own timestep units."""

    @abc.abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> float images (B, C, H, W) or videos (B, F, C, H, W) in [0, 1]."""

    @abc.abstractmethod
    def schedule(self, num_steps: int, *, latent_shape: tuple | None = None) -> Schedule:
        """Timesteps and noise levels of a ``num_steps`` sampling run (some models shift the
        schedule by the latent size, hence ``latent_shape``)."""

    @abc.abstractmethod
    def latent_shape(self, height: int | None = None, width: int | None = None,
                     num_frames: int | None = None) -> tuple[int, ...]:
        """Shape of one sample's latent, without the batch dimension."""

    def encode_images(self, images: Tensor) -> Tensor:
        """Images (B, C, H, W) or videos (B, F, C, H, W) in [0, 1] -> latents (the inverse of
        :meth:`decode` up to the VAE's reconstruction): offline preference pairs, real-data
        regularisers. Adapters with a VAE implement it."""
        raise NotImplementedError(f"the {self.name!r} adapter cannot encode images into latents")

    @classmethod
    def folder_problem(cls, index: dict) -> str | None:
        """Why the checkpoint whose ``model_index.json`` is ``index`` is not one this adapter loads,
        beyond its pipeline class (a family sharing a class with another), or None."""
        return None

    @classmethod
    def folder_tasks(cls, index: dict) -> tuple[str, ...]:
        """The tasks of the checkpoint whose ``model_index.json`` is ``index`` (the pipeline's
        config), known before it loads; the family's by default."""
        return tuple(cls.tasks)

    # --- shared ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The denoiser's compute dtype (diffusers models may keep a few modules in float32)."""
        dtype = getattr(self.base_denoiser, "dtype", None)
        return dtype if isinstance(dtype, torch.dtype) else next(self.denoiser.parameters()).dtype

    def predict(self, x: Tensor, t: Tensor | float, cond: Conditioning, *, cfg_grad: str = "full",
                cfg_split: bool = False, uncond: Tensor | None = None, return_uncond: bool = False):
        """Model output at (x, t) with classifier-free guidance: out = u + g (c - u), u the
        unconditional and c the conditional prediction, by default as one [u; c] batch.
        ``cfg_grad``: "full" differentiates both branches ((1 - g) du + g dc); "cond_only" detaches
        the unconditional one (g dc), as the Flow-GRPO reference re-scores for training. The value
        is the same either way.

        ``cfg_split``: the branches as two calls of ``len(x)`` rows, u without a graph under
        "cond_only" (backward then runs through the conditional rows only). ``uncond``: u already
        known for these rows (the rollout's, while the weights are unchanged): only c is computed.
        ``return_uncond``: return (out, u detached in the model's output dtype), u None without CFG."""
        if cfg_grad not in ("cond_only", "full"):
            raise ValueError(f"cfg_grad must be 'cond_only' or 'full', got {cfg_grad!r}")
        batch = x.shape[0]
        t = _as_batch(t, batch, x.device)
        self.nfe += batch
        x_in = x.to(self.dtype)
        as_float = lambda out: out if out.dtype == torch.float64 else out.float()  # noqa: E731
        if not cond.uses_cfg:
            self.transformer_rows += batch
            out = as_float(self.forward(x_in, t, cond.tensors, cond.extra))
            return (out, None) if return_uncond else out
        if cfg_split or uncond is not None:
            c = as_float(self.forward(x_in, t, cond.tensors, cond.extra))
            self.transformer_rows += batch
            if uncond is None:
                with torch.set_grad_enabled(torch.is_grad_enabled() and cfg_grad == "full"):
                    uncond = self.forward(x_in, t, cond.negative, cond.extra)
                self.transformer_rows += batch
            kept = uncond.detach()  # in the model's dtype: upcasting it again is exact
            uncond = as_float(uncond)
        else:
            self.transformer_rows += 2 * batch
            uncond, c = as_float(self.forward(torch.cat([x_in, x_in]), torch.cat([t, t]), cond.cfg_batch(),
                                              cond.extra)).chunk(2)
            kept = uncond.detach()
        if cfg_grad == "cond_only":
            uncond = uncond.detach()
        out = self.combine_guidance(uncond, c, cond.guidance_scale)
        return (out, kept) if return_uncond else out

    def combine_guidance(self, uncond: Tensor, cond: Tensor, scale: float) -> Tensor:
        """Classifier-free guidance of the two predictions: u + g (c - u). Adapters whose pipeline
        guides otherwise (a norm rescale) override it."""
        return uncond + scale * (cond - uncond)

    # --- several experts (Wan 2.2 A14B) ---------------------------------------------------------
    def expert_at(self, t: Tensor | float) -> int | None:
        """Index of the expert network that predicts at timestep ``t`` (None: a single network).
        The rollout records it with every transition; re-scoring pins it (:meth:`pinned_expert`)."""
        return None

    @contextlib.contextmanager
    def pinned_expert(self, index: int | None) -> Iterator[None]:
        """Calls inside use expert ``index`` whatever the timestep (None: chosen by timestep)."""
        yield

    def initial_noise(self, batch: int, generator: torch.Generator | None = None, *,
                      height: int | None = None, width: int | None = None,
                      num_frames: int | None = None) -> Tensor:
        shape = (batch, *self.latent_shape(height, width, num_frames))
        return torch.randn(shape, generator=generator, device="cpu").to(self.device)

    # --- LoRA (peft through diffusers' PeftAdapterMixin) ---------------------------------------
    default_lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    def add_lora(self, rank: int = 32, alpha: float = 64, target_modules: Sequence[str] | None = None,
                 adapter_name: str = "default") -> None:
        from peft import LoraConfig

        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian",
                            target_modules=list(target_modules or self.default_lora_targets))
        self.base_denoiser.add_adapter(config, adapter_name=adapter_name)

    @property
    def base_denoiser(self) -> torch.nn.Module:
        """The denoiser without a DDP / FSDP / compile wrapper (for peft switches and export)."""
        module = self.denoiser
        while hasattr(module, "module") or hasattr(module, "_orig_mod"):
            module = getattr(module, "module", None) or getattr(module, "_orig_mod")
        return module

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """The reference policy: the same network with every LoRA adapter switched off, or, after a
        full fine-tune set-up (``keep_reference_copy``), a frozen copy of the starting weights."""
        base = self.base_denoiser
        if getattr(self, "_reference_copy", None) is not None:
            trained, self.denoiser = self.denoiser, self._reference_copy
            try:
                yield
            finally:
                self.denoiser = trained
            return
        has_adapters = getattr(base, "_hf_peft_config_loaded", False)
        if has_adapters:
            base.disable_adapters()
        try:
            yield
        finally:
            if has_adapters:
                base.enable_adapters()

    def keep_reference_copy(self) -> None:
        """Full fine-tuning has no adapter to switch off: keep a frozen copy as the reference."""
        import copy

        self._reference_copy = copy.deepcopy(self.base_denoiser).requires_grad_(False).eval()

    def export_lora(self, directory: str | Path, state: dict | None = None) -> Path:
        """Write the trained LoRA. Diffusers adapters write the format ``pipe.load_lora_weights(dir)``
        loads; the base version writes peft's state dict (safetensors) and its config. ``state``:
        that state dict already gathered (a sharded model), else it is read from the denoiser."""
        import json

        from peft import get_peft_model_state_dict
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        base = self.base_denoiser
        state = get_peft_model_state_dict(base) if state is None else state
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        pipe = getattr(self, "pipe", None)
        if pipe is not None and hasattr(type(pipe), "save_lora_weights"):
            component = "unet" if getattr(pipe, "unet", None) is base else "transformer"
            metadata = base.peft_config["default"].to_dict()  # keeps lora_alpha / rank on reload
            type(pipe).save_lora_weights(str(directory), **{
                f"{component}_lora_layers": state,
                f"{component}_lora_adapter_metadata": metadata})
            return directory
        save_file(state, directory / "lora.safetensors")
        config = base.peft_config["default"].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        (directory / "lora_config.json").write_text(json.dumps(config, indent=2, default=str))
        return directory

    def load_lora(self, directory: str | Path, name: str = "default") -> None:
        """Attach a LoRA written by :meth:`export_lora` (or any ``load_lora_weights`` folder of a
        diffusers pipeline) to the denoiser under ``name``, e.g. to sample from a trained model.
        Several LoRAs may be loaded on one base under different names; the last one loaded is
        active, :meth:`use_lora` switches between them."""
        import json

        from peft import LoraConfig, set_peft_model_state_dict
        from safetensors.torch import load_file

        directory = Path(directory)
        problem = lora_folder_problem(directory)
        if problem is not None:
            raise ValueError(f"LoRA folder {directory}: {problem}")
        if name in self.lora_names():
            raise ValueError(f"a LoRA named {name!r} is already loaded: give another name")
        try:
            pipe = getattr(self, "pipe", None)
            if pipe is not None and hasattr(pipe, "load_lora_weights"):
                pipe.load_lora_weights(str(directory), adapter_name=name)
            else:
                options = json.loads((directory / "lora_config.json").read_text())
                fields = set(LoraConfig.__dataclass_fields__)
                lora_config = LoraConfig(**{k: v for k, v in options.items() if k in fields and k not in ("peft_type",)})
                base = self.base_denoiser
                base.add_adapter(lora_config, adapter_name=name)
                weights = directory / "lora.safetensors"
                result = set_peft_model_state_dict(base, load_file(str(weights)), adapter_name=name)
                unexpected = list(getattr(result, "unexpected_keys", None) or [])
                if unexpected:
                    raise ValueError(f"weights that match no LoRA layer of this model: {unexpected[:3]}")
        except (RuntimeError, ValueError, KeyError, TypeError) as err:  # shapes / layers of another model
            problem = str(err).strip().splitlines()
            problem = next((line.strip() for line in problem if "size mismatch" in line), problem[0] if problem
                           else type(err).__name__)
            if name in self.lora_names():  # a half-attached LoRA must not stay active
                self.base_denoiser.delete_adapters(name)
            raise ValueError(f"LoRA folder {directory} does not fit this {self.name} model: {problem}") from None
        self.use_lora(name)

    def lora_names(self) -> list[str]:
        """Names of the LoRAs attached to the denoiser."""
        return list(getattr(self.base_denoiser, "peft_config", None) or {})

    def use_lora(self, name: str | None) -> None:
        """Make the LoRA ``name`` the active one (None: the base model, every LoRA off); the demo
        compares checkpoints of one base this way."""
        from align.errors import unknown_name_error

        base = self.base_denoiser
        if name is None:
            if self.lora_names():
                base.disable_adapters()
            return
        if name not in self.lora_names():
            raise unknown_name_error("LoRA", name, self.lora_names())
        base.set_adapter(name)
        base.enable_adapters()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    # --- hooks of models with several experts or image conditions (Wan 2.2) ----------------------
    def fine_tune_modules(self) -> list[torch.nn.Module]:
        """The modules full fine-tuning trains (the others stay frozen): the whole denoiser, or
        the chosen experts of a model with several."""
        return [self.base_denoiser]

    def forward_may_skip_trainables(self) -> bool:
        """True when one forward call may leave trainable weights unused (experts chosen by
        timestep): data-parallel training must then look for unused parameters."""
        return False

    def lora_state(self) -> dict[str, Tensor]:
        """The LoRA weights as :meth:`export_lora` takes them (``state``): peft's state dict of the
        denoiser."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.base_denoiser)

    def apply_condition(self, latents: Tensor, cond: Conditioning) -> Tensor:
        """``latents`` (rows matching ``cond``'s) with the parts the conditioning fixes put in place,
        e.g. image-to-video's first frame: applied to initial noise and to final samples (and clean
        estimates) before decoding. Unchanged by default."""
        return latents


#: the weight file of a LoRA folder: export_lora's (with lora_config.json), or diffusers' save_lora_weights'
LORA_WEIGHT_FILES = ("lora.safetensors", "pytorch_lora_weights.safetensors")


def lora_folder_problem(directory: str | Path) -> str | None:
    """Why a LoRA folder cannot be loaded (one line), found without the model: missing folder or
    weight file, a weight file that is not readable safetensors (corrupt, truncated), an unreadable
    lora_config.json, or LoRA weights of another rank than the config states. None when it looks
    loadable (whether it fits the model is known only on loading)."""
    import json

    from safetensors import safe_open

    directory = Path(directory)
    if not directory.is_dir():
        return "not found"
    weights = next((directory / n for n in LORA_WEIGHT_FILES if (directory / n).is_file()), None)
    if weights is None:
        return f"has no {' or '.join(LORA_WEIGHT_FILES)} (an export_lora or save_lora_weights folder)"
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - any failure to parse means unusable
        return f"{weights.name} is not readable safetensors (corrupt or truncated: {str(err).splitlines()[0]})"
    if weights.name != "lora.safetensors":
        return None
    config = directory / "lora_config.json"
    try:
        options = json.loads(config.read_text())
        rank = options.get("r")
    except (OSError, ValueError, AttributeError) as err:
        return f"{config.name} is missing or not a JSON mapping ({str(err).splitlines()[0]})"
    if isinstance(rank, int) and not options.get("rank_pattern"):
        for key, shape in shapes.items():
            if "lora_A" in key and shape[0] != rank:
                return f"{key} has rank {shape[0]}, but {config.name} says r={rank}"
    return None
