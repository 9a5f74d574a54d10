"""Test-time search: best-of-N over start noises, and pruned search (TTSnap).

* ``best_of_n``: sample N start noises per prompt to the end, score every clean sample with the
  reward, keep the best. Cost per prompt: N x S model evaluations + N reward calls.
* ``pruned``: the same N start noises, but at each pruning step the rollout's select hook scores
  the step's one-step prediction x0_hat (decoded) with a reward -- ideally a noise-aware one (the
  ``noise_aware`` reward, or any reward with ``takes_sigma``: called with the step's sigma) -- and keeps the best ``keep_fractions[k]``
  of each prompt's surviving candidates; the survivors finish and the final reward picks the best.
  Default schedule: TTSnap's keep fractions 0.4, 0.4, 0.5 at steps 2, 6, 11 of 20, placed at the
  same fractions of the configured number of steps.

The cost account counts model evaluations (rows the denoiser processed, a CFG pair once) and reward
calls (images scored, intermediate ones included); ``cost = model_evaluations + reward_cost x
reward_calls`` in units of one model evaluation (the cost model S x + y per image, with y / x =
``reward_cost``). Keeping everything at every pruning step (fractions 1) reproduces best-of-N
exactly: the same samples, the same best.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from align.commands.sample import resolve_steps
from align.config import ConfigError
from align.models import ModelConfig
from align.sampling.rollout import RolloutConfig, rollout

#: TTSnap's schedule: keep fractions at steps 2, 6 and 11 of 20
TTSNAP_STEPS, TTSNAP_OF, TTSNAP_KEEP = (2, 6, 11), 20, (0.4, 0.4, 0.5)
METHODS = ("pruned", "best_of_n")


@dataclass
class SearchConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=lambda: RolloutConfig(kernel="ode", num_steps=0))
    prompts: list[str] = field(default_factory=lambda: ["a red digit 7"])
    negative_prompt: str = ""
    #: the reward that picks the best clean samples: names or {name, weight, ...}
    rewards: list[Any] = field(default_factory=lambda: ["digit"])
    #: the reward that scores intermediate x0_hat at the pruning steps (null: ``rewards``); a
    #: noise_aware reward is called with the step's sigma
    prune_rewards: list[Any] | None = None
    #: "pruned" (TTSnap) or "best_of_n"
    method: str = "pruned"
    #: start noises per prompt
    num_candidates: int = 16
    #: pruning steps (null: TTSnap's 2, 6, 11 of 20 at the same fractions of rollout.num_steps)
    prune_steps: list[int] | None = None
    #: fraction of each prompt's surviving candidates kept at each pruning step
    keep_fractions: list[float] = field(default_factory=lambda: list(TTSNAP_KEEP))
    #: best samples written per prompt
    top_k: int = 1
    #: one reward call's cost in model evaluations (the y / x of the cost model S x + y)
    reward_cost: float = 1.0
    seed: int = 0
    out: str = "search"

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {METHODS}, got {self.method!r}")
        if not self.prompts:
            raise ConfigError("prompts is empty: give at least one --prompt")
        if self.num_candidates < 1 or self.top_k < 1:
            raise ConfigError("num_candidates and top_k must be >= 1")
        if self.top_k > self.num_candidates:
            raise ConfigError(f"top_k={self.top_k} is more than num_candidates={self.num_candidates}")
        if self.reward_cost < 0:
            raise ConfigError(f"reward_cost must be >= 0, got {self.reward_cost}")
        bad = [f for f in self.keep_fractions if not 0 < f <= 1]
        if bad:
            raise ConfigError(f"keep_fractions must be in (0, 1], got {bad[0]}")
        from rewards.registry import check_reward_specs

        check_reward_specs(self.rewards, "rewards")
        check_reward_specs(self.prune_rewards or [], "prune_rewards")
        self.rollout.validate(self.rollout.num_steps or 1)
        if self.rollout.num_steps > 0:  # else the model's default steps, checked once it is known
            bad = [s for s in (self.prune_steps or []) if not 0 <= s < self.rollout.num_steps]
            if bad:
                raise ConfigError(f"prune_steps has step {bad[0]} outside 0..{self.rollout.num_steps - 1}")
        if self.prune_steps is not None and len(self.prune_steps) != len(self.keep_fractions):
            raise ConfigError(f"prune_steps has {len(self.prune_steps)} steps for {len(self.keep_fractions)} "
                              "keep_fractions: give one fraction per step")


def ttsnap_steps(num_steps: int, count: int = len(TTSNAP_STEPS)) -> list[int]:
    """TTSnap's pruning steps (2, 6, 11 of 20) at the same fractions of ``num_steps`` (distinct,
    before the last step); ``count`` of them."""
    steps = []
    for s in TTSNAP_STEPS[:count]:
        step = min(num_steps - 2, max(0, round(s * num_steps / TTSNAP_OF)))
        if steps and step <= steps[-1]:
            step = steps[-1] + 1
        steps.append(step)
    return [s for s in steps if s < num_steps - 1]


def keep_count(alive: int, fraction: float, floor: int = 1) -> int:
    """Candidates kept of ``alive`` at a pruning step: ceil(fraction x alive), at least ``floor``."""
    return min(alive, max(floor, math.ceil(fraction * alive - 1e-9)))


def top_per_group(scores: Tensor, groups: Tensor, counts: dict[int, int]) -> Tensor:
    """Indices of the ``counts[g]`` highest scores of each group ``g`` (ties: the earlier row), in
    ascending row order."""
    keep = []
    for g in groups.unique().tolist():
        rows = (groups == g).nonzero().flatten()
        order = torch.argsort(scores[rows], descending=True, stable=True)
        keep.append(rows[order[:counts[g]]])
    return torch.cat(keep).sort().values


@dataclass
class SearchResult:
    best: Tensor  # (P, top_k, C, H, W) pixels of the best samples of each prompt
    best_scores: Tensor  # (P, top_k)
    final_scores: Tensor  # every finished candidate's score
    final_prompt_index: Tensor
    model_evaluations: int
    reward_calls: int
    cost: float
    candidates: int  # start noises per prompt

    cost_unit: float = 1.0  # a reward call's cost in model evaluations

    def account(self) -> str:
        return (f"cost: model_evaluations={self.model_evaluations} reward_calls={self.reward_calls} "
                f"total={self.cost:g} (a reward call = {self.cost_unit:g} model evaluations)")


def search(adapter, config: SearchConfig, reward=None, prune_reward=None) -> SearchResult:
    """Run ``config.method`` for every prompt; rewards are built from the config unless given."""
    from rewards import build_rewards

    config.validate()
    reward = reward if reward is not None else build_rewards(list(config.rewards)).to(adapter.device)
    if prune_reward is None:
        prune_reward = build_rewards(list(config.prune_rewards)).to(adapter.device) if config.prune_rewards else reward
    rollout_config = resolve_steps(config.rollout, adapter)
    num_steps = rollout_config.num_steps
    steps = config.prune_steps if config.prune_steps is not None else ttsnap_steps(num_steps, len(config.keep_fractions))
    bad = [s for s in steps if not 0 <= s < num_steps]
    if bad:
        raise ConfigError(f"prune_steps has step {bad[0]} outside 0..{num_steps - 1}")
    fractions = dict(zip(steps, config.keep_fractions))
    kind = adapter.schedule(1, latent_shape=adapter.latent_shape()).kind
    prompts = list(config.prompts)
    reward_calls = 0

    def select(view):
        nonlocal reward_calls
        if config.method != "pruned" or view.step not in fractions:
            return None
        groups = view.prompt_index
        names = [prompts[i] for i in groups.tolist()]
        level = torch.as_tensor(view.level, dtype=torch.float32)
        sigma = (level if kind == "flow" else torch.sqrt(1 - level)).expand(len(names))  # x0_hat's noise level
        context = {"sigma": sigma} if getattr(prune_reward, "takes_sigma", False) else {}
        with torch.no_grad():
            scores = prune_reward(adapter.decode(view.x0_hat.to(adapter.dtype)).float(), names, **context).total
        reward_calls += len(names)
        counts = {g: keep_count(int((groups == g).sum()), fractions[view.step], config.top_k)
                  for g in groups.unique().tolist()}
        return top_per_group(scores.float().cpu(), groups.cpu(), counts)

    cond = adapter.encode(prompts, config.negative_prompt, rollout_config.guidance_scale)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        result = rollout(adapter, cond, rollout_config, group_size=config.num_candidates, generator=generator,
                         height=config.model.height, width=config.model.width, num_frames=config.model.num_frames,
                         select=select)
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float()
        final = reward(pixels, [prompts[i] for i in result.prompt_index.tolist()]).total.float().cpu()
    reward_calls += len(final)
    best, scores = [], []
    for g in range(len(prompts)):  # each prompt's top_k finished candidates, best first
        rows = (result.prompt_index.cpu() == g).nonzero().flatten()
        order = rows[torch.argsort(final[rows], descending=True, stable=True)[:config.top_k]]
        best.append(pixels[order.to(pixels.device)].cpu())
        scores.append(final[order])
    best, scores = torch.stack(best), torch.stack(scores)
    cost = result.nfe + config.reward_cost * reward_calls
    return SearchResult(best, scores, final, result.prompt_index.cpu(), result.nfe, reward_calls, cost,
                        config.num_candidates, cost_unit=config.reward_cost)


def equal_cost_candidates(cost: float, num_steps: int, reward_cost: float = 1.0) -> int:
    """Best-of-N's N at a given cost per prompt: each candidate costs S model evaluations plus one
    reward call."""
    return max(1, int(cost // (num_steps + reward_cost)))


def write_search(result: SearchResult, prompts: Sequence[str], out) -> Path:
    """The best samples as PNGs (``p<prompt>-<rank>.png``), ``scores.tsv`` and ``grid.png``."""
    from diffusers.utils import make_image_grid
    from torchvision.transforms.functional import to_pil_image

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    with open(out / "scores.tsv", "w") as table:
        table.write("file\tprompt\tscore\n")
        for p, prompt in enumerate(prompts):
            for k in range(result.best.shape[1]):
                sample = result.best[p, k]
                image = to_pil_image(sample[0] if sample.ndim == 4 else sample)
                name = f"p{p:03d}-{k:02d}.png"
                image.save(out / name)
                images.append(image)
                table.write(f"{name}\t{prompt}\t{float(result.best_scores[p, k]):.6f}\n")
    grid = make_image_grid(images, rows=len(prompts), cols=result.best.shape[1])
    grid.save(out / "grid.png")
    return out / "grid.png"
