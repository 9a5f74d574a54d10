"""Attention backends against native SDPA on one transformer call.

A FLUX transformer is built from a JSON config of ``bench/configs/`` (random weights; by default
FLUX.1-dev's at a reduced layer count) and called once on one image's packed latents and a text
sequence, through each backend of diffusers' attention dispatch that imports here (``native`` is torch
SDPA, then ``flash``, ``sage``, ``xformers``): the prediction's largest difference from SDPA's, the
milliseconds per call (median of ``--repeats`` after a warm-up) and, on CUDA, the peak allocated
memory of the calls. Backends that cannot run here are listed with why. Last line
``attention_backends_run=<ran>/<tried>``.

    python bench/attention.py --device cuda --dtype bfloat16 [--tokens 4096] [--text 512] [--repeats 5]
    python bench/attention.py --config bench/configs/tiny_flux_transformer.json --tokens 64 --text 8 --repeats 1
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BACKENDS = ("native", "flash", "sage", "xformers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "bench/configs/flux1_dev_transformer_reduced.json"))
    parser.add_argument("--tokens", type=int, default=4096, help="image tokens (a square: 4096 is 1024 px)")
    parser.add_argument("--text", type=int, default=512, help="text tokens")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    from diffusers import FluxTransformer2DModel

    from align.attention import backend_problem
    from bench.rollout import transformer_config

    cuda, dtype = args.device.startswith("cuda"), getattr(torch, args.dtype)
    config = transformer_config(args.config)
    torch.manual_seed(0)
    with torch.device(args.device):
        model = FluxTransformer2DModel(**config).to(dtype).eval()
    side = math.isqrt(args.tokens)
    g = torch.Generator().manual_seed(0)
    b, width = args.batch, config.get("in_channels", 64)
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    inputs = dict(
        hidden_states=torch.randn(b, side * side, width, generator=g),
        encoder_hidden_states=torch.randn(b, args.text, config.get("joint_attention_dim", 4096), generator=g),
        pooled_projections=torch.randn(b, config.get("pooled_projection_dim", 768), generator=g),
        timestep=torch.full((b,), 0.6), img_ids=torch.stack([torch.zeros_like(rows), rows, cols], -1).flatten(0, 1),
        txt_ids=torch.zeros(args.text, 3), guidance=torch.full((b,), 3.5) if config.get("guidance_embeds") else None)
    inputs = {k: v.to(args.device, dtype if v.is_floating_point() and k not in ("img_ids", "txt_ids") else v.dtype)
              if v is not None else None for k, v in inputs.items()}

    def call() -> torch.Tensor:
        with torch.no_grad():
            out = model(**inputs, return_dict=False)[0]
        if cuda:
            torch.cuda.synchronize()
        return out

    params = sum(p.numel() for p in model.parameters())
    print(f"model: FluxTransformer2DModel of {Path(args.config).name} (random weights, {params / 1e6:.1f}M params), "
          f"{config.get('num_layers')} double + {config.get('num_single_layers')} single blocks, batch {b}, "
          f"{side * side} image + {args.text} text tokens, {args.device} {args.dtype}, {args.repeats} repeats")
    reference, ran = None, 0
    for name in BACKENDS:
        problem = backend_problem(name)
        if problem is not None:
            print(f"{name:>9s}: unavailable ({problem[:120]})")
            continue
        try:
            model.set_attention_backend(name)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            out = call()  # warm-up, and the prediction compared
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                call()
                times.append(time.perf_counter() - start)
        except Exception as err:  # a backend whose package imports but whose kernel refuses this device / dtype
            print(f"{name:>9s}: failed ({type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''})")
            continue
        ran += 1
        if reference is None:
            reference = out.float()
        diff = float((out.float() - reference).abs().max())
        memory = f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else "peak: CPU, n/a"
        label = "native (SDPA)" if name == "native" else name
        print(f"{label:>13s}: {statistics.median(times) * 1e3:9.2f} ms per call  max |diff| vs SDPA {diff:.2e}  "
              f"{memory}")
    print(f"attention_backends_run={ran}/{len(BACKENDS)}")


if __name__ == "__main__":
    main()
