"""Every method (online RL, reward backprop, preference, reward-ranked) on the embedded default model
at the same compute budget.

Each method is a preset in ``configs/methods/<name>.yaml``; it fine-tunes the toy digit model
against the digit-classifier reward until it has spent
``--nfe`` model evaluations (rollouts, completions and branches all count), then the mean reward
of fixed evaluation prompts and seeds is compared with the start. Printed: reward gain per 1k NFE
and per second of wall time, best first; model calls that also ran a backward pass through the
sampling chain (reward backprop) and their recomputation under checkpointing are counted in their
own columns (per-update training passes of the RL methods are not model evaluations of sampling).

``--match flow_grpo --fraction 0.2`` then runs every other method with ``fraction`` of the budget
and says which reach plain Flow-GRPO's final reward there (last line
``reach_flow_grpo_at_0.2x=<methods>``).

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


#: every method preset on the embedded default that trains the digit reward (configs/methods/<name>.yaml
#: names its trainer; adv_grpo trains against its adversarial head and needs reference files first)
PRESETS = ROOT / "configs" / "methods"
METHODS = sorted(p.stem for p in PRESETS.glob("*.yaml") if "rewards: [digit]" in p.read_text())
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
    parser.add_argument("--match", default=None, help="a method whose final reward the others try to reach "
                                                       "with --fraction of the budget (e.g. flow_grpo)")
    parser.add_argument("--fraction", type=float, default=0.2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from align.config import load_config
    from align.trainers import trainer_module

    seeds = [int(s) for s in args.seeds.split(",")]

    def measure(name: str, nfe: int):
        """(before, after, wall seconds, backward calls, recomputed calls), each a list over seeds."""
        import json

        module = trainer_module(preset_trainer(name))
        out = ([], [], [], [], [])
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(module.CONFIG, PRESETS / f"{name}.yaml", BENCH_OVERRIDES + [
                    f"max_nfe={nfe}", f"run.output_dir={tmp}/{name}", f"run.seed={seed}"])
                start = time.perf_counter()
                summary = module.train(config)
                out[2].append(time.perf_counter() - start)
                rows_ = [json.loads(line) for line in (Path(tmp) / name / "metrics.jsonl").read_text().splitlines()]
                out[3].append(sum(r.get("train/backward_calls", 0.0) for r in rows_))
                out[4].append(sum(r.get("train/recomputed_calls", 0.0) for r in rows_))
            out[0].append(summary["reward_before"])
            out[1].append(summary["reward_after"])
        return out

    rows = []
    for name in args.methods.split(","):
        befores, afters, walls, backward, recomputed = measure(name, args.nfe)
        gains = [a - b for a, b in zip(afters, befores)]
        gain, spread = statistics.mean(gains), statistics.stdev(gains) if len(gains) > 1 else 0.0
        seconds = statistics.mean(walls)
        rows.append((name, statistics.mean(befores), statistics.mean(afters), gain, spread,
                     1000 * gain / args.nfe, gain / seconds, seconds, statistics.mean(backward),
                     statistics.mean(recomputed)))
    rows.sort(key=lambda r: -r[5])
    print(f"\nbudget: {args.nfe} model evaluations per method, embedded toy model, digit reward, "
          f"seeds {args.seeds} (mean; std of the gain over seeds)")
    print(f"{'method':19s} {'before':>7s} {'after':>7s} {'gain':>7s} {'std':>6s} {'gain/1kNFE':>11s} {'gain/s':>8s} "
          f"{'wall s':>7s} {'backward':>9s} {'recomp':>7s}")
    for name, before, after, gain, spread, per_nfe, per_s, seconds, backward, recomputed in rows:
        print(f"{name:19s} {before:7.3f} {after:7.3f} {gain:+7.3f} {spread:6.3f} {per_nfe:+11.4f} {per_s:+8.4f} "
              f"{seconds:7.1f} {backward:9.0f} {recomputed:7.0f}")
    if rows:
        print(f"best_gain_per_1k_nfe={rows[0][5]:.4f} ({rows[0][0]})")
    if args.match:
        target = next(r[2] for r in rows if r[0] == args.match)
        budget = int(args.fraction * args.nfe)
        reached = []
        print(f"\n{args.match} reaches {target:.3f} with {args.nfe} evaluations; the others with {budget}:")
        for name in (r[0] for r in rows if r[0] != args.match):
            _, afters, *_ = measure(name, budget)
            after = statistics.mean(afters)
            print(f"{name:19s} {after:7.3f} {'reaches it' if after >= target else ''}")
            if after >= target:
                reached.append(name)
        print(f"reach_{args.match}_at_{args.fraction:g}x={','.join(reached) or 'none'}")


if __name__ == "__main__":
    main()
