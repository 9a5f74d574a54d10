"""The config fields every trainer shares (each trainer's config dataclass extends it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.evaluation import EvalConfig
from align.models import ModelConfig
from align.sampling.rollout import RolloutConfig
from align.training.model_setup import LoraSettings
from align.training.optim import OptimConfig
from align.training.run import TOY_EVAL_PROMPTS, TOY_PROMPTS, RayConfig, RunConfig


@dataclass
class TrainerConfig:
    #: the trainer this config is for (each trainer's config sets it; a method preset names it)
    trainer: str = ""
    #: the model to train: adapter, weights, dtype, device, sample size, attention and memory settings
    model: ModelConfig = field(default_factory=ModelConfig)
    #: the training rollout: sampling steps, step kernel and its noise, CFG scale, tree / branch topology
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    #: trained reward(s): names or {name, weight, normalize, **options}
    rewards: list[Any] = field(default_factory=lambda: ["digit"])
    #: rewards only watched on the evaluation samples (reward hacking shows as these falling); null:
    #: the model's default (the embedded toy models' are the independent digit judge, ``digit_judge``,
    #: and per frame, ``frame_judge``)
    heldout_rewards: list[Any] | None = None
    #: training prompts, each iteration a seeded draw of prompts_per_iteration of them (the default: the toy
    #: model's 40 "a <colour> digit <d>" prompts); prompt_file, when set, replaces them
    prompts: list[str] = field(default_factory=lambda: list(TOY_PROMPTS))
    #: training prompts from a file: one prompt a line, or .jsonl {"prompt", "image"} entries (the image of
    #: image-to-video, relative to the file; docs/prompt_files.md); null: prompts
    prompt_file: str | None = None
    #: prompts of the evaluations before, during and after training (the default: four toy digit prompts);
    #: eval_prompt_file, when set, replaces them
    eval_prompts: list[str] = field(default_factory=lambda: list(TOY_EVAL_PROMPTS))
    #: evaluation prompts from a file, in prompt_file's forms (the JSONL one names the images of
    #: image-to-video); null: eval_prompts
    eval_prompt_file: str | None = None
    #: negative prompt of the CFG branch in rollouts and evaluations ("": the empty prompt; used only where the
    #: guidance scale is not 1; eval.negative_prompt overrides it for evaluations)
    negative_prompt: str = ""
    #: evaluation on eval_prompts (kernel, steps, guidance, negative prompt, seed, samples per prompt)
    eval: EvalConfig = field(default_factory=EvalConfig)
    #: training iterations (each: sample, score, update); a resumed run goes on up to this count
    iterations: int = 100
    #: stop early once this many model evaluations (summed over processes) are spent
    max_nfe: int | None = None
    #: prompts drawn per iteration on each process (seeded by run.seed and the iteration: a resumed run
    #: draws the same; without replacement while the prompt list is long enough)
    prompts_per_iteration: int = 4
    #: samples per prompt in an iteration, the group whose rewards are compared (advantages, ranks, pairs);
    #: the Flow-GRPO reference samples 24 on SD3.5-M
    group_size: int = 8
    #: LoRA on the denoiser (rank, alpha, target modules), or full fine-tuning (enabled: false)
    lora: LoraSettings = field(default_factory=LoraSettings)
    #: the optimizer (AdamW or 8-bit AdamW, the Flow-GRPO reference's settings), gradient clipping, weight EMA
    optim: OptimConfig = field(default_factory=OptimConfig)
    #: the run: folder, seed, resume, checkpoints, logging, precision, accumulation, compile, sharding
    run: RunConfig = field(default_factory=RunConfig)
    #: the Ray cluster of run.async_rollout's workers
    ray: RayConfig = field(default_factory=RayConfig)
