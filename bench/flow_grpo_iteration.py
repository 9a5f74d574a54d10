"""One Flow-GRPO iteration: align's trainer vs a loop written the way the public reference code does it.

The same small SD3-class model (bench/rollout.py's, random weights), LoRA rank 32 on the attention
projections, CFG 4.5, 2 prompts x 4 samples, 10 SDE steps, a JPEG-compressibility reward, and the
PPO-clip + KL loss (beta 0.04) over steps 0..8 with the unconditional CFG branch detached, one
optimizer update per iteration. Both include prompt encoding, VAE decoding and the reward.

The baseline (:func:`reference_iteration`) samples step by step with the transformer on the
[uncond; cond] batch, then trains step by step: the policy on the CFG batch with gradients, again
with the adapter off for the KL reference, a backward per step. Ours is ``align``'s Flow-GRPO
trainer with its defaults, whose levers are:

- ``rollout.cfg_split`` (on in Flow-GRPO): the CFG branches are separate model calls, so the
  re-score's backward runs through the conditional rows only (the unconditional branch is detached
  anyway), and the rollout keeps each step's unconditional prediction, which every re-score before
  the iteration's first update reuses (same weights, same inputs, same call: the first ratio stays
  exactly 1; ``train/on_policy_approx_kl`` is printed);
- ``--reuse-graph``: ``reuse_rollout_graph``: the rollout's conditional calls keep their graphs and
  the PPO pass backpropagates them, so training runs no policy forward (the ratios are the
  rollout's own values); it holds every step's activations until training;
- ``--compile``: ``run.compile`` (inductor; the compile time is left out with the warm-up).

Iteration 1 of each is a warm-up; the medians of the rest are compared. Printed: seconds per
iteration, images per second and peak memory (CUDA: the allocator's peak) of each, and last
``flow_grpo_iteration_vs_reference=<ours / baseline>`` (goal: at most 0.7).

    python bench/flow_grpo_iteration.py [--iterations 4] [--compile] [--reuse-graph] [--no-split]
    # on a GPU, a real model (bf16, 512 px):
    python bench/flow_grpo_iteration.py --model sd3 --model-path /models/sd3.5-medium --device cuda --dtype bfloat16 --size 512
    python bench/flow_grpo_iteration.py --model flux --model-path /models/flux.1-dev --device cuda --dtype bfloat16 --size 512
    # on a GPU, SD3.5 Medium's real-size transformer with random weights (bench/rollout.py's build_sd3_from_config):
    python bench/flow_grpo_iteration.py --transformer-config bench/configs/sd35_medium_transformer.json --device cuda --dtype bfloat16 --size 128

``--steps`` changes the 10 SDE steps (training runs over all but the last), for a quick run.
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

PROMPTS = ["a photo of a cat", "a red car on a street"]
GROUP, STEPS, GUIDANCE, BETA, CLIP = 4, 10, 4.5, 0.04, 1e-4


def reference_iteration(adapter, reward, optimizer, size: int, generator: torch.Generator) -> None:
    """The reference's loop structure, from the math of Flow-GRPO (METHODS.md): per-step CFG-batch
    calls in sampling and in training, the KL reference as a second call with the adapter off."""
    from align.losses import flow_grpo_kl, ppo_clip_loss
    from align.sampling.kernels import flow_grpo_sde_step

    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    cond = adapter.encode(prompts, "", GUIDANCE)
    embeds = cond.cfg_batch() if cond.uses_cfg else None
    schedule = adapter.schedule(STEPS, latent_shape=adapter.latent_shape(size, size))

    def guided(x, i):
        if not cond.uses_cfg:  # a guidance-distilled model (FLUX.1-dev): one call, guidance in cond.extra
            return adapter.forward(x, schedule.timesteps[i].expand(len(x)), cond.tensors, cond.extra).float()
        t = schedule.timesteps[i].expand(2 * len(x))
        uncond, text = adapter.forward(torch.cat([x, x]), t, embeds, cond.extra).float().chunk(2)
        return uncond.detach() + GUIDANCE * (text - uncond.detach())

    with torch.no_grad():
        x = adapter.initial_noise(len(prompts), generator, height=size, width=size)
        trajectory = []
        for i in range(STEPS):
            out = flow_grpo_sde_step(x, guided(x, i), schedule.levels[i], schedule.levels[i + 1], generator=generator)
            trajectory.append((x, out.prev_sample, out.log_prob))
            x = out.prev_sample
        scores = reward(adapter.decode(x), prompts).total
    grouped = scores.view(len(PROMPTS), GROUP)
    advantages = ((grouped - grouped.mean(1, keepdim=True)) / (scores.std() + 1e-8)).flatten().clamp(-5, 5)

    trained = range(STEPS - 1)
    for i in trained:
        x, x_next, old_log_prob = trajectory[i]
        level, level_next = schedule.levels[i], schedule.levels[i + 1]
        new = flow_grpo_sde_step(x, guided(x, i), level, level_next, prev_sample=x_next)
        with torch.no_grad(), adapter.disable_adapter():
            ref = flow_grpo_sde_step(x, guided(x, i), level, level_next, prev_sample=x_next)
        loss, _ = ppo_clip_loss(new.log_prob, old_log_prob, advantages, CLIP)
        loss = loss + BETA * flow_grpo_kl(new.mean, ref.mean, new.std, level_next - level).mean()
        (loss / len(trained)).backward()
    torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=4, help="per side, the first a warm-up")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--compile", action="store_true", help="ours with run.compile (inductor)")
    parser.add_argument("--compile-backend", default="inductor", help="with --compile: torch.compile's backend")
    parser.add_argument("--no-split", action="store_true", help="ours without rollout.cfg_split (the lever off)")
    parser.add_argument("--reuse-graph", action="store_true",
                        help="ours with reuse_rollout_graph (the rollout's graphs train the first pass)")
    parser.add_argument("--model", default="sd3", help="adapter name (with --model-path: a real model)")
    parser.add_argument("--model-path", help="a local diffusers folder or hub name (default: the small random SD3)")
    parser.add_argument("--transformer-config",
                        help="the SD3 transformer built from this JSON config, random weights (not the small one)")
    parser.add_argument("--steps", type=int, default=STEPS, help="SDE steps per rollout")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    STEPS = args.steps
    if args.device == "cpu":
        torch.set_num_threads(2)
    cuda = args.device.startswith("cuda")

    def peak_gib() -> float:
        if cuda:
            return torch.cuda.max_memory_allocated() / 2**30
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    from bench.rollout import build_sd3_from_config, build_small_sd3, describe_transformer

    import align.trainers.common as common
    from align.config import load_config
    from align.models import ModelConfig, load_model
    from align.trainers import trainer_module
    from rewards import build_rewards

    with tempfile.TemporaryDirectory() as tmp:
        if args.model_path:
            path = args.model_path
        elif args.transformer_config:
            path = build_sd3_from_config(Path(tmp) / "sd3", args.transformer_config, dtype=getattr(torch, args.dtype),
                                         device=args.device)
        else:
            path = build_small_sd3(Path(tmp) / "sd3", args.size)
        model = ModelConfig(name=args.model, path=str(path), device=args.device, dtype=args.dtype)
        # the baseline: its own copy of the model with the same LoRA
        reference = load_model(model)
        reference.add_lora(rank=32, alpha=64)
        lora = [p for p in reference.denoiser.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(lora, lr=3e-4, weight_decay=1e-4)
        reward = build_rewards(["jpeg_compressibility"])
        generator = torch.Generator().manual_seed(0)

        def baseline(n: int) -> list[float]:
            times = []
            for _ in range(n):
                start = time.perf_counter()
                reference_iteration(reference, reward, optimizer, args.size, generator)
                times.append(time.perf_counter() - start)
            return times

        if cuda:
            torch.cuda.reset_peak_memory_stats()
        baseline_times = baseline(args.iterations)[1:]
        baseline_peak = peak_gib()
        if cuda:  # ours is measured alone on the device
            reference = optimizer = lora = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        adapter = load_model(model)
        marks, metrics_seen = [], []
        original = common.end_iteration

        def end_iteration(run, config, reward, heldout, metrics, nfe):
            original(run, config, reward, heldout, metrics, nfe)
            marks.append(time.perf_counter())
            metrics_seen.append(dict(metrics))

        module = trainer_module("flow_grpo")
        for name in list(vars(module)):
            if getattr(module, name) is original:
                setattr(module, name, end_iteration)
        overrides = [
            f"model.name={args.model}", f"model.path={path}", f"model.device={args.device}", f"model.dtype={args.dtype}",
            "rewards=[jpeg_compressibility]", "heldout_rewards=[]", f"prompts={PROMPTS}",
            "eval_prompts=['a cat']", "eval.per_prompt=1", "eval.num_steps=2", f"iterations={args.iterations + 1}",
            "prompts_per_iteration=2", f"group_size={GROUP}", f"rollout.num_steps={STEPS}",
            f"rollout.guidance_scale={GUIDANCE}", f"model.height={args.size}", f"model.width={args.size}",
            f"ppo.kl_beta={BETA}", f"ppo.clip_range={CLIP}", "adv_std=global", "run.log_with=none", "run.progress=false",
            "run.checkpoint_every=0", f"run.output_dir={tmp}/run", f"run.compile={args.compile}",
            f"run.compile_options={{backend: {args.compile_backend}}}",
            f"rollout.cfg_split={not args.no_split}", f"reuse_rollout_graph={args.reuse_graph}"]
        start = time.perf_counter()
        module.train(load_config(module.CONFIG, None, overrides), adapter=adapter)
        ours_times = [b - a for a, b in zip([start] + marks[:-1], marks)][2:]  # start-up + warm-up left out
        ours_peak = peak_gib()
        if not cuda:
            baseline_times += baseline(max(2, args.iterations // 2))  # the baseline again, after ours

    base, ours = statistics.median(baseline_times), statistics.median(ours_times)
    on_policy = max(m.get("train/on_policy_approx_kl", float("nan")) for m in metrics_seen)
    title = args.model_path or describe_transformer(args.transformer_config)
    print(f"model: {title}, {args.size}px, {len(PROMPTS)} prompts x {GROUP}, {STEPS} steps, "
          f"CFG {GUIDANCE}, LoRA r32, PPO + KL (beta {BETA}) over {STEPS - 1} steps, one update per iteration")
    images = len(PROMPTS) * GROUP
    memory = "peak allocated" if cuda else "peak resident set of the process so far"
    print(f"reference-style loop: median {base:.2f} s per iteration ({len(baseline_times)} iterations), "
          f"{images / base:.2f} images/s, {memory} {baseline_peak:.2f} GiB")
    levers = (" (compiled)" if args.compile else "") + (" without cfg_split" if args.no_split else "") + (
        " with reuse_rollout_graph" if args.reuse_graph else "")
    print(f"align flow_grpo{levers}: "
          f"median {ours:.2f} s per iteration ({len(ours_times)} iterations), {images / ours:.2f} images/s, "
          f"{memory} {ours_peak:.2f} GiB; train/on_policy_approx_kl = {on_policy:g}")
    print(f"flow_grpo_iteration_vs_reference={ours / base:.3f}")


if __name__ == "__main__":
    main()
