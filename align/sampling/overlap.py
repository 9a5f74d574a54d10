"""Reward scoring that overlaps sampling: the batch's prompts are rolled out in chunks, and each
finished chunk is decoded and handed to a scoring thread while the next chunk samples.

``run.rollout_chunks`` (> 1) splits an iteration's rollout by prompt; ``run.overlap_scoring`` (the
default) scores chunk k in a worker thread while chunk k + 1 samples, otherwise each chunk is
scored before the next starts. Both orders give identical samples and scores: each chunk draws from
its own generator, and a reward sees the same chunk either way. The trainers key a chunk's generator
by its place in the global batch (process x chunks + chunk, :func:`chunk_generators`), so P processes
with C chunks each sample exactly what P' x C' = P x C do (one process with two chunks samples what
two processes do) when the prompts split evenly into the chunks. The iteration then
costs about max(rollout, reward) instead of their sum when the reward waits on something other than
this process's CPU (a remote reward server, a GPU reward model). Topologies whose rows are created
during the rollout (trees, side branches) and guided or differentiated rollouts sample in one
piece; so does a reward that must see the whole batch (``batch`` normalisation across rewards).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from align.sampling.records import Rollout, Transition


def can_chunk(rollout_config, chunks: int, prompts: int, *, drift=None, grad_steps=(), reward=None) -> bool:
    """Whether this rollout may be split into ``chunks`` prompt chunks (not for a reward that
    normalises over the batch: a chunk's statistics would differ from the batch's)."""
    batch_normalised = "batch" in getattr(reward, "normalize", {}).values()
    return (chunks > 1 and prompts > 1 and drift is None and not grad_steps and not rollout_config.split_steps
            and not rollout_config.branch_steps and not batch_normalised)


def prompt_chunks(prompts: int, chunks: int) -> list[torch.Tensor]:
    """Contiguous prompt index chunks, as even as possible."""
    return [c for c in torch.arange(prompts).chunk(min(chunks, prompts)) if len(c)]


def concat_rollouts(parts: list[Rollout], prompt_ids: list[torch.Tensor]) -> Rollout:
    """One rollout of the chunks' rows in order (prompt indices mapped back to the whole batch).
    Chunks have no splits or branches: a transition's rows are its chunk's rows."""
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += part.samples.shape[0]

    def remap(part_index, ids):
        return ids[part_index.cpu()].to(part_index.device)

    transitions = []
    for step_transitions in zip(*(p.transitions for p in parts)):
        first = step_transitions[0]
        shift = [torch.full_like(t.parent, offset) for t, offset in zip(step_transitions, offsets)]
        transitions.append(Transition(
            first.step, torch.cat([t.latents for t in step_transitions]),
            torch.cat([t.next_latents for t in step_transitions]), torch.cat([t.mean for t in step_transitions]),
            torch.cat([t.std for t in step_transitions]), torch.cat([t.log_prob for t in step_transitions]),
            torch.cat([remap(t.prompt_index, ids) for t, ids in zip(step_transitions, prompt_ids)]),
            torch.cat([t.parent + s for t, s in zip(step_transitions, shift)]),
            torch.cat([t.rows + s for t, s in zip(step_transitions, shift)]), first.kernel, first.params,
            first.branch, first.noise_scale,
            None if first.uncond is None else torch.cat([t.uncond for t in step_transitions]),
            None if first.policy_out is None else cat_with_graph([t.policy_out for t in step_transitions]),
            first.expert))
    lineage = [torch.cat([p.lineage[i] + offset for p, offset in zip(parts, offsets)])
               for i in range(len(parts[0].lineage))]
    final = None if parts[0].final_x0_hat is None else torch.cat([p.final_x0_hat for p in parts])
    return Rollout(torch.cat([p.samples for p in parts]),
                   torch.cat([remap(p.prompt_index, ids) for p, ids in zip(parts, prompt_ids)]), transitions, lineage,
                   parts[0].schedule, sum(p.nfe for p in parts), sum(p.transformer_rows for p in parts),
                   torch.cat([p.initial_noise for p in parts]), final_x0_hat=final)


def cat_with_graph(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` keeping the parts' graphs (kept rollout graphs; sampling runs without one)."""
    with torch.enable_grad():
        return torch.cat(parts)


def concat_scores(outputs):
    """One RewardOutput of the chunks' outputs in order."""
    from rewards.base import RewardOutput

    valid = None if all(o.valid is None for o in outputs) else torch.cat(
        [o.valid_mask() if o.valid is not None else torch.ones(len(o), dtype=torch.bool) for o in outputs])
    return RewardOutput({k: torch.cat([o.scores[k] for o in outputs]) for k in outputs[0].scores},
                        torch.cat([o.total for o in outputs]), valid, dict(outputs[0].info))


def chunk_generators(seed: int, iteration: int, process_index: int, chunks: int) -> list[torch.Generator]:
    """One generator per chunk of this process, keyed by the chunk's global place
    process_index * chunks + k (one chunk: the process's own iteration generator)."""
    from align.prompts import iteration_generator

    return [iteration_generator(seed, iteration, process_index * chunks + k) for k in range(chunks)]


def chunked_rollout_and_score(adapter, cond, rollout_config, *, group_size: int, generators: list, reward,
                              prompts: list[str], overlap: bool = True, **rollout_kwargs):
    """(rollout, decoded pixels, scores) of the whole batch, sampled in ``len(generators)`` chunks of
    prompts, chunk k from ``generators[k]``; each chunk is scored in a worker thread while the next
    samples (``overlap``) or before it (not)."""
    from align.sampling.rollout import rollout

    ids = prompt_chunks(len(cond), len(generators))
    if len(ids) != len(generators):
        raise ValueError(f"{len(generators)} chunk generators for {len(ids)} chunks of {len(cond)} prompts")
    parts, pixels, pending = [], [], []
    with ThreadPoolExecutor(max_workers=1) as worker:
        for chunk, generator in zip(ids, generators):
            part = rollout(adapter, cond.select(chunk), rollout_config, group_size=group_size, generator=generator,
                           **rollout_kwargs)
            image = adapter.decode(part.samples.to(adapter.dtype)).float()
            chunk_prompts = [prompts[int(chunk[i])] for i in part.prompt_index.tolist()]
            job = worker.submit(torch.no_grad()(reward), image, chunk_prompts)
            if not overlap:
                job.result()
            parts.append(part)
            pixels.append(image)
            pending.append(job)
        scores = concat_scores([job.result() for job in pending])
    result = concat_rollouts(parts, ids)
    return result, torch.cat(pixels), scores
