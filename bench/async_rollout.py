"""Asynchronous rollouts (``run.async_rollout``) against synchronous ones on the same cores: Flow-GRPO on
the embedded toy model, the trainer with one thread and one Ray rollout worker with one thread
(``run.max_staleness: 1``: the worker samples the next iteration while the trainer trains this one),
against the same run sampling and training in turn in one process.

Printed: the median wall time per iteration of each (start-up and the first iteration left out), the
rollout worker's idle fraction over the asynchronous run's timed iterations, and last
``async_vs_sync_wall_per_iteration=<async / sync>`` (below 1: asynchronous is faster).

    python bench/async_rollout.py [--iterations 8] [--group 8] [--steps 10] [--window 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed_run(out: Path, iterations: int, group: int, steps: int, window: int | None, *extra: str):
    """(seconds between consecutive iteration ends after the first, the batches' busy intervals)."""
    import align.trainers.common as common
    import align.training.async_rollout as async_rollout
    from align.config import load_config
    from align.trainers import trainer_module

    module = trainer_module("flow_grpo")
    marks, busy = [], []
    original_end, original_take = common.end_iteration, async_rollout.AsyncRollouts.take

    def end_iteration(*args, **kwargs):
        original_end(*args, **kwargs)
        marks.append(time.perf_counter())

    def take(self, iteration):
        batch = original_take(self, iteration)
        busy.append(batch["busy"])
        return batch

    module.end_iteration, async_rollout.AsyncRollouts.take = end_iteration, take
    try:
        config = load_config(module.CONFIG, None, [
            "model.name=toy", f"rollout.num_steps={steps}", "rollout.guidance_scale=1.0", f"group_size={group}",
            "prompts_per_iteration=4", f"iterations={iterations}", "lora.rank=8", "lora.alpha=16",
            "eval.per_prompt=1", "eval_prompts=['a red digit 3']", "heldout_rewards=[]", "run.log_with=none",
            "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={out}",
            *([f"window_size={window}"] if window else []), *extra])
        module.train(config)
    finally:
        module.end_iteration, async_rollout.AsyncRollouts.take = original_end, original_take
    return [b - a for a, b in zip(marks, marks[1:])], busy, marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--group", type=int, default=8, help="samples per prompt (4 prompts an iteration)")
    parser.add_argument("--steps", type=int, default=10, help="sampling steps")
    parser.add_argument("--window", type=int, default=None,
                        help="Flow-GRPO-Fast: train an SDE window of this many steps (null: every step)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        sync, _, _ = timed_run(Path(tmp) / "sync", args.iterations, args.group, args.steps, args.window)
        asynchronous, busy, marks = timed_run(Path(tmp) / "async", args.iterations, args.group, args.steps, args.window,
                                              "run.async_rollout=true", "run.max_staleness=1", "run.rollout_workers=1")
    import ray

    ray.shutdown()
    window = (marks[0], marks[-1])  # the timed iterations: from the first iteration's end
    worked = sum(max(0.0, min(end, window[1]) - max(start, window[0])) for start, end in busy)
    idle = 1 - worked / (window[1] - window[0])
    s, a = statistics.median(sync), statistics.median(asynchronous)
    trained = f"an SDE window of {args.window} steps trained" if args.window else "every step trained"
    print(f"flow_grpo on the toy model, 4 prompts x {args.group}, {args.steps} steps ({trained}), one thread each side; "
          f"{len(sync)} timed iterations")
    print(f"synchronous: median {s:.2f} s per iteration; asynchronous (1 worker, max_staleness 1): median {a:.2f} s")
    print(f"rollout worker idle fraction: {idle:.3f}")
    print(f"async_vs_sync_wall_per_iteration={a / s:.3f}")


if __name__ == "__main__":
    main()
