"""A soak run: ``--iterations`` (200) Flow-GRPO iterations on the embedded default with checkpoint
rotation, watching what a long run must not do.

Recorded after every iteration: resident memory (``/proc/self/statm``) and the run folder's size on
disk. Printed: the slope of resident memory after the warm-up (least squares over the last 3/4 of
the iterations, MiB per 100 iterations), the largest folder size against what the checkpoint limit
allows (``run.checkpoint_limit`` checkpoints of the first one's size, plus metrics and grids), and
whether metrics.jsonl has one row per iteration. Last line
``soak_rss_slope_mib_per_100_iterations=<slope>`` (flat: near 0).

    python bench/soak.py [--iterations 200] [--checkpoint-every 5] [--checkpoint-limit 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def folder_mib(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--checkpoint-limit", type=int, default=2)
    args = parser.parse_args()
    import align.trainers.common as common
    import align.trainers.flow_grpo as flow_grpo
    from align.config import load_config

    samples: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "soak"
        original = common.end_iteration

        def watched(run, *a, **k):
            original(run, *a, **k)
            samples.append((resident_mib(), folder_mib(out)))

        flow_grpo.end_iteration = watched
        config = load_config(flow_grpo.CONFIG, ROOT / "configs" / "quickstart.yaml", [
            f"iterations={args.iterations}", "group_size=4", "prompts_per_iteration=2", "rollout.num_steps=4",
            "eval.per_prompt=1", "run.log_with=none", "run.progress=false", f"run.output_dir={out}",
            f"run.checkpoint_every={args.checkpoint_every}", f"run.checkpoint_limit={args.checkpoint_limit}"])
        flow_grpo.train(config)
        checkpoints = sorted((out / "checkpoints").iterdir())
        checkpoint_mib = folder_mib(checkpoints[0])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        iterations = [r["iteration"] for r in rows if "train/loss" in r]
    start = len(samples) // 4
    xs = list(range(start, len(samples)))
    ys = [samples[i][0] for i in xs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    disk = max(s[1] for s in samples)
    print(f"{len(samples)} iterations; resident memory {samples[start][0]:.0f} -> {samples[-1][0]:.0f} MiB after the "
          f"warm-up (iteration {start}); largest run folder {disk:.1f} MiB with {len(checkpoints)} checkpoints kept of "
          f"{checkpoint_mib:.2f} MiB each (limit {args.checkpoint_limit}); metrics rows for iterations 1..{args.iterations}: "
          f"{iterations == list(range(1, args.iterations + 1))}")
    print(f"soak_rss_slope_mib_per_100_iterations={slope * 100:.2f}")


if __name__ == "__main__":
    main()
