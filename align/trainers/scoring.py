"""From prompts to scored samples and advantages: the rewards of a run (trained and held out), one
iteration's rollout decoded and scored, the unscored-sample policy, group advantages over the
gathered batch, reward metrics, and the rewards that learn during a run."""

from __future__ import annotations

from align.trainers.config import TrainerConfig


def heldout_specs(config: TrainerConfig) -> list:
    """The run's held-out rewards: ``heldout_rewards``, or the model's default when it is null."""
    from pipelines.registry import DEFAULT_HELDOUT_REWARDS

    if config.heldout_rewards is not None:
        return list(config.heldout_rewards)
    return list(DEFAULT_HELDOUT_REWARDS.get(config.model.name, []))


def build_reward_set(config: TrainerConfig):
    """(trained reward, {name: held-out reward}); unknown names fail here, before any model loads."""
    from rewards import build_reward, build_rewards

    reward = build_rewards(list(config.rewards))
    heldout = {}
    for spec in heldout_specs(config):
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        heldout[spec.get("key", spec["name"])] = build_reward({k: v for k, v in spec.items() if k != "key"})
    return reward, heldout


def sample_and_score(run, config: TrainerConfig, reward, batch_prompts, rollout_config, iteration: int, *,
                     score: str = "samples", grad_steps=(), checkpoint_grad_steps: bool = False,
                     group_size: int | None = None, drift=None, keep_policy_graph: str | None = None):
    """Encode the prompts, roll out ``group_size`` (default ``config.group_size``) samples of each
    (seeded by iteration and process), decode and score them: ``score`` "samples" (the final main
    rows), "branches" (the rollout's side branches, e.g. TempFlow's children) or "both" (DenseGRPO's
    final samples and ODE completions). ``grad_steps`` keeps gradients through those steps' model
    calls (reward backprop; ``checkpoint_grad_steps`` recomputes them in backward); otherwise
    sampling runs without a graph. ``drift``: the rollout's drift hook (guided sampling).
    ``keep_policy_graph``: a CFG gradient ("cond_only" / "full") with which the stochastic steps'
    model calls keep their graphs (:func:`align.sampling.rollout.rollout`), or None. Returns (cond,
    rollout result, scores of the samples or None, scores of the branches or None)."""
    import torch

    from align.prompts import iteration_generator
    from align.sampling.rollout import rollout

    from align.sampling.overlap import can_chunk, chunk_generators, chunked_rollout_and_score, prompt_chunks

    adapter, process = run.adapter, run.accelerator.process_index
    chunks = config.run.rollout_chunks
    graph = {"keep_policy_graph": True, "cfg_grad": keep_policy_graph} if keep_policy_graph else {}
    if score == "samples" and can_chunk(rollout_config, chunks, len(batch_prompts), drift=drift, grad_steps=grad_steps,
                                         reward=reward):
        with run.sampling():
            cond = adapter.encode(batch_prompts, config.negative_prompt, rollout_config.guidance_scale)
            generators = chunk_generators(config.run.seed, iteration, process, chunks)
            result, result.pixels, scores = chunked_rollout_and_score(
                adapter, cond, rollout_config, group_size=config.group_size if group_size is None else group_size,
                generators=generators[:len(prompt_chunks(len(batch_prompts), chunks))], reward=reward,
                prompts=list(batch_prompts), overlap=config.run.overlap_scoring, **graph, **run.latent_kwargs)
        check_unscored(run, reward, scores.valid_mask(), iteration)
        result.transitions = trained_transitions(adapter, result.transitions)
        return cond, result, scores, None
    with run.sampling() if not grad_steps else run.accelerator.autocast():
        cond = adapter.encode(batch_prompts, config.negative_prompt, rollout_config.guidance_scale)
        rows = config.group_size if group_size is None else group_size
        result = rollout(adapter, cond, rollout_config, group_size=rows,
                         generator=iteration_generator(config.run.seed, iteration, process), grad_steps=grad_steps,
                         checkpoint_grad_steps=checkpoint_grad_steps, drift=drift, **graph, **run.latent_kwargs)
        pixels = adapter.decode(result.samples.to(adapter.dtype)).float() if score in ("samples", "both") else None
        result.pixels = pixels
        branch_pixels = (adapter.decode(result.branch_samples.to(adapter.dtype)).float()
                         if score in ("branches", "both") else None)
    with run.phase("reward"), torch.set_grad_enabled(bool(grad_steps)):
        scores = branch_scores = None
        if pixels is not None:
            scores = reward(pixels, [batch_prompts[i] for i in result.prompt_index.tolist()])
        if branch_pixels is not None:
            branch_scores = reward(branch_pixels, [batch_prompts[i] for i in result.branch_prompt_index.tolist()])
    for out in (scores, branch_scores):
        if out is not None:
            check_unscored(run, reward, out.valid_mask(), iteration)
    result.transitions = trained_transitions(adapter, result.transitions)
    return cond, result, scores, branch_scores


def conditional_training_cond(adapter, cond, batch_prompts, negative_prompt: str):
    """The conditioning the CFG-free trainers (DiffusionNFT, AWM, DGPO) train on: the rollout's own
    when it sampled without CFG, else the prompts encoded again at guidance 1 (conditional
    predictions only, one row per prompt)."""
    return cond if not cond.uses_cfg else adapter.encode(batch_prompts, negative_prompt, 1.0)


def trained_transitions(adapter, transitions: list) -> list:
    """The transitions whose network trains: with one expert of Wan 2.2 A14B frozen
    (``model.train_experts``), its steps have a ratio of exactly 1 and no gradient, so they would
    only cost a forward and backward each and dilute the loss's mean."""
    trained = getattr(adapter, "trained_expert_indices", None)
    if trained is None:
        return transitions
    return [t for t in transitions if t.expert is None or t.expert in trained]


def check_unscored(run, reward, valid, iteration: int) -> None:
    """The unscored-sample policy: rows the reward could not score (its valid flag) are dropped from
    their groups and counted; when more than ``run.max_unscored_fraction`` of the iteration's batch
    (all processes) is unscored, the run stops with a one-line RewardError naming the reward."""
    from rewards.base import RewardError

    everything = run.gather(valid.bool())
    unscored = int((~everything).sum())
    limit = run.run_config.max_unscored_fraction
    if unscored and unscored > limit * len(everything):
        raise RewardError(f"the trained reward ({getattr(reward, 'name', type(reward).__name__)}) could not score "
                          f"{unscored} of the {len(everything)} samples of iteration {iteration + 1} (more than "
                          f"run.max_unscored_fraction={limit}): is its server down? the last checkpoint is intact")


#: the ways several rewards make one advantage (a trainer's ``multi_reward``)
MULTI_REWARD_MODES = ("sum_rewards", "sum_advantages", "gdpo")


def group_batch_advantages(run, reward, scores, groups, *, std: str, clip: float, multi_reward: str = "sum_rewards"):
    """Group advantages from the gathered batch (``groups``: this process's group ids, unique
    across processes). ``sum_rewards`` trains exactly the reward's total (a combination's weighted,
    normalised total); ``sum_advantages`` (MixGRPO) sums the advantages of the combination's
    top-level rewards, each normalised on its own, with their configured weights; ``gdpo``
    normalises each top-level reward within its group, then the weighted sum over the batch (one
    reward: its group advantage, normalised again over the batch). Unscored rows
    (the reward's valid flag) are dropped from their groups. Returns this process's (advantages,
    keep), the gathered named scores and the gathered valid mask."""
    from align.advantages import group_advantages, mixed_advantages
    from rewards.base import CombinedReward

    accelerator = run.accelerator
    all_groups = run.gather(groups)
    valid = run.gather(scores.valid_mask())
    named = {k: run.gather(v.float()) for k, v in scores.scores.items()}
    if multi_reward in ("sum_advantages", "gdpo") and isinstance(reward, CombinedReward):
        top = {k: named[k] for k in reward.rewards}
        advantages, keep = mixed_advantages(top, reward.weights, all_groups, multi_reward, valid=valid,
                                            std=std, clip=clip)
    elif multi_reward == "gdpo":
        advantages, keep = mixed_advantages({"total": run.gather(scores.total.float())}, {}, all_groups, "gdpo",
                                            valid=valid, clip=clip)
    else:
        advantages, keep = group_advantages(run.gather(scores.total.float()), all_groups, std=std, clip=clip,
                                            valid=valid)
    rows = len(groups)
    local = slice(accelerator.process_index * rows, (accelerator.process_index + 1) * rows)
    return advantages[local], keep[local], named, valid


def learning_rewards(**rewards) -> dict:
    """The rewards that learn during a run (they have ``trainable_state``: adv_dino's discriminator
    head, a latent PRM), found inside combinations, by ``<argument>.<key>`` (e.g. ``rewards.adv_dino``)."""
    from rewards.base import CombinedReward

    found = {}
    for prefix, reward in rewards.items():
        if reward is None:
            continue
        parts = reward.rewards.items() if isinstance(reward, CombinedReward) else [(reward.name, reward)]
        for key, part in parts:
            if hasattr(part, "trainable_state"):
                found[f"{prefix}.{key}"] = part
    return found


def restore_reward_states(run, learning: dict) -> None:
    """On resume, the learning rewards' weights, optimisers and counters from the checkpointed state."""
    saved = run.state.trainer.reward_states
    for key, reward in learning.items():
        if key in saved:
            reward.load_trainable_state(saved[key])


def store_reward_states(run, learning: dict) -> None:
    """The learning rewards' current state into the run state, so the next checkpoint holds it."""
    if learning:
        run.state.trainer.reward_states = {key: reward.trainable_state() for key, reward in learning.items()}
