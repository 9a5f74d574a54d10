"""The config fields every trainer shares, and its start / finish (rewards, evaluation, summary)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.runtime import TOY_EVAL_PROMPTS, TOY_PROMPTS, LoraSettings, OptimConfig, Run, RunConfig, prompt_list
from align.sample import ModelConfig
from align.sampling.rollout import RolloutConfig


@dataclass
class TrainerConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    #: trained reward(s): names or {name, weight, normalize, **options}
    rewards: list[Any] = field(default_factory=lambda: ["digit"])
    #: rewards only watched on the evaluation samples (reward hacking shows as these falling)
    heldout_rewards: list[Any] = field(default_factory=list)
    prompts: list[str] = field(default_factory=lambda: list(TOY_PROMPTS))
    prompt_file: str | None = None
    eval_prompts: list[str] = field(default_factory=lambda: list(TOY_EVAL_PROMPTS))
    negative_prompt: str = ""
    iterations: int = 100
    prompts_per_iteration: int = 4
    group_size: int = 8
    lora: LoraSettings = field(default_factory=LoraSettings)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def build_reward_set(config: TrainerConfig):
    """(trained reward, {name: held-out reward}); unknown names fail here, before any model loads."""
    from rewards import build_reward, build_rewards

    reward = build_rewards(list(config.rewards))
    heldout = {}
    for spec in config.heldout_rewards:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        heldout[spec.get("key", spec["name"])] = build_reward({k: v for k, v in spec.items() if k != "key"})
    return reward, heldout


def start_run(config: TrainerConfig, adapter=None):
    """Validate, build rewards and prompts, open the run, resume, and evaluate the start point.
    Returns (run, reward, heldout, prompts)."""
    config.rollout.validate()
    reward, heldout = build_reward_set(config)
    prompts = prompt_list(config.prompts, config.prompt_file, TOY_PROMPTS)
    run = Run(config, model=config.model, lora=config.lora, optim=config.optim, run=config.run, adapter=adapter)
    device = run.accelerator.device
    reward.to(device)
    for extra in heldout.values():
        extra.to(device)
    run.maybe_resume()
    if run.state.reward_before is None:
        before = run.evaluate(reward, config.eval_prompts, config.rollout, heldout=heldout, grid_name="before")
        run.state.reward_before = before["eval/reward"]
        run.state.heldout_before = {k: v for k, v in before.items() if k != "eval/reward"}
        run.log(before, step=0)
    return run, reward, heldout, prompts


def finish_run(config: TrainerConfig, run, reward, heldout) -> dict[str, float]:
    """Final evaluation, LoRA export, and the one summary line ``reward before=<x> after=<y>``."""
    after = run.evaluate(reward, config.eval_prompts, config.rollout, heldout=heldout, grid_name="after")
    run.log(after, step=run.state.iteration)
    if run.is_main and config.lora.enabled:
        run.adapter.export_lora(run.dir / "lora")
    summary = {"reward_before": run.state.reward_before, "reward_after": after["eval/reward"], **after}
    watched = "".join(f" {k.split('/')[-1]}={after[k]:.4f}" for k in after if k.startswith("eval/heldout/"))
    line = f"reward before={run.state.reward_before:.4f} after={after['eval/reward']:.4f}{watched}"
    run.log_text(line)
    if run.is_main:
        print(line, flush=True)
    run.accelerator.end_training()
    return summary
