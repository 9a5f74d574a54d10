"""The model of a run or a command: ModelConfig, loading an adapter from a registry name and a
local folder or hub id (precision policy included), and the checks of device, precision, model
source and LoRA folder that run before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from align.config import ConfigError


@dataclass
class ModelConfig:
    #: adapter name (`align models` lists them): toy, sd3, flux, wan, sd, sdxl
    name: str = "toy"
    #: local directory or hub name (null: the embedded weights, for the toy model)
    path: str | None = None
    #: float32, bfloat16 or float16 (auto: bfloat16 on GPU, float32 on CPU)
    dtype: str = "auto"
    #: cpu, cuda, cuda:1, ... (auto: cuda when available)
    device: str = "auto"
    #: sample height in pixels, for training, evaluation and sampling (null: the adapter's default, the
    #: checkpoint's sample size: 1024 for SD3 / FLUX, 512 for SD 1.5, 480 for Wan 2.1; 16 for the toy model)
    height: int | None = None
    #: sample width in pixels (null: the adapter's default: 1024 for SD3 / FLUX, 512 for SD 1.5, 832 for
    #: Wan 2.1, 16 for the toy model)
    width: int | None = None
    #: frames per video sample (null: the adapter's default: 81 for Wan, 121 for HunyuanVideo 1.5, 8 for
    #: toy_video; Wan's and HunyuanVideo's need num_frames - 1 a multiple of 4); image models ignore it
    num_frames: int | None = None
    #: a trained LoRA folder to load on top (a run's ``lora/`` export; null: the base model)
    lora: str | None = None
    #: T5 / UMT5 tokens per prompt for sd3, flux and wan (null: the adapter's default, 256 for SD3;
    #: the Flow-GRPO reference trains SD3.5 at 128)
    max_sequence_length: int | None = None
    #: attention backend of the denoiser through diffusers' dispatch: native (torch SDPA), flash,
    #: sage, xformers, flex, ... where installed (``align env`` lists them; align/attention.py)
    attention_backend: str = "native"
    #: the VAE's dtype (null: dtype's): float32 keeps decoding exact while the denoiser runs in bf16
    vae_dtype: str | None = None
    #: keep the text encoders on the CPU, moved to the device only while they encode (accelerate's
    #: cpu_offload): their memory is free for the denoiser during rollouts and training
    offload_text_encoders: bool = False
    #: which experts of Wan 2.2 A14B (wan22) train, LoRA or full fine-tuning: both, high_noise (the
    #: high-noise expert, ``transformer``) or low_noise (``transformer_2``); the others stay unchanged
    train_experts: str = "both"
    #: the CFG scale of Wan 2.2 A14B's low-noise expert (null: the pipeline's rule, 3.0 beside the
    #: default 4.0, else rollout.guidance_scale)
    guidance_scale_2: float | None = None
    #: editing models (qwen_image_edit, flux_kontext): the side in pixels of the square area each source
    #: image is brought to, its aspect kept (null: the pipeline's: 1024 for Qwen-Image-Edit, FLUX.1
    #: Kontext's preferred resolutions); smaller sources train faster
    source_size: int | None = None

    def __post_init__(self) -> None:
        check_train_experts(self)


#: the editing models whose sources model.source_size sizes
SOURCE_SIZE_MODELS = ("qwen_image_edit", "flux_kontext")
#: model.train_experts values
TRAIN_EXPERTS = ("both", "high_noise", "low_noise")


def check_train_experts(config: ModelConfig) -> None:
    """A one-line ConfigError for an unknown ``model.train_experts``, or one other than "both" for a
    model with a single denoiser."""
    from align.errors import check_choice

    check_choice("model.train_experts", config.train_experts, TRAIN_EXPERTS, "expert choice")
    name = config.name.strip().lower() if isinstance(config.name, str) else config.name
    if config.train_experts != "both" and name != "wan22":
        raise ConfigError(f"model.train_experts: {config.train_experts!r} needs a model with several experts "
                          f"(wan22: Wan 2.2 A14B); the {config.name!r} model has one denoiser")
    if config.guidance_scale_2 is not None and name != "wan22":
        raise ConfigError(f"model.guidance_scale_2: the low-noise expert's CFG scale of Wan 2.2 A14B (wan22); the "
                          f"{config.name!r} model has one denoiser")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_device(device: str, field: str = "model.device") -> None:
    """A one-line ConfigError for a device this machine does not have (checked before loading)."""
    try:
        resolved = resolve_device(device)
    except RuntimeError as err:
        raise ConfigError(f"{field}: {str(err).splitlines()[0]}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{field}: {device!r} is not available on this machine (no CUDA device); use cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(f"{field}: {device!r} is not available ({torch.cuda.device_count()} CUDA devices)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: 'mps' is not available on this machine; use cpu or auto")


def check_precision(precision: str, device: str, field: str = "run.mixed_precision") -> None:
    """A one-line ConfigError for a mixed precision this machine's stack cannot run (checked
    before loading): fp8 needs a CUDA device and Transformer Engine or MS-AMP; bf16 on a CUDA
    device needs one that supports it."""
    import importlib.util

    resolved = resolve_device(device)
    if precision == "fp8":
        if resolved.type != "cuda":
            raise ConfigError(f"{field}: fp8 runs on CUDA devices only (this run is on {resolved.type}); use bf16 or no")
        if not any(importlib.util.find_spec(m) for m in ("transformer_engine", "msamp")):
            raise ConfigError(f"{field}: fp8 needs transformer_engine or MS-AMP installed; use bf16 or no")
    if precision == "bf16" and resolved.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{field}: this CUDA device does not support bf16; use fp16 or no")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        from align.config import unknown_name_error

        raise unknown_name_error("dtype", dtype, DTYPES)
    return DTYPES[dtype]


def load_model(config: ModelConfig):
    from pipelines.registry import load_adapter

    if config.lora is not None:
        check_lora_folder(config.lora)
    from align.attention import apply_attention_backend, check_attention_backend

    check_attention_backend(config.attention_backend)
    check_model_source(config)
    device = resolve_device(config.device)
    options = {} if config.max_sequence_length is None else {"max_sequence_length": config.max_sequence_length}
    if options and config.name in ("toy", "toy_video", "sd", "sdxl"):
        raise ConfigError(f"model.max_sequence_length: the {config.name!r} adapter has no long-prompt text encoder")
    check_train_experts(config)
    if config.name.strip().lower() == "wan22":
        options.update(train_experts=config.train_experts, guidance_scale_2=config.guidance_scale_2)
    if config.source_size is not None:
        if config.name.strip().lower() not in SOURCE_SIZE_MODELS:
            raise ConfigError(f"model.source_size: sizes the sources of an editing model "
                              f"({', '.join(SOURCE_SIZE_MODELS)}); the {config.name!r} model has none")
        if config.source_size < 16:
            raise ConfigError(f"model.source_size: must be at least 16 pixels, got {config.source_size}")
        options["source_size"] = int(config.source_size)
    try:
        adapter = load_adapter(config.name, config.path, device=device,
                               torch_dtype=resolve_dtype(config.dtype, device), **options)
    except (OSError, ValueError) as err:  # a hub name that cannot download, a folder diffusers refuses
        lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
        raise ConfigError(f"model.path: {config.path or config.name} does not load as a {config.name} model: "
                          f"{lines[0] if lines else type(err).__name__}") from None
    # the configured size is the adapter's default (e.g. FLUX reads its packed latents' grid from it)
    adapter.default_height = config.height or adapter.default_height
    adapter.default_width = config.width or adapter.default_width
    apply_attention_backend(adapter, config.attention_backend)
    apply_precision_policy(adapter, config)
    if config.lora is not None:
        try:
            adapter.load_lora(config.lora)
        except ValueError as err:  # weights of another model (layer names, sizes)
            raise ConfigError(f"model.lora: {err}") from None
    return adapter


#: the text encoder components of the diffusers pipelines the adapters wrap (an adapter may name its
#: own in ``text_encoder_names``: an image encoder of image-to-video, say)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def apply_precision_policy(adapter, config: ModelConfig) -> None:
    """The parts of the precision policy set at load time: the VAE's dtype and text-encoder offload
    (the denoiser's dtype is ``model.dtype``, LoRA weights train in fp32 and every step kernel
    computes in fp32 whatever the model's dtype)."""
    pipe = getattr(adapter, "pipe", None)
    if config.vae_dtype is not None:
        if getattr(adapter, "vae", None) is None:
            raise ConfigError(f"model.vae_dtype: the {adapter.name!r} model has no VAE")
        adapter.vae.to(resolve_dtype(config.vae_dtype, adapter.device))
    if config.offload_text_encoders:
        names = getattr(adapter, "text_encoder_names", TEXT_ENCODERS)
        encoders = [getattr(pipe, name, None) for name in names] if pipe is not None else []
        encoders = [e for e in encoders if e is not None]
        if not encoders:
            raise ConfigError(f"model.offload_text_encoders: the {adapter.name!r} model has no text encoder to offload")
        from accelerate import cpu_offload

        for encoder in encoders:
            cpu_offload(encoder, execution_device=adapter.device)


def check_model_source(config: ModelConfig, field: str = "model.path") -> None:
    """A one-line ConfigError for a model folder that cannot load as ``config.name`` (missing, not
    a diffusers pipeline, another family's pipeline, a missing component), found from its
    ``model_index.json`` before anything loads."""
    from pipelines.registry import model_folder_problem

    problem = model_folder_problem(config.name, config.path)
    if problem is not None:
        raise ConfigError(f"{field}: {problem}")


def check_lora_folder(path: str, field: str = "model.lora") -> None:
    """A one-line ConfigError for a LoRA folder that cannot load (missing, corrupt, truncated, of
    another rank than its config), found before the model loads."""
    from pipelines.base import lora_folder_problem

    problem = lora_folder_problem(path)
    if problem is not None:
        raise ConfigError(f"{field}: LoRA folder {path}: {problem}")
