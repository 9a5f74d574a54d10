"""The fused Triton SDE step (``align/sampling/triton_step.py``) against the eager torch step.

For each kernel (flow_grpo, dance_grpo, cps) and latent shape: the reference torch kernel and the
fused one on the same inputs (sampling with a guided drift, then re-scoring the sample), timed over
``--repeats`` calls after a warm-up; their largest differences are printed beside the times. On CUDA
the fused kernel is compiled; without CUDA it runs in Triton's interpreter (TRITON_INTERPRET=1,
set here), which checks the kernel but is far slower than the eager step: that figure is a report,
not a speed claim. Last line ``triton_vs_eager_step=<fused time / eager time>`` (geometric mean).

    python bench/triton_step.py [--repeats 20] [--shape 8,16,128,128 --shape 4,16,5,60,104] [--dtype bfloat16]

``--shape`` (repeatable; B,C,H,W or B,C,F,H,W) and ``--dtype`` replace the defaults (CUDA: SD3.5-M and
Wan-sized latents in bf16; CPU: small ones in fp32). On CUDA the peak allocated memory is printed too.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def timed(fn, repeats: int, device: str) -> float:
    fn()  # warm-up (compiles on CUDA)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--shape", action="append", default=None,
                        help="latent shape B,C,H,W or B,C,F,H,W (repeatable; default: by device)")
    parser.add_argument("--dtype", default=None, help="latent dtype (default: bfloat16 on CUDA, float32 on the CPU)")
    args = parser.parse_args()
    from align.sampling.kernels import KERNELS
    from align.sampling.triton_step import FUSED_KERNELS, fused_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device == "cuda" else torch.float32
    # SD3.5-M latents at 1024 px (16 x 128 x 128) on CUDA; small image and video latents on the CPU interpreter
    shapes = [(8, 16, 128, 128), (4, 16, 5, 60, 104)] if device == "cuda" else [(8, 4, 16, 16), (2, 16, 3, 8, 8)]
    if args.shape:
        shapes = [tuple(int(n) for n in shape.split(",")) for shape in args.shape]
        if any(len(shape) not in (4, 5) for shape in shapes):
            parser.error("--shape takes B,C,H,W or B,C,F,H,W")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    mode = "compiled (CUDA)" if device == "cuda" else "interpreted (TRITON_INTERPRET=1, CPU)"
    print(f"fused step: {mode}, {dtype}, {args.repeats} repeats")
    ratios, worst = [], 0.0
    with torch.no_grad():
        for kernel in FUSED_KERNELS:
            reference, params = KERNELS[kernel].fn, KERNELS[kernel].defaults
            for shape in shapes:
                g = torch.Generator().manual_seed(0)
                x, v, noise, shift = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(4))
                sigma, sigma_next = torch.full((shape[0],), 0.6, device=device), torch.full((shape[0],), 0.55,
                                                                                              device=device)

                def eager():
                    out = reference(x, v, sigma, sigma_next, noise=noise, mean_shift=shift, **params)
                    return out, reference(x, v, sigma, sigma_next, prev_sample=out.prev_sample, **params)

                def fused():
                    out = fused_step(kernel, x, v, sigma, sigma_next, noise=noise, mean_shift=shift, **params)
                    return out, fused_step(kernel, x, v, sigma, sigma_next, prev_sample=out.prev_sample, **params)

                (e_out, e_again), (f_out, f_again) = eager(), fused()
                diff = max(float((f_out.prev_sample - e_out.prev_sample).abs().max()),
                           float((f_again.log_prob - e_again.log_prob).abs().max()))
                t_eager, t_fused = timed(eager, args.repeats, device), timed(fused, args.repeats, device)
                ratios.append(t_fused / t_eager)
                worst = max(worst, diff)
                print(f"{kernel:>10s} {str(shape):>22s}: eager {t_eager * 1e3:8.3f} ms  fused {t_fused * 1e3:8.3f} ms  "
                      f"ratio {t_fused / t_eager:7.3f}  max |diff| {diff:.2e}")
    print(f"worst max |diff| fused vs eager: {worst:.2e}")
    if device == "cuda":
        print(f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    print(f"triton_vs_eager_step={math.exp(sum(map(math.log, ratios)) / len(ratios)):.3f}")


if __name__ == "__main__":
    main()
