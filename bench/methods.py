"""Every online-RL method on the embedded default model at the same compute budget.

Each method is a preset in ``configs/methods/<name>.yaml``; it fine-tunes the toy digit model
against the digit-classifier reward until it has spent
``--nfe`` model evaluations (rollouts, completions and branches all count), then the mean reward
of fixed evaluation prompts and seeds is compared with the start. Printed: reward gain per 1k NFE
and per second of wall time, best first.

    python bench/methods.py [--nfe 20000] [--methods flow_grpo,dense_grpo,...] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: every method preset on the embedded default (configs/methods/<name>.yaml names its trainer)
PRESETS = ROOT / "configs" / "methods"
METHODS = sorted(p.stem for p in PRESETS.glob("*.yaml"))
#: what the benchmark sets on top of each preset: a compute budget instead of an iteration count
BENCH_OVERRIDES = ["run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0",
                   "iterations=1000"]


def preset_trainer(name: str) -> str:
    from omegaconf import OmegaConf

    return OmegaConf.load(PRESETS / f"{name}.yaml").trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, default=20000, help="model evaluations per method")
    parser.add_argument("--methods", default=",".join(METHODS), help="presets in configs/methods/")
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 (the table gives mean and std)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the toy model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from align.config import load_config
    from align.trainers import trainer_module

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.methods.split(","):
        module = trainer_module(preset_trainer(name))
        befores, afters, walls = [], [], []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(module.CONFIG, PRESETS / f"{name}.yaml", BENCH_OVERRIDES + [
                    f"max_nfe={args.nfe}", f"run.output_dir={tmp}/{name}", f"run.seed={seed}"])
                start = time.perf_counter()
                summary = module.train(config)
                walls.append(time.perf_counter() - start)
            befores.append(summary["reward_before"])
            afters.append(summary["reward_after"])
        gains = [a - b for a, b in zip(afters, befores)]
        gain, spread = statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
        seconds = statistics.mean(walls)
        rows.append((name, statistics.mean(befores), statistics.mean(afters), gain, spread,
                     1000 * gain / args.nfe, gain / seconds, seconds))
    rows.sort(key=lambda r: -r[5])
    print(f"\nbudget: {args.nfe} model evaluations per method, embedded toy model, digit reward, "
          f"seeds {args.seeds} (mean; std of the gain over seeds)")
    print(f"{'method':19s} {'before':>7s} {'after':>7s} {'gain':>7s} {'std':>6s} {'gain/1kNFE':>11s} {'gain/s':>8s} "
          f"{'wall s':>7s}")
    for name, before, after, gain, spread, per_nfe, per_s, seconds in rows:
        print(f"{name:19s} {before:7.3f} {after:7.3f} {gain:+7.3f} {spread:6.3f} {per_nfe:+11.4f} {per_s:+8.4f} "
              f"{seconds:7.1f}")
    if rows:
        print(f"best_per_1k_nfe={rows[0][0]}")


if __name__ == "__main__":
    main()
