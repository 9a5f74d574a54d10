"""The config fields every trainer shares (each trainer's config dataclass extends it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.evaluation import EvalConfig
from align.models import ModelConfig
from align.sampling.rollout import RolloutConfig
from align.training.model_setup import LoraSettings
from align.training.optim import OptimConfig
from align.training.run import TOY_EVAL_PROMPTS, TOY_PROMPTS, RunConfig


@dataclass
class TrainerConfig:
    #: the trainer this config is for (each trainer's config sets it; a method preset names it)
    trainer: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    #: trained reward(s): names or {name, weight, normalize, **options}
    rewards: list[Any] = field(default_factory=lambda: ["digit"])
    #: rewards only watched on the evaluation samples (reward hacking shows as these falling); null:
    #: the model's default (the embedded toy model's is the independent digit judge, ``digit_judge``)
    heldout_rewards: list[Any] | None = None
    prompts: list[str] = field(default_factory=lambda: list(TOY_PROMPTS))
    prompt_file: str | None = None
    eval_prompts: list[str] = field(default_factory=lambda: list(TOY_EVAL_PROMPTS))
    #: evaluation prompts from a file, in prompt_file's forms (the JSONL one names the images of
    #: image-to-video); null: eval_prompts
    eval_prompt_file: str | None = None
    negative_prompt: str = ""
    #: evaluation on eval_prompts (kernel, steps, guidance, negative prompt, seed, samples per prompt)
    eval: EvalConfig = field(default_factory=EvalConfig)
    iterations: int = 100
    #: stop early once this many model evaluations (summed over processes) are spent
    max_nfe: int | None = None
    prompts_per_iteration: int = 4
    group_size: int = 8
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
