"""Every online-RL method on the embedded default model at the same compute budget.

Each method fine-tunes the toy digit model against the digit-classifier reward until it has spent
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


def common_overrides() -> list[str]:
    """The quickstart's model, reward, prompts and LoRA settings (no CFG: the digits the base model
    draws least reliably, so every method has room to improve)."""
    import json

    from omegaconf import OmegaConf

    quick = OmegaConf.load(ROOT / "configs" / "quickstart.yaml")
    return ["model.name=toy", "rewards=[digit]", f"prompts={json.dumps(list(quick.prompts))}",
            f"eval_prompts={json.dumps(list(quick.eval_prompts))}", "run.eval_per_prompt=8",
            "run.log_with=none", "run.resume=null", "run.progress=false", "run.checkpoint_every=0",
            "rollout.num_steps=10", "rollout.guidance_scale=1.0", "lora.rank=8", "lora.alpha=16",
            "optim.lr=2e-3", "prompts_per_iteration=4", "iterations=1000"]


#: name -> (trainer, overrides)
METHODS = {
    "flow_grpo": ("flow_grpo", ["group_size=8", "clip_range=0.2", "kl_beta=0"]),
    "flow_grpo_fast": ("flow_grpo", ["group_size=8", "clip_range=0.2", "kl_beta=0", "window_size=3"]),
    "flow_grpo_guard": ("flow_grpo", ["group_size=8", "clip_range=0.2", "kl_beta=0", "guard=true"]),
    "dance_grpo": ("flow_grpo", ["group_size=8", "clip_range=0.2", "kl_beta=0", "rollout.kernel=dance_grpo",
                                 "rollout.same_noise_per_group=true", "timestep_fraction=0.6"]),
    "cps_grpo": ("flow_grpo", ["group_size=8", "clip_range=0.2", "kl_beta=0", "rollout.kernel=cps"]),
    "branch_grpo": ("branch_grpo", []),
    "branch_grpo_pruned": ("branch_grpo", ["width_keep_fraction=0.5"]),
    "dense_grpo": ("dense_grpo", ["group_size=8", "clip_range=0.2"]),
    "tempflow_grpo": ("tempflow_grpo", ["group_size=2", "clip_range=0.2"]),
    "diffusion_nft": ("diffusion_nft", ["group_size=8"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, default=20000, help="model evaluations per method")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--seeds", default="0", help="training seeds, e.g. 0,1,2 (the table gives mean and std)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest for the toy model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from align.config import load_config
    from align.trainers import trainer_module

    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for name in args.methods.split(","):
        trainer, overrides = METHODS[name]
        try:
            module = trainer_module(trainer)
        except ModuleNotFoundError:
            print(f"{name}: trainer {trainer} not available, skipped")
            continue
        befores, afters, walls = [], [], []
        for seed in seeds:
            with tempfile.TemporaryDirectory() as tmp:
                config = load_config(module.CONFIG, None, common_overrides() + overrides + [
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
