"""The share of a Flow-GRPO iteration's wall time spent outside the model's forward and backward.

One small SD3-class model (bench/rollout.py's, random weights), LoRA, CFG, ``--batch`` samples per
iteration (prompts x group), 10 steps, the PPO + KL loss over 9 of them. The denoiser's forward
calls are timed with module hooks and backward passes around accelerate's ``backward``; the rest
of each iteration (kernels, log-probs, advantages, reward, decoding, optimizer, bookkeeping) is the
share outside the model. Iteration 1 is a warm-up; the later ones are summed. Last line
``outside_model_share=<fraction>`` (goal: under 0.10).

    python bench/outside_model.py [--iterations 3] [--batch 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class ModelClock:
    """Wall time inside the module's forward calls (outermost only) and inside every backward pass
    (accelerate's ``backward``: the graph is the model's but for the loss arithmetic on top; module
    backward hooks do not fire when no input of the model needs a gradient, as under LoRA)."""

    def __init__(self, module: torch.nn.Module) -> None:
        from accelerate import Accelerator

        self.seconds, self.depth, self.start = 0.0, 0, 0.0
        module.register_forward_pre_hook(lambda m, a: self.enter())
        module.register_forward_hook(lambda m, a, o: self.leave())
        backward = Accelerator.backward

        def timed_backward(accelerator, loss, **kwargs):
            self.enter()
            try:
                return backward(accelerator, loss, **kwargs)
            finally:
                self.leave()

        Accelerator.backward = timed_backward

    def enter(self) -> None:
        if self.depth == 0:
            self.start = time.perf_counter()
        self.depth += 1

    def leave(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self.seconds += time.perf_counter() - self.start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="samples per iteration (2 prompts x batch / 2)")
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    from bench.rollout import build_small_sd3

    from align.config import load_config
    from align.models import ModelConfig, load_model
    import align.trainers.common as common
    from align.trainers import trainer_module

    with tempfile.TemporaryDirectory() as tmp:
        path = build_small_sd3(Path(tmp) / "sd3", args.size)
        adapter = load_model(ModelConfig(name="sd3", path=str(path), device="cpu", dtype="float32"))
        clock = ModelClock(adapter.denoiser)
        marks = []
        original = common.end_iteration

        def end_iteration(run, *a, **k):
            original(run, *a, **k)
            marks.append((time.perf_counter(), clock.seconds))

        common.end_iteration = end_iteration
        module = trainer_module("flow_grpo")
        for name in list(vars(module)):
            if getattr(module, name) is original:
                setattr(module, name, end_iteration)
        config = load_config(module.CONFIG, None, [
            "model.name=sd3", f"model.path={path}", "model.device=cpu", "model.dtype=float32",
            "rewards=[jpeg_compressibility]", "heldout_rewards=[]", "prompts=['a cat', 'a dog']",
            "eval_prompts=['a cat']", "eval.per_prompt=1", "eval.num_steps=2", f"iterations={args.iterations}",
            "prompts_per_iteration=2", f"group_size={args.batch // 2}", "rollout.num_steps=10",
            "rollout.guidance_scale=4.5", f"model.height={args.size}", f"model.width={args.size}", "ppo.kl_beta=0.04",
            "run.log_with=none", "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={tmp}/run"])
        module.train(config, adapter=adapter)
    (t0, m0), (t1, m1) = marks[0], marks[-1]
    wall, model = t1 - t0, m1 - m0
    print(f"{len(marks) - 1} iterations after the warm-up: {wall:.2f} s, in the model's forward / backward "
          f"{model:.2f} s, outside {wall - model:.2f} s")
    print(f"outside_model_share={(wall - model) / wall:.3f}")


if __name__ == "__main__":
    main()
