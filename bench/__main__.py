"""The benchmark suite: ``python -m bench`` runs each benchmark in its own process and prints its
last line (a ratio against a baseline run in the same process), then the table of all of them.

    python -m bench [--only rollout,overlap] [--quick]

``--quick`` gives each benchmark fewer repeats (a smoke run, noisier figures). The methods sweep is
not part of the suite (``python bench/methods.py``, ``align sweep configs/sweeps/methods.yaml``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: benchmark -> (script and its arguments, extra arguments of a quick run)
SUITE = {
    "rollout": ("rollout.py", ["--repeats", "2"]),
    "rollout_compiled": ("rollout.py --compile", ["--repeats", "2"]),
    "rollout_cfg_split": ("rollout.py --cfg-split", ["--repeats", "2"]),
    "flow_grpo_iteration": ("flow_grpo_iteration.py", ["--iterations", "3"]),
    "flow_grpo_iteration_compiled": ("flow_grpo_iteration.py --compile", ["--iterations", "3"]),
    "flow_grpo_iteration_reuse_graph": ("flow_grpo_iteration.py --reuse-graph", ["--iterations", "3"]),
    "tree": ("tree.py", ["--repeats", "1"]),
    "triton_step": ("triton_step.py", ["--repeats", "3"]),
    "overlap": ("overlap.py", ["--repeats", "1"]),
    "outside_model": ("outside_model.py", ["--iterations", "2"]),
    "remote_reward": ("remote_reward.py", ["--batches", "16"]),
    "backprop_memory": ("backprop_memory.py", []),
    "search": ("search.py", ["--seeds", "1"]),
    "rewards": ("rewards.py", []),
    "memory": ("memory.py --models sd3", []),
    "real_models": ("real_models.py", []),
    **{f"rollout_{family}": (f"rollout.py --model {family}", ["--repeats", "2"])
       for family in ("qwen_image", "flux2", "flux2_klein", "z_image", "z_image_turbo", "wan22_a14b", "wan22_ti2v",
                      "wan22_i2v", "hunyuan_video15", "hunyuan_video15_i2v")},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITE), help=f"comma-separated: {', '.join(SUITE)}")
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (valid: {', '.join(SUITE)})")
    results = []
    for name in chosen:
        (script, *options), quick = SUITE[name][0].split(), SUITE[name][1]
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / script), *options, *(quick if args.quick else [])],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        last = lines[-1] if done.returncode == 0 and lines else f"failed ({done.stderr.strip().splitlines()[-1:]})"
        print(f"{name}: {last}", flush=True)
        results.append((name, last, time.perf_counter() - start))
    print("\n| benchmark | result | seconds |\n|---|---|---|")
    for name, last, seconds in results:
        print(f"| {name} | `{last}` | {seconds:.0f} |")
    return 0 if all(not r[1].startswith("failed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
