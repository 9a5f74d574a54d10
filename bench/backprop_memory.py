"""Peak memory of reward backprop against the number of steps that keep gradients (K), with and
without per-step (non-reentrant) checkpointing, on the embedded toy model.

Each setting runs in its own subprocess: a 20-step ODE rollout of a batch whose last K steps keep
gradients, the decode and the digit reward, then the backward pass into the LoRA. Measured: the
peak memory the step adds over a no-gradient rollout of the same batch (CUDA: the allocator's peak;
CPU: the process's peak resident set). Printed: a table, the memory per kept step of each mode
(the slope of a least-squares line), and last ``ckpt_vs_plain_at_20=<x>`` (goal: at most 0.33).

    python bench/backprop_memory.py [--batch 32] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
KS = (1, 5, 10, 20)


def worker(k: int, checkpointed: bool, batch: int, device: str) -> dict:
    import resource

    import torch

    sys.path.insert(0, str(ROOT))
    from align.models import ModelConfig, load_model
    from align.sampling.rollout import RolloutConfig, rollout
    from rewards.registry import build_reward

    torch.set_num_threads(2)
    adapter = load_model(ModelConfig(name="toy", device=device))
    adapter.base_denoiser.requires_grad_(False)
    adapter.add_lora(rank=8, alpha=16)
    reward = build_reward("digit").to(device)
    prompts = [f"a red digit {i % 10}" for i in range(batch)]
    cond = adapter.encode(prompts, guidance_scale=1.0)
    config = RolloutConfig(kernel="ode", num_steps=STEPS)
    cuda = device.startswith("cuda")

    def peak() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**20
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the baseline: the same rollout, decode and reward without a graph
        pixels = adapter.decode(rollout(adapter, cond, config, generator=generator).samples)
        reward(pixels, prompts)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = peak()
    result = rollout(adapter, cond, config, generator=torch.Generator().manual_seed(0),
                     grad_steps=range(STEPS - k, STEPS), checkpoint_grad_steps=checkpointed)
    loss = -reward(adapter.decode(result.samples), prompts).total.mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"k": k, "checkpointed": checkpointed, "added_mib": peak() - before}


def slope(points: list[tuple[int, float]]) -> float:
    n = len(points)
    mean_k = sum(k for k, _ in points) / n
    mean_m = sum(m for _, m in points) / n
    return sum((k - mean_k) * (m - mean_m) for k, m in points) / sum((k - mean_k) ** 2 for k, _ in points)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ks", default=",".join(map(str, KS)), help="kept steps to measure (20 among them)")
    parser.add_argument("--worker", nargs=2, metavar=("K", "CHECKPOINTED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        k, checkpointed = int(args.worker[0]), args.worker[1] == "1"
        print(json.dumps(worker(k, checkpointed, args.batch, args.device)))
        return
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import run_worker

    ks = [int(k) for k in args.ks.split(",")]
    results = {}
    for checkpointed in (False, True):
        for k in ks:
            code, stdout, stderr = run_worker(__file__, ["--worker", str(k), str(int(checkpointed)), "--batch",
                                                         str(args.batch), "--device", args.device])
            if code != 0:
                raise SystemExit(f"the worker for K={k} failed: {stderr.strip().splitlines()[-1:]}")
            results[(k, checkpointed)] = json.loads(stdout.strip().splitlines()[-1])["added_mib"]
    print(f"reward backprop, toy model, batch {args.batch}, {STEPS}-step ODE rollouts, {args.device}: "
          f"memory added by the gradient step (MiB)")
    print(f"{'K':>4s} {'plain':>9s} {'checkpointed':>13s} {'ratio':>7s}")
    for k in ks:
        plain, ckpt = results[(k, False)], results[(k, True)]
        print(f"{k:4d} {plain:9.1f} {ckpt:13.1f} {ckpt / plain:7.3f}")
    for label, flag in (("plain", False), ("checkpointed", True)) if len(ks) > 1 else ():
        print(f"per_kept_step_{label}_mib={slope([(k, results[(k, flag)]) for k in ks]):.2f}")
    print(f"ckpt_vs_plain_at_20={results[(20, True)] / results[(20, False)]:.3f}")


if __name__ == "__main__":
    main()
