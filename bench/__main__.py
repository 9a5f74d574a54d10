"""The benchmark suite: ``python -m bench`` runs each benchmark in its own process and prints its
last line (a ratio against a baseline run in the same process), then the table of all of them.

    python -m bench [--only rollout,overlap] [--quick]

``--quick`` runs each benchmark at a tiny size, seconds each: a check that every benchmark still runs
and names its figure on its last line (the default tests run it), not a measurement. A benchmark
whose last line is not ``<its figure>=<value>`` counts as failed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite: its script with arguments, the extra arguments of a ``--quick`` run
    (a tiny size: seconds, not minutes), and the name of the figure its last line prints
    (``<figure>=<value>``)."""

    command: str
    quick: str
    figure: str
    #: a quick run starts it in a fresh interpreter too (it sets process-wide state before its imports)
    fresh: bool = False


#: a tiny rollout of the toy-sized SD3-class model (one image of 32 px, 2 steps)
TINY_ROLLOUT = "--repeats 1 --steps 2 --size 32 --batch 1"
TINY_FLUX = "bench/configs/tiny_flux_transformer.json"
#: benchmark -> its script, its quick arguments and its figure
SUITE = {
    "rollout": Benchmark("rollout.py", TINY_ROLLOUT, "rollout_vs_diffusers"),
    "rollout_compiled": Benchmark("rollout.py --compile", f"{TINY_ROLLOUT} --compile-backend eager",
                                  "rollout_vs_diffusers"),
    "rollout_cfg_split": Benchmark("rollout.py --cfg-split", TINY_ROLLOUT, "rollout_vs_diffusers"),
    "flow_grpo_iteration": Benchmark("flow_grpo_iteration.py", "--iterations 2 --size 32 --steps 2",
                                     "flow_grpo_iteration_vs_reference"),
    "flow_grpo_iteration_compiled": Benchmark("flow_grpo_iteration.py --compile",
                                              "--iterations 2 --size 32 --steps 2 --compile-backend eager",
                                              "flow_grpo_iteration_vs_reference"),
    "flow_grpo_iteration_reuse_graph": Benchmark("flow_grpo_iteration.py --reuse-graph",
                                                 "--iterations 2 --size 32 --steps 2",
                                                 "flow_grpo_iteration_vs_reference"),
    "tree": Benchmark("tree.py", "--repeats 1 --steps 4 --splits 0,2 --size 32", "tree_vs_independent_wall_per_leaf"),
    "triton_step": Benchmark("triton_step.py", "--repeats 1 --shape 2,16,8,8", "triton_vs_eager_step",
                                 fresh=True),  # TRITON_INTERPRET before triton loads
    "overlap": Benchmark("overlap.py", "--prompts 2 --group 2 --chunks 2 --repeats 1", "overlapped_vs_synchronous"),
    "outside_model": Benchmark("outside_model.py", "--iterations 2 --batch 4 --size 32", "outside_model_share"),
    "remote_reward": Benchmark("remote_reward.py", "--batches 4 --clients 2 --batch 2", "remote_vs_local_throughput"),
    "backprop_memory": Benchmark("backprop_memory.py", "--batch 2 --ks 20", "ckpt_vs_plain_at_20"),
    "search": Benchmark("search.py", "--seeds 1 --candidates 4 --prompts 2", "pruned_vs_best_of_n_at_equal_cost"),
    "rewards": Benchmark("rewards.py", "--batch 2 --size 32 --seconds 0 --only digit aesthetic critique",
                         "slowest_reward_items_per_second"),
    "memory": Benchmark("memory.py --models sd3", "--methods reward_backprop", "ckpt_vs_lora_peak"),
    "real_models": Benchmark("real_models.py", "--only z_image", "lora_offload_fits_80gib"),
    "soak": Benchmark("soak.py", "--iterations 4 --checkpoint-every 1", "soak_rss_slope_mib_per_100_iterations"),
    "methods": Benchmark("methods.py --nfe 6400", "--nfe 200 --methods flow_grpo,reward_backprop",
                         "best_gain_per_1k_nfe"),
    "async_rollout": Benchmark("async_rollout.py", "--iterations 3 --group 2 --steps 2",
                               "async_vs_sync_wall_per_iteration"),
    "attention": Benchmark(f"attention.py --config {TINY_FLUX}", "--tokens 64 --text 8 --repeats 1",
                           "attention_backends_run"),
    **{f"rollout_{family}": Benchmark(f"rollout.py --model {family}", "--repeats 1 --steps 2 --batch 1",
                                      f"rollout_vs_diffusers_{family}")
       for family in ("qwen_image", "flux2", "flux2_klein", "z_image", "z_image_turbo", "wan22_a14b", "wan22_ti2v",
                      "wan22_i2v", "hunyuan_video15", "hunyuan_video15_i2v")},
}


#: scripts of bench/ that are not benchmarks
HELPERS = ("fork_server.py",)

#: what every benchmark imports (about 8 s of a tiny run): a quick run imports it once and forks a
#: process per benchmark from there
PRELOAD = ("torch", "diffusers", "transformers", "peft", "accelerate", "align.trainers", "pipelines.registry",
           "pipelines.toy", "rewards.registry")


def preload() -> None:
    """Import :data:`PRELOAD` (the project's root on the path): what the children forked from here share."""
    sys.path.insert(0, str(HERE.parent))
    for module in PRELOAD:
        importlib.import_module(module)


def run_in_child(script: str | Path, argv: list[str], fds: list[int], cwd: str | None = None, close=()) -> int:
    """Fork a child that runs ``script`` (``-``: the program on its standard input) as ``__main__`` with
    ``argv`` and ``fds`` as its standard input, output and error (or output and error), its modules already
    imported; ``close``: sockets the child must not hold. Returns the child's pid."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            for sock in close:
                sock.close()
            for target, fd in zip((0, 1, 2) if len(fds) == 3 else (1, 2), fds):
                os.dup2(fd, target)
            if cwd:
                os.chdir(cwd)
            sys.argv = [str(script), *argv]
            if str(script) == "-":
                sys.path[0] = ""
                exec(compile(sys.stdin.read(), "<stdin>", "exec"), {"__name__": "__main__"})
            else:
                sys.path[0] = str(Path(script).resolve().parent)
                runpy.run_path(str(script), run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def _forked(script: Path, argv: list[str]) -> tuple[int, str, str]:
    """Run ``script`` as ``__main__`` in a child forked from this process (its modules already
    imported): (exit status, stdout, stderr)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        pid = run_in_child(script, argv, [out.fileno(), err.fileno()])
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        out.seek(0)
        err.seek(0)
        return status, out.read(), err.read()


#: set in the benchmarks a quick run forks: one that measures in worker processes of its own (bench/memory.py,
#: bench/backprop_memory.py: a clean memory peak each) forks them too, instead of importing everything again
FORK_WORKERS_ENV = "ALIGN_BENCH_FORK_WORKERS"


def run_worker(script: str, argv: list[str]) -> tuple[int, str, str]:
    """A benchmark's worker process, ``script argv``: a fresh interpreter (its own memory peak), or in a quick
    run a child forked from the benchmark (its peak then starts at the parent's: a smoke figure). Returns
    (exit status, stdout, stderr)."""
    if os.environ.get(FORK_WORKERS_ENV) and hasattr(os, "fork"):
        return _forked(Path(script), argv)
    done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, cwd=HERE.parent)
    return done.returncode, done.stdout, done.stderr


def run_benchmark(name: str, quick: bool) -> tuple[str, float]:
    """Run one benchmark in its own process (a fresh interpreter; a quick run forks one that has the
    common modules imported): (its last line, or ``failed (...)``, and its seconds)."""
    bench = SUITE[name]
    script, *options = bench.command.split()
    options += bench.quick.split() if quick else []
    start = time.perf_counter()
    if quick and hasattr(os, "fork") and not bench.fresh:
        returncode, stdout, stderr = _forked(HERE / script, options)
    else:
        done = subprocess.run([sys.executable, str(HERE / script), *options], capture_output=True, text=True,
                              cwd=HERE.parent)
        returncode, stdout, stderr = done.returncode, done.stdout, done.stderr
    lines = [line for line in stdout.splitlines() if line.strip()]
    if returncode != 0 or not lines:
        last = f"failed ({stderr.strip().splitlines()[-1:]})"
    elif not lines[-1].startswith(f"{bench.figure}="):
        last = f"failed (its last line {lines[-1]!r} does not name {bench.figure})"
    else:
        last = lines[-1]
    return last, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(SUITE), help=f"comma-separated: {', '.join(SUITE)}")
    parser.add_argument("--quick", action="store_true", help="every benchmark at a tiny size (seconds each)")
    args = parser.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SUITE]
    if unknown:
        parser.error(f"unknown benchmark {unknown[0]!r} (valid: {', '.join(SUITE)})")
    if args.quick and hasattr(os, "fork"):
        os.environ[FORK_WORKERS_ENV] = "1"
        preload()
    results = []
    for name in chosen:
        last, seconds = run_benchmark(name, args.quick)
        print(f"{name}: {last}", flush=True)
        results.append((name, last, seconds))
    print("\n| benchmark | result | seconds |\n|---|---|---|")
    for name, last, seconds in results:
        print(f"| {name} | `{last}` | {seconds:.0f} |")
    return 0 if all(not r[1].startswith("failed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
