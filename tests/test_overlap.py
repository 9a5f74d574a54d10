"""Scoring that overlaps sampling (``run.rollout_chunks``, ``run.overlap_scoring``): a chunked
iteration scored in a worker thread trains exactly what the same chunks scored in order train, and
the merged rollout is one consistent batch (prompts mapped back, re-scoring gives its log-probs)."""

from __future__ import annotations

import json
import time

import torch
from safetensors.torch import load_file

from align.config import load_config
from align.trainers import trainer_module

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


class SlowDigit:
    """The digit reward with a fixed latency (a remote server's), recording the threads it ran in."""

    name = "slow_digit"

    def __init__(self, latency=0.0):
        from rewards import build_reward

        self.inner, self.latency, self.threads = build_reward("digit"), latency, set()

    def __call__(self, pixels, prompts):
        import threading

        self.threads.add(threading.get_ident())
        time.sleep(self.latency)
        return self.inner(pixels, prompts)

    def to(self, device):
        return self


def train(tmp_path, name, overlap, monkeypatch, chunks=2):
    import align.trainers.common as common

    module = trainer_module("flow_grpo")
    config = load_config(module.CONFIG, ROOT / "configs" / "quickstart.yaml", [
        "iterations=2", "group_size=4", "prompts_per_iteration=4", "rollout.num_steps=4", "eval.per_prompt=1",
        f"run.rollout_chunks={chunks}", f"run.overlap_scoring={str(overlap).lower()}", "run.log_with=none",
        "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp_path / name}"])
    slow = SlowDigit()
    original = common.build_reward_set
    monkeypatch.setattr(common, "build_reward_set", lambda c: (slow, original(c)[1]))
    module.train(config)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(tmp_path / name / "lora" / "lora.safetensors"), slow.threads


def test_overlapped_scoring_trains_exactly_what_scoring_in_order_trains(tmp_path, monkeypatch):
    import threading

    overlapped, lora_a, threads_a = train(tmp_path, "overlap", True, monkeypatch)
    in_order, lora_b, _ = train(tmp_path, "sync", False, monkeypatch)
    trained = [(r["reward/score/mean"], r["train/loss"]) for r in overlapped if "train/loss" in r]
    assert trained == [(r["reward/score/mean"], r["train/loss"]) for r in in_order if "train/loss" in r]
    assert len(trained) == 2
    assert all(torch.equal(lora_a[k], lora_b[k]) for k in lora_a)
    assert threading.get_ident() not in threads_a or len(threads_a) > 1  # scoring ran in the worker


def test_a_chunked_rollout_is_one_consistent_batch():
    from align.sampling.overlap import chunked_rollout_and_score
    from align.sampling.rescore import rescore
    from align.sampling.rollout import RolloutConfig
    from pipelines.toy import load_toy_adapter

    adapter = load_toy_adapter()
    prompts = ["a red digit 3", "a blue digit 5", "a green digit 8"]
    cond = adapter.encode(prompts, "", 1.0)
    config = RolloutConfig(num_steps=4, kernel="flow_grpo", guidance_scale=1.0)
    with torch.no_grad():
        result, pixels, scores = chunked_rollout_and_score(
            adapter, cond, config, group_size=2, reward=SlowDigit(), prompts=prompts,
            generators=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
        assert result.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and pixels.shape[0] == 6
        assert result.nfe == 6 * 4
        direct = SlowDigit()(pixels, [prompts[i] for i in result.prompt_index.tolist()])
        assert torch.allclose(scores.total, direct.total, atol=1e-6)  # the classifier batched otherwise
        for transition in result.transitions:
            again = rescore(adapter, transition, cond, result.schedule, config)
            assert torch.allclose(again.log_prob, transition.log_prob, atol=1e-6)


def test_a_reward_normalised_over_the_batch_is_not_chunked():
    from align.sampling.overlap import can_chunk
    from align.sampling.rollout import RolloutConfig
    from rewards import build_rewards

    config = RolloutConfig(num_steps=4)
    plain = build_rewards(["digit", "colour"])
    batch = build_rewards([{"name": "digit", "normalize": "batch"}, "colour"])
    assert can_chunk(config, 2, 4, reward=plain)
    assert not can_chunk(config, 2, 4, reward=batch)
    assert not can_chunk(RolloutConfig(num_steps=4, split_steps=[1]), 2, 4, reward=plain)


def test_chunks_sample_what_the_processes_of_the_same_global_batch_sample():
    """Chunk k of process p draws from the generator of global chunk p * chunks + k: one process with
    two chunks gives, bit for bit, the rollouts two processes make of their halves of the prompts."""
    from align.prompts import iteration_generator, prompts_for_iteration
    from align.sampling.overlap import chunk_generators, chunked_rollout_and_score
    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.toy import load_toy_adapter

    adapter = load_toy_adapter()
    everything = ["a red digit 3", "a blue digit 5", "a green digit 8", "a white digit 1", "a cyan digit 7"]
    config = RolloutConfig(num_steps=3, kernel="flow_grpo")
    one = prompts_for_iteration(everything, 4, 0, 5)
    with torch.no_grad():
        result, _, _ = chunked_rollout_and_score(adapter, adapter.encode(one, "", 3.0), config, group_size=2,
                                                 generators=chunk_generators(0, 5, 0, 2), reward=SlowDigit(),
                                                 prompts=one)
        halves = []
        for process in range(2):
            mine = prompts_for_iteration(everything, 2, 0, 5, process, 2)
            assert mine == one[2 * process:2 * process + 2]
            halves.append(rollout(adapter, adapter.encode(mine, "", 3.0), config, group_size=2,
                                  generator=iteration_generator(0, 5, process)))
    assert torch.equal(result.samples, torch.cat([h.samples for h in halves]))
    for step, transition in enumerate(result.transitions):
        assert torch.equal(transition.log_prob, torch.cat([h.transitions[step].log_prob for h in halves]))
