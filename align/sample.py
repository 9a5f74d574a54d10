"""Sampling from any adapter over any topology, and writing images / videos and a grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.config import ConfigError
from align.guidance import GuidanceConfig
from align.sampling.rollout import RolloutConfig, rollout


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
    height: int | None = None
    width: int | None = None
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

    def __post_init__(self) -> None:
        check_train_experts(self)


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


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(kernel="ode", num_steps=0))
    prompts: list[str] = field(default_factory=lambda: ["a red digit 7"])
    #: prompts from a file instead (one a line, or JSONL entries naming images: docs/prompt_files.md)
    prompt_file: str | None = None
    #: the conditioning image of image-to-video: one for every prompt, or one per prompt (paths)
    images: list[str] | None = None
    negative_prompt: str = ""
    #: samples per prompt (for a tree: root trajectories per prompt; each yields its leaves)
    num_per_prompt: int = 8
    seed: int = 0
    out: str = "samples"
    #: video frames per second of the written MP4 files
    fps: int = 8
    #: reward guidance of sampling (Flow-NRG; align/guidance.py): guidance.rewards with weights
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)


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


def resolve_steps(rollout_config: RolloutConfig, adapter) -> RolloutConfig:
    """``rollout_config`` with ``num_steps`` 0 (the model family's default) replaced by the adapter's."""
    if rollout_config.num_steps > 0:
        return rollout_config
    return RolloutConfig(**{**vars(rollout_config), "num_steps": adapter.default_steps})


def generate(adapter, config: SampleConfig):
    """Encode the prompts, roll out, decode. Returns (images or videos in [0, 1], prompt of each)."""
    rollout_config = resolve_steps(config.rollout, adapter)
    from align.guidance import build_guidance

    prompts = sample_prompts(config)
    cond = adapter.encode(prompts, config.negative_prompt, config.rollout.guidance_scale)
    generator = torch.Generator().manual_seed(config.seed)
    guidance = build_guidance(config.guidance, adapter, prompts, rollout_config)
    with torch.no_grad():
        result = rollout(adapter, cond, rollout_config, group_size=config.num_per_prompt, generator=generator,
                         height=config.model.height, width=config.model.width,
                         num_frames=config.model.num_frames, drift=guidance)
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float().cpu()
    prompts = [prompts[i] for i in result.prompt_index.tolist()]
    result.guidance_cost = guidance.cost if guidance is not None else None
    return pixels, prompts, result


def write_strip(videos: torch.Tensor, path: str | Path, scale: int = 4, max_rows: int = 16) -> Path:
    """strip.png: one row per video (up to ``max_rows``), its frames left to right, upscaled ``scale``
    times (nearest) so small videos can be seen; a 1-pixel gap between frames and rows."""
    from torchvision.transforms.functional import to_pil_image

    videos = videos[:max_rows].float().clamp(0, 1)  # (N, F, C, H, W)
    n, f, c, h, w = videos.shape
    canvas = torch.full((c, n * (h + 1) + 1, f * (w + 1) + 1), 0.25)
    for i in range(n):
        for j in range(f):
            canvas[:, 1 + i * (h + 1):1 + i * (h + 1) + h, 1 + j * (w + 1):1 + j * (w + 1) + w] = videos[i, j]
    canvas = canvas.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    to_pil_image(canvas).save(path)
    return Path(path)


#: grids show every sample at least this many pixels high (small ones enlarged, nearest neighbour)
GRID_MIN_PIXELS = 96


def display_scale(height: int) -> int:
    """The integer factor that shows a sample of ``height`` pixels at least GRID_MIN_PIXELS high."""
    return max(1, -(-GRID_MIN_PIXELS // max(1, height)))


def write_samples(pixels: torch.Tensor, prompts: list[str], out: str | Path, columns: int, fps: int = 8) -> Path:
    """One PNG per image (MP4 per video, at their own size), and grid.png of all images (first frames
    for videos), small ones enlarged without smoothing (:func:`display_scale`); videos also get
    strip.png, every frame of each video in a row."""
    from diffusers.utils import export_to_video, make_image_grid
    from PIL import Image
    from torchvision.transforms.functional import to_pil_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    firsts = []
    with open(out / "prompts.txt", "w") as index:
        for i, (sample, prompt) in enumerate(zip(pixels, prompts)):
            if sample.ndim == 4:  # (F, C, H, W)
                frames = [to_pil_image(f) for f in sample]
                export_to_video(frames, str(out / f"{i:04d}.mp4"), fps=fps)
                firsts.append(frames[0])
                index.write(f"{i:04d}.mp4\t{prompt}\n")
            else:
                image = to_pil_image(sample)
                image.save(out / f"{i:04d}.png")
                firsts.append(image)
                index.write(f"{i:04d}.png\t{prompt}\n")
    columns = max(1, min(columns, len(firsts)))
    rows = -(-len(firsts) // columns)
    firsts += [firsts[0].copy().point(lambda _: 0)] * (rows * columns - len(firsts))
    grid = make_image_grid(firsts, rows=rows, cols=columns)
    scale = display_scale(firsts[0].height)
    if scale > 1:  # small images (the toy model's 16 px) are enlarged without smoothing, to be seen
        grid = grid.resize((grid.width * scale, grid.height * scale), resample=Image.NEAREST)
    grid.save(out / "grid.png")
    if pixels.ndim == 5:
        write_strip(pixels, out / "strip.png")
    return out / "grid.png"


def sample_prompts(config: SampleConfig) -> list[str]:
    """The prompts to sample: ``prompt_file`` or ``prompts``, each carrying its image (``images``:
    one for all, or one per prompt) as a :class:`pipelines.base.Prompt`."""
    from align.prompts import prompt_list
    from pipelines.base import Prompt

    prompts = prompt_list(config.prompts, config.prompt_file, [])
    if not config.images:
        return prompts
    if any(getattr(p, "image", None) is not None for p in prompts):
        raise ConfigError("images: the prompt file names images already; give images in one place")
    if len(config.images) not in (1, len(prompts)):
        raise ConfigError(f"images: {len(config.images)} images for {len(prompts)} prompts (give one, or one each)")
    images = config.images * len(prompts) if len(config.images) == 1 else config.images
    for image in images:
        if not Path(image).is_file():
            raise ConfigError(f"images: {image} not found")
    return [Prompt(p, image) for p, image in zip(prompts, images)]


def check_sample_config(config: SampleConfig) -> None:
    if not config.prompts and not config.prompt_file:
        raise ConfigError("prompts is empty: give at least one --prompt")
    if config.num_per_prompt < 1:
        raise ConfigError(f"num_per_prompt must be >= 1, got {config.num_per_prompt}")
    from pipelines.registry import check_adapter_name

    check_adapter_name(config.model.name)
    config.rollout.validate(config.rollout.num_steps or 1)
    config.guidance.validate(config.rollout.num_steps or None)
    check_device(config.model.device)
    from align.attention import check_attention_backend

    check_attention_backend(config.model.attention_backend)
    check_model_source(config.model)
    from align.prompts import check_prompt_images
    from pipelines.registry import model_tasks

    check_prompt_images(sample_prompts(config), config.model.name, model_tasks(config.model.name, config.model.path),
                        field="prompts")
    from dataclasses import replace

    from align.config import check_ranges

    # rollout.num_steps 0 is the model family's default here
    check_ranges(replace(config, rollout=replace(config.rollout, num_steps=config.rollout.num_steps or 1)))
    resolve_dtype(config.model.dtype, torch.device("cpu"))
    if config.model.lora is not None:
        check_lora_folder(config.model.lora)
    from align.training.run_folder import check_writable_folder

    check_writable_folder(Path(config.out), "--out")
