"""Peak memory of one training iteration per model class, method and recipe, measured on small
models, with the expected figure for the real model.

Each (model, recipe) runs in its own subprocess: the small model loads, then one iteration of the
method trains (2 prompts x 2 samples, 4 steps, CFG) while a thread samples the process's resident
set every 2 ms; the figure is the peak over the iteration minus the resident set after loading (on
CUDA: ``torch.cuda.max_memory_allocated`` over the same window). The optimizer state column sums the
optimizer's state tensors after the update (the small models' states are too small to stand out of
the resident set's noise). Recipes:

- ``lora``: LoRA rank 32 on the adapter's attention projections (the default);
- ``full``: full fine-tuning (the reference is a frozen copy of the denoiser);
- ``lora+ckpt``: ``run.gradient_checkpointing`` (reward backprop: its per-step checkpointing is on
  by default, ``checkpoint_steps``, so ``lora`` turns it off there and ``lora+ckpt`` keeps both);
- ``lora+offload``: ``model.offload_text_encoders`` (accelerate's cpu_offload: on a GPU the text
  encoders leave its memory; on a CPU machine there is nothing to move them to, so the column
  shows no change);
- ``full+adamw8bit``: full fine-tuning with ``optim.name: adamw8bit`` (bitsandbytes' 8-bit moments,
  which run on the CPU too).

The expected column is the static memory of the real model on one GPU in bf16: the weights on the
device (2 bytes per parameter; offloaded text encoders excluded), plus for LoRA 16 bytes per LoRA
parameter (fp32 weight, gradient, two Adam moments) and for full fine-tuning 16 bytes per denoiser
parameter (fp32 master weight, gradient, two moments) plus a bf16 reference copy. Activations come
on top: the measured ``lora+ckpt`` / ``lora`` ratio says how much of them checkpointing removes. The
8-bit optimiser cuts the moments from 8 to 2 bytes per trained parameter (10 bytes per parameter
for full fine-tuning instead of 16).

    python bench/memory.py [--models sd3,flux,wan] [--device cpu]
    python bench/memory.py --real      # Qwen-Image, FLUX.2, Z-Image, Wan 2.2, HunyuanVideo 1.5: static memory (bench/real_models.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

RECIPES = {
    "flow_grpo": {"lora": [], "full": ["lora.enabled=false", "optim.lr=0.0001"],
                  "lora+ckpt": ["run.gradient_checkpointing=true"], "lora+offload": ["model.offload_text_encoders=true"],
                  "full+adamw8bit": ["lora.enabled=false", "optim.lr=0.0001", "optim.name=adamw8bit"]},
    "reward_backprop": {"lora": ["checkpoint_steps=false"], "lora+ckpt": ["run.gradient_checkpointing=true"]},
}
METHOD_OVERRIDES = {"flow_grpo": ["ppo.kl_beta=0.04"], "reward_backprop": ["mode=alignprop", "rewards=[digit]"]}

#: real models: (denoiser params, text encoder params, VAE params, LoRA params at rank 32 on the
#: adapter's default targets), approximate public figures
REAL = {
    # SD3.5 Medium: MMDiT 2.5B (24 blocks, width 1536; 8 joint-attention projections per block, the
    # last without to_add_out: 191 x 32 x 3072); CLIP-L 123M + CLIP-G 695M + T5-XXL 4.76B; VAE 84M
    "sd3": ("SD3.5 Medium", 2.47e9, 5.58e9, 8.4e7, 191 * 32 * 3072),
    # FLUX.1-dev: 11.9B (19 double blocks x 8 projections at 3072 + 38 single blocks x 4); T5-XXL + CLIP-L
    "flux": ("FLUX.1-dev", 1.19e10, 4.88e9, 8.4e7, (19 * 8 + 38 * 4) * 32 * 6144),
    # Wan 2.1 T2V 1.3B: 30 blocks x 8 projections (self + cross attention) at 1536; umT5-XXL 5.7B; VAE 127M
    "wan": ("Wan 2.1 1.3B", 1.42e9, 5.68e9, 1.27e8, 30 * 8 * 32 * 3072),
}


def expected_gib(model: str, recipe: str) -> float:
    _, denoiser, text, vae, lora = REAL[model]
    on_device = denoiser * 2 + vae * 2 + (0 if recipe == "lora+offload" else text * 2)
    if recipe.startswith("full"):  # fp32 master weights and grads, moments (8-bit: 2 bytes), the bf16 reference
        on_device += denoiser * (10 if recipe == "full+adamw8bit" else 16) + denoiser * 2
    else:
        on_device += lora * 16
    return on_device / 2**30


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def worker(model: str, method: str, recipe: str, device: str, directory: str) -> dict:
    import torch

    sys.path.insert(0, str(ROOT))
    import align.trainers.common as common
    import align.trainers.scoring as scoring
    from align.config import load_config
    from align.models import ModelConfig, load_model
    from align.trainers import trainer_module

    torch.set_num_threads(2)
    path = build(model, Path(directory))
    size = ["model.num_frames=5"] if model == "wan" else []
    overrides = [f"model.name={model}", f"model.path={path}", f"model.device={device}", "model.dtype=float32",
                 "model.height=64" if model == "sd3" else "model.height=32",
                 "model.width=64" if model == "sd3" else "model.width=32", *size,
                 "rewards=[jpeg_compressibility]", "heldout_rewards=[]", "prompts=['a cat', 'a dog']",
                 "eval_prompts=['a cat']", "eval.per_prompt=1", "eval.num_steps=1", "iterations=1",
                 "prompts_per_iteration=2", "group_size=2", "rollout.num_steps=4", "rollout.guidance_scale=4.5",
                 "run.log_with=none", "run.progress=false", "run.checkpoint_every=0", f"run.output_dir={directory}/run",
                 *METHOD_OVERRIDES[method], *RECIPES[method][recipe]]
    module = trainer_module(method)
    config = load_config(module.CONFIG, None, overrides)
    adapter = load_model(ModelConfig(name=model, path=str(path), device=device, dtype="float32",
                                     offload_text_encoders="lora+offload" == recipe))
    cuda = device.startswith("cuda")
    window = {"peak": 0.0, "base": None, "stop": False}

    def sample() -> None:
        while not window["stop"]:
            if window["base"] is not None:
                window["peak"] = max(window["peak"], rss_mib())
            time.sleep(0.002)

    original = scoring.sample_and_score

    def start_window(*args, **kwargs):  # the iteration starts with its rollout
        if window["base"] is None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            window["base"] = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib()
        return original(*args, **kwargs)

    end = common.end_iteration

    def close_window(run, *args, **kwargs):
        if cuda:
            window["peak"] = torch.cuda.max_memory_allocated() / 2**20
        window["stop"] = True
        window["optimizer"] = sum(v.numel() * v.element_size() for state in run.optimizer.state.values()
                                  for v in state.values() if torch.is_tensor(v) and v.numel() > 1) / 2**20
        return end(run, *args, **kwargs)

    for name, value in (("sample_and_score", start_window), ("end_iteration", close_window)):
        setattr(module, name, value)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    module.train(config, adapter=adapter)
    params = sum(p.numel() for p in adapter.base_denoiser.parameters())
    return {"peak_mib": window["peak"] - window["base"], "denoiser_params": params,
            "optimizer_mib": window["optimizer"]}


def build(model: str, directory: Path) -> Path:
    from bench.rollout import build_small_sd3
    from tests.tiny_models import build_flux, build_wan

    target = directory / model
    if model == "sd3":
        return build_small_sd3(target, 64)
    return (build_flux if model == "flux" else build_wan)(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd3,flux,wan")
    parser.add_argument("--methods", default=",".join(RECIPES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--real", action="store_true",
                        help="only the expected static memory of the models of bench/real_models.py, counted from their configs")
    args = parser.parse_args()
    if args.real:
        sys.argv = [sys.argv[0]]
        sys.path.insert(0, str(ROOT))
        from bench.real_models import main as real_models

        return real_models()
    if args.worker:
        model, method, recipe = args.worker
        with tempfile.TemporaryDirectory() as tmp:
            print("RESULT " + json.dumps(worker(model, method, recipe, args.device, tmp)), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from bench.__main__ import run_worker

    rows = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            for recipe in RECIPES[method]:
                _, stdout, stderr = run_worker(__file__, ["--device", args.device, "--worker", model, method, recipe])
                line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{model} {method} {recipe}: failed\n{stderr[-1500:]}", file=sys.stderr)
                    continue
                result = json.loads(line[len("RESULT "):])
                rows.append((model, method, recipe, result))
    print("| model class | method | recipe | peak over the loaded model, small model (MiB) | optimizer state, "
          "small model (MiB) | expected on the real model, static (GiB) |")
    print("|---|---|---|---|---|---|")
    for model, method, recipe, result in rows:
        name = REAL[model][0]
        expected = f"{expected_gib(model, recipe):.1f} ({name})" if method == "flow_grpo" else "as flow_grpo's"
        print(f"| {model} ({result['denoiser_params'] / 1e6:.1f}M params) | {method} | {recipe} | "
              f"{result['peak_mib']:.0f} | {result['optimizer_mib']:.1f} | {expected} |")
    # the tiny FLUX / Wan stand-ins have no tensor of 4096 elements: their states all stay 32-bit
    eight = [r["optimizer_mib"] / base["optimizer_mib"] for m, me, rc, r in rows if rc == "full+adamw8bit"
             for m2, me2, rc2, base in rows if (m2, me2, rc2) == (m, me, "full") and r["denoiser_params"] > 1e6]
    if eight:
        print(f"adamw8bit_vs_adamw_optimizer_state={sum(eight) / len(eight):.3f}")
    ratios = [r["peak_mib"] / base["peak_mib"] for m, me, rc, r in rows if rc == "lora+ckpt"
              for m2, me2, rc2, base in rows if (m2, me2, rc2) == (m, me, "lora")]
    if ratios:
        print(f"ckpt_vs_lora_peak={sum(ratios) / len(ratios):.3f}")


if __name__ == "__main__":
    main()
