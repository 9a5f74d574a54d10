"""Tree rollouts (BranchGRPO) vs independent rollouts at equal leaves: model evaluations and wall time.

One small SD3-class model (random weights, built in code by ``bench/rollout.py``), one process, one
prompt, the Flow-GRPO SDE with log-probs, CFG as one batch. The tree splits every node in
``--factor`` children at ``--splits`` (default 0, 3, 6, 9 of 20 steps: 16 leaves); the independent
run samples the same number of leaves as one group. Timings alternate between the two and the
median of the repeats is compared. The model time is also broken down by batch width, which shows
where the tree's time goes.

A training iteration is timed as well (``--rollout-only`` skips it): the rollout plus one training
pass that re-scores every trained edge with gradients into a rank-8 LoRA and backpropagates.
Independent (Flow-GRPO / DanceGRPO): every row of every step but the last. The tree: one evaluation
per distinct parent, every edge; and with BranchGRPO's width pruning (``--width-keep``, default 0.5:
the paths of the best and worst half of each tree's leaves below the last split), which cuts the
gradient computation but leaves the rollout and its exploration unchanged.

What bounds each ratio: the rollout's wall time follows its model evaluations (per-row cost is flat
in the batch width on a CPU), so at the default splits it tracks 203 / 320 = 0.63 and cannot reach
0.5 (the ten steps after the last split already run all 16 leaves, half of the independent run's
evaluations). The training pass dominates an iteration (a backward costs about two forwards), and
there sharing parents and pruning edges both count.

Printed last: ``rollout_wall_per_leaf=<tree / independent>`` for the rollouts alone, then
``tree_vs_independent_wall_per_leaf=<x>`` for a whole training iteration per leaf (the pruned tree
vs independent; with ``--rollout-only`` the rollouts' ratio).

    python bench/tree.py [--repeats 3] [--steps 20] [--splits 0,3,6,9] [--factor 2] [--size 64]
                         [--width-keep 0.5] [--rollout-only] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.rollout import build_small_sd3  # noqa: E402


class Timed:
    """Wraps ``adapter.predict`` and adds each call's wall time to a per-batch-width tally."""

    def __init__(self, adapter) -> None:
        self.adapter, self.predict = adapter, adapter.predict
        self.seconds: dict[int, float] = defaultdict(float)
        self.calls: dict[int, int] = defaultdict(int)
        adapter.predict = self

    def __call__(self, x, t, cond, **options):  # options: predict's own (cfg_grad, ...)
        start = time.perf_counter()
        out = self.predict(x, t, cond, **options)
        self.seconds[x.shape[0]] += time.perf_counter() - start
        self.calls[x.shape[0]] += 1
        return out

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()


def train_pass(adapter, result, cond, config, kept_rows) -> float:
    """Seconds to re-score the trained edges (dict step -> rows) with gradients and backpropagate."""
    from align.sampling.rescore import rescore

    params = adapter.trainable_parameters()
    start = time.perf_counter()
    for t in result.main_transitions():
        rows = kept_rows.get(t.step)
        if rows is None or not len(rows):
            continue
        out = rescore(adapter, t.subset(rows), cond, result.schedule, config, share_parents=True)
        out.log_prob.mean().backward()
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--splits", default="0,3,6,9")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--rollout-only", action="store_true", help="time the rollouts only, no training pass")
    parser.add_argument("--width-keep", type=float, default=0.5, help="width pruning: fraction of leaves trained")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the steadiest ratios on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from align.sampling.rollout import RolloutConfig, rollout
    from align.trees import width_kept_leaves
    from pipelines.sd3 import SD3Adapter

    splits = [int(s) for s in args.splits.split(",") if s.strip()]
    leaves = args.factor ** len(splits)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = SD3Adapter.from_pretrained(str(build_small_sd3(Path(tmp), args.size)), torch_dtype=torch.float32,
                                             max_sequence_length=16)
    timer = Timed(adapter)
    prompt = ["a photo of a cat"]
    configs = {
        "tree": (RolloutConfig(num_steps=args.steps, kernel="flow_grpo", guidance_scale=args.guidance,
                               split_steps=splits, branch_factor=args.factor), 1),
        "independent": (RolloutConfig(num_steps=args.steps, kernel="flow_grpo", guidance_scale=args.guidance),
                        leaves),
    }
    results = {}

    def sample(name):
        config, group = configs[name]
        with torch.no_grad():
            cond = adapter.encode(prompt, "", args.guidance)
            result = rollout(adapter, cond, config, group_size=group, generator=torch.Generator().manual_seed(0),
                             height=args.size, width=args.size)
        assert result.samples.shape[0] == leaves
        results[name] = (result, cond)
        return result

    for name in configs:  # warm-up
        sample(name)
    times = {name: [] for name in configs}
    cpu_times = {name: [] for name in configs}
    model_seconds = {name: defaultdict(list) for name in configs}
    model_calls: dict[str, dict[int, int]] = {}
    for _ in range(args.repeats):
        for name in ("independent", "tree"):
            timer.reset()
            start, cpu_start = time.perf_counter(), time.process_time()
            sample(name)
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
            for width, seconds in timer.seconds.items():
                model_seconds[name][width].append(seconds)
            model_calls[name] = dict(timer.calls)
    wall = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpu_times.items()}
    nfe = {k: results[k][0].nfe for k in configs}

    print(f"model: SD3-class, 4 blocks x width 128, {args.size}px, 1 prompt, {args.steps} steps, "
          f"CFG {args.guidance} (one batch), flow_grpo SDE with log-probs, {args.threads} thread(s), "
          f"median of {args.repeats}")
    print(f"tree: splits {splits}, factor {args.factor} -> {leaves} leaves; independent: {leaves} trajectories")
    print(f"{'rollout':<12} {'leaves':>6} {'NFE':>5} {'NFE/leaf':>9} {'wall ms':>9} {'ms/leaf':>8} {'model ms':>9} "
          f"{'cpu ms':>9}")
    for name in ("independent", "tree"):
        model_ms = sum(statistics.median(v) for v in model_seconds[name].values()) * 1000
        print(f"{name:<12} {leaves:>6} {nfe[name]:>5} {nfe[name] / leaves:>9.2f} {wall[name] * 1000:>9.1f} "
              f"{wall[name] * 1000 / leaves:>8.2f} {model_ms:>9.1f} {cpu[name] * 1000:>9.1f}")
    print("model time per rollout by batch width (rows per call; CFG doubles them inside the call):")
    print(f"{'width':>6} {'tree calls':>10} {'indep calls':>11} {'ms/call':>8} {'ms/row':>7} {'tree ms':>8} "
          f"{'indep ms':>8}")
    for width in sorted(set(model_calls["tree"]) | set(model_calls["independent"])):
        ms = {k: statistics.median(model_seconds[k][width]) * 1000 if width in model_seconds[k] else 0.0
              for k in configs}
        calls = {k: model_calls[k].get(width, 0) for k in configs}
        per_call = max(ms[k] / calls[k] for k in configs if calls[k])
        print(f"{width:>6} {calls['tree']:>10} {calls['independent']:>11} {per_call:>8.2f} {per_call / width:>7.2f} "
              f"{ms['tree']:>8.1f} {ms['independent']:>8.1f}")
    full = model_calls["tree"].get(leaves, 0)
    print(f"the tree's {full} full-width steps alone make {full * leaves} of its {nfe['tree']} evaluations, "
          f"{full * leaves / nfe['independent']:.3f} of the independent run's {nfe['independent']}")

    iteration_ratio = None
    if not args.rollout_only:
        adapter.base_denoiser.requires_grad_(False)
        adapter.add_lora(rank=8, alpha=16)
        tree, cond = results["tree"]
        indep, icond = results["independent"]
        last = args.steps - 1
        all_rows = {t.step: torch.arange(len(t.rows)) for t in indep.main_transitions() if t.step != last}
        tree_rows = {t.step: torch.arange(len(t.rows)) for t in tree.main_transitions() if t.step != last}
        kept = width_kept_leaves(torch.randn(leaves), tree.prompt_index, args.width_keep)
        pruned = {}
        last_split = max(splits)
        for t in tree.main_transitions():
            if t.step == last:
                continue
            if t.step >= last_split:
                on_path = torch.zeros(len(t.rows), dtype=torch.bool)
                on_path[tree.ancestor(t.step + 1)[kept]] = True
                pruned[t.step] = on_path.nonzero().flatten()
            else:
                pruned[t.step] = torch.arange(len(t.rows))
        passes = {"independent": (indep, icond, all_rows), "tree": (tree, cond, tree_rows),
                  f"tree width {args.width_keep}": (tree, cond, pruned)}
        train_times = {k: [] for k in passes}
        for name, (res, c, rows) in passes.items():  # warm-up
            train_pass(adapter, res, c, configs["tree"][0], rows)
        for _ in range(args.repeats):
            for name, (res, c, rows) in passes.items():
                train_times[name].append(train_pass(adapter, res, c, configs["tree"][0], rows))
        print("training pass (re-score trained edges with gradients into a rank-8 LoRA, backward):")
        print(f"{'pass':<16} {'edges':>6} {'model rows':>10} {'train ms':>9} {'iter ms/leaf':>12}")
        base = None
        for name, (res, c, rows) in passes.items():
            edges = sum(len(r) for r in rows.values())
            parents = sum(len(torch.unique(t.parent[rows[t.step]])) for t in res.main_transitions() if t.step in rows)
            train_ms = statistics.median(train_times[name]) * 1000
            sampling = wall["independent" if name == "independent" else "tree"] * 1000
            per_leaf = (sampling + train_ms) / leaves
            base = per_leaf if base is None else base
            print(f"{name:<16} {edges:>6} {parents:>10} {train_ms:>9.1f} {per_leaf:>12.2f}  ({per_leaf / base:.3f}x)")
            iteration_ratio = per_leaf / base
    print(f"nfe_per_leaf tree={nfe['tree'] / leaves:.3f} independent={nfe['independent'] / leaves:.3f} "
          f"ratio={nfe['tree'] / nfe['independent']:.3f}")
    print(f"cpu_time_ratio={cpu['tree'] / cpu['independent']:.3f} (process CPU time: less sensitive to other load)")
    rollout_ratio = wall["tree"] / wall["independent"]
    print(f"rollout_wall_per_leaf={rollout_ratio:.3f}")
    if iteration_ratio is not None:
        print(f"iteration (rollout + training pass) per leaf, tree with width pruning {args.width_keep} "
              f"vs independent:")
    print(f"tree_vs_independent_wall_per_leaf={iteration_ratio if iteration_ratio is not None else rollout_ratio:.3f}")


if __name__ == "__main__":
    main()
