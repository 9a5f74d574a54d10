"""``align sample``: sampling from any adapter over any topology, and writing images / videos and
a grid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from align.config import ConfigError
from align.guidance import GuidanceConfig
from align.models import ModelConfig, check_device, check_lora_folder, check_model_source, resolve_dtype
from align.sampling.rollout import RolloutConfig, rollout


@dataclass
class SampleConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(kernel="ode", num_steps=0))
    prompts: list[str] = field(default_factory=lambda: ["a red digit 7"])
    #: prompts from a file instead (one a line, or JSONL entries naming images: docs/prompt_files.md)
    prompt_file: str | None = None
    #: the conditioning image of image-to-video or the source of an edit: one for every prompt, or
    #: one per prompt (paths; "a.png,b.png" gives one prompt several sources: multi-image editing)
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
    entries = []
    for image in images:
        paths = [part.strip() for part in str(image).split(",")]
        for path in paths:
            if not Path(path).is_file():
                raise ConfigError(f"images: {path} not found")
        entries.append(paths if len(paths) > 1 else paths[0])
    return [Prompt(p, image) for p, image in zip(prompts, entries)]


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
