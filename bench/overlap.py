"""Reward scoring overlapped with sampling against scoring after sampling, with a reward of known
latency (a remote server's: it sleeps a fixed time per image, then scores digits).

One iteration's rollout (the toy model, ``--prompts`` x ``--group`` samples, 10 Flow-GRPO steps) is
sampled in ``--chunks`` chunks; synchronous scoring scores each chunk before the next samples,
overlapped scoring hands it to a worker thread (``run.overlap_scoring``). The latency is set so the
reward takes as long as the chunked rollout (timed first with a zero-latency reward): the case overlap
helps most, max(rollout, reward) against their sum. The one-piece rollout's time is printed too: on
the toy model, a chunk of 8 rows is bound by per-call overhead, so chunking itself costs time here
that it does not on a GPU-sized model. Last line ``overlapped_vs_synchronous=<overlapped time / synchronous time>``.

    python bench/overlap.py [--chunks 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class LatencyReward:
    def __init__(self, per_image: float):
        from rewards import build_reward

        self.inner, self.per_image = build_reward("digit"), per_image

    def __call__(self, pixels, prompts):
        time.sleep(self.per_image * len(prompts))
        return self.inner(pixels, prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from align.sampling.overlap import chunk_generators, chunked_rollout_and_score
    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.toy import load_toy_adapter

    adapter = load_toy_adapter()
    prompts = [f"a red digit {d % 10}" for d in range(args.prompts)]
    cond = adapter.encode(prompts, "", 1.0)
    config = RolloutConfig(num_steps=10, kernel="flow_grpo", guidance_scale=1.0)
    def iteration(reward, overlap):
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            chunked_rollout_and_score(adapter, cond, config, group_size=args.group, reward=reward,
                                      generators=chunk_generators(0, 0, 0, args.chunks), prompts=prompts,
                                      overlap=overlap)
            best = min(best, time.perf_counter() - start)
        return best

    images = args.prompts * args.group
    with torch.no_grad():
        iteration(LatencyReward(0.0), False)  # warm-up
        # The rollout being overlapped is the chunked one, so the latency is set to its time.
        sampling = iteration(LatencyReward(0.0), False)
        reward = LatencyReward(sampling / images)
        times = {overlap: iteration(reward, overlap) for overlap in (False, True)}
        start = time.perf_counter()
        rollout(adapter, cond, config, group_size=args.group, generator=torch.Generator().manual_seed(0))
        one_piece = time.perf_counter() - start
    print(f"chunked rollout {sampling:.3f} s; reward latency {reward.per_image * 1e3:.2f} ms per image "
          f"({reward.per_image * images:.3f} s per iteration); {args.chunks} chunks; "
          f"one-piece rollout {one_piece:.3f} s")
    print(f"synchronous {times[False]:.3f} s, overlapped {times[True]:.3f} s "
          f"(sum of the two: {2 * sampling:.3f} s; max plus one chunk's scoring: "
          f"{sampling * (1 + 1 / args.chunks):.3f} s)")
    print(f"overlapped_vs_synchronous={times[True] / times[False]:.3f}")


if __name__ == "__main__":
    main()
