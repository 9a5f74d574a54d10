"""Rollout with log-probs vs stock diffusers ``StableDiffusion3Pipeline.__call__``.

One small SD3-class model (random weights, built in code), one process, the same prompts, steps,
CFG scale, batch and resolution; both include prompt encoding and VAE decoding. Ours runs the
Flow-GRPO SDE and records latents, means, stds and log-probs of every step. Timings alternate
between the two and the median of the repeats is compared; the last line is the ratio
``rollout_vs_diffusers=<ours / diffusers>`` (below 1: faster than diffusers). ``--compile``: ours
runs its own copy of the model with ``run.compile``'s regional compile (inductor; the compile time
is in the warm-up, left out), diffusers stays eager. ``--cfg-split``: ours with ``rollout.cfg_split``
(Flow-GRPO's default), the CFG branches as two calls of half the rows.

``--model NAME`` (a family's stand-in: qwen_image, flux2, flux2_klein, z_image, z_image_turbo, wan22_a14b,
wan22_ti2v, wan22_i2v, hunyuan_video15, hunyuan_video15_i2v) times that family's tiny stand-in of the
tests (its real pipeline classes, text encoders included) against its own pipeline's ``__call__``
at the family's guidance: the last line is ``rollout_vs_diffusers_<NAME>=``.

    python bench/rollout.py [--repeats 5] [--steps 10] [--size 64] [--batch 4] [--compile] [--cfg-split]
    python bench/rollout.py --model qwen_image [--repeats 5] [--steps 10] [--batch 4]

``--transformer-config PATH`` builds the SD3 transformer from a JSON config (``bench/configs/``, e.g.
SD3.5 Medium's) with random weights instead of the small one, keeping the tiny CLIP text encoders
and the tiny VAE (see :func:`build_sd3_from_config`); with ``--device cuda --dtype bfloat16`` it is
the real-size comparison on a GPU (the peak allocated memory is printed too).

    python bench/rollout.py --transformer-config bench/configs/sd35_medium_transformer.json --device cuda --dtype bfloat16 --size 128 [--compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build_small_sd3(directory: Path, size: int) -> Path:
    """An SD3 pipeline big enough that the transformer dominates: 4 joint blocks, width 128."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tests.tiny_models import clip_text_encoder, clip_tokenizer, tiny_vae

    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    te = clip_text_encoder(tok, projection=True, hidden=64, projection_dim=64, seed=1)
    te2 = clip_text_encoder(tok2, projection=True, hidden=64, projection_dim=64, seed=2)
    torch.manual_seed(0)
    latent = size // 2
    transformer = SD3Transformer2DModel(
        sample_size=latent, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=128, caption_projection_dim=128, pooled_projection_dim=128,
        pos_embed_max_size=latent,
    ).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(4, scaling_factor=1.5, shift_factor=0.06, seed=4), text_encoder=te, tokenizer=tok,
        text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(directory)
    return directory


def transformer_config(path: str | Path) -> dict:
    """A JSON config of ``bench/configs/`` without its comment fields (keys starting with ``_``)."""
    return {k: v for k, v in json.loads(Path(path).read_text()).items() if not k.startswith("_")}


def build_sd3_from_config(directory: Path, config_path: str | Path, *, dtype: torch.dtype = torch.float32,
                          device: str = "cpu") -> Path:
    """An SD3 pipeline whose transformer is built from ``config_path`` with random weights (built on
    ``device``, saved in ``dtype``). The text encoders stay tiny (two CLIPs of width 64, no T5): their
    pooled projections are each half the transformer's ``pooled_projection_dim``, so the pooled
    embedding, their concatenation, has its size; their hidden states (128 wide) are zero-padded to
    ``joint_attention_dim`` by the pipeline itself, as it does for any SD3 loaded without T5. The VAE
    is the tiny 2x one of the tests with the transformer's latent channels."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    from tests.tiny_models import clip_text_encoder, clip_tokenizer, tiny_vae

    config = transformer_config(config_path)
    pooled = config.get("pooled_projection_dim", 2048)
    if pooled % 2 or config.get("joint_attention_dim", 4096) < 128:
        raise ValueError(f"{config_path}: pooled_projection_dim must be even and joint_attention_dim at least 128")
    tok, tok2 = clip_tokenizer(), clip_tokenizer()
    te = clip_text_encoder(tok, projection=True, hidden=64, projection_dim=pooled // 2, seed=1)
    te2 = clip_text_encoder(tok2, projection=True, hidden=64, projection_dim=pooled // 2, seed=2)
    torch.manual_seed(0)
    with torch.device(device):
        transformer = SD3Transformer2DModel(**config).to(dtype).eval()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=tiny_vae(config.get("in_channels", 16), scaling_factor=1.5, shift_factor=0.06, seed=4), text_encoder=te,
        tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2, text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(directory)
    del pipe, transformer
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return directory


def describe_transformer(config_path: str | Path | None) -> str:
    if config_path is None:
        return "SD3-class, 4 blocks x width 128"
    config = transformer_config(config_path)
    width = config["num_attention_heads"] * config["attention_head_dim"]
    return (f"SD3 transformer of {Path(config_path).name} (random weights), {config['num_layers']} blocks x "
            f"width {width}")


def peak_memory(device: str) -> str:
    """The allocator's peak on CUDA, the process's peak resident set elsewhere."""
    if device.startswith("cuda"):
        return f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    import resource

    return f"peak resident set of the process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"


def median_times(ours, diffusers_call, repeats: int) -> dict[str, float]:
    """Median seconds of each, after a warm-up of both, the two alternating every repeat."""
    ours(), diffusers_call()
    times = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for name, fn in (("diffusers", diffusers_call), ("ours", ours)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def stock_call_kwargs(case: str, prompts: list, batch: int, guidance: float) -> dict:
    """The stock pipeline's ``__call__`` arguments that sample what the adapter samples at ``guidance``
    (the adapter's scale: Z-Image's pipeline takes g - 1, Qwen-Image's true CFG needs a negative)."""
    if case.startswith("qwen_image"):
        return {"negative_prompt": [""] * len(prompts), "true_cfg_scale": guidance}
    if case.startswith("z_image"):
        return {"negative_prompt": [""] * len(prompts), "guidance_scale": guidance - 1}
    if case.startswith("wan22"):
        return {"negative_prompt": [""] * len(prompts), "guidance_scale": guidance}
    if case.startswith("hunyuan"):  # its guider component holds the scale
        return {"negative_prompt": [""] * len(prompts)}
    return {"guidance_scale": guidance}


def family_main(args) -> None:
    """``--model NAME``: the family's stand-in against its own pipeline."""
    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.base import Prompt
    from pipelines.registry import load_adapter
    from tests.tiny_models import FAMILY_CASES, build_family

    adapter_name, _, _, (height, width, frames), guidance, task = FAMILY_CASES[args.model]
    if args.size_given:  # a larger image makes the transformer's share of the time the real models' one
        height = width = args.size
    prompts = ["a photo of a cat", "a red car on a street"]
    if args.model.startswith("hunyuan"):  # diffusers 0.42's pipeline makes one video per call (batches fail)
        prompts, args.batch = prompts[:1], 1
    with tempfile.TemporaryDirectory() as tmp:
        path = str(build_family(args.model, tmp))
        stock = load_adapter(adapter_name, path)
        adapter = load_adapter(adapter_name, path)
    for model in (stock, adapter):
        model.default_height, model.default_width = height, width
    size = {"height": height, "width": width, **({"num_frames": frames} if frames else {})}
    image = torch.rand(3, height, width, generator=torch.Generator().manual_seed(1))
    if task == "i2v":
        from torchvision.transforms.functional import to_pil_image

        prompts = [Prompt(p, image) for p in prompts]
    pipe = stock.pipe
    if args.model == "wan22_i2v":  # the same components in diffusers' image-to-video pipeline
        from diffusers import WanImageToVideoPipeline

        pipe = WanImageToVideoPipeline(**pipe.components, expand_timesteps=True)
    if args.model.startswith("hunyuan"):
        pipe.guider = pipe.guider.new(guidance_scale=guidance)
    pipe.set_progress_bar_config(disable=True)
    config = RolloutConfig(num_steps=args.steps, kernel=args.kernel, guidance_scale=guidance,
                           cfg_split=args.cfg_split)
    extra = stock_call_kwargs(args.model, prompts, args.batch, guidance)
    if task == "i2v":
        extra["image"] = to_pil_image(image)

    def ours() -> None:
        with torch.no_grad():
            cond = adapter.encode(prompts, "", guidance)
            result = rollout(adapter, cond, config, group_size=args.batch, generator=torch.Generator().manual_seed(0),
                             **size)
            adapter.decode(result.samples)
        assert len(result.transitions) == (args.steps if args.kernel != "ode" else 0)
        assert result.nfe == args.steps * len(prompts) * args.batch

    def diffusers_call() -> None:
        if task == "i2v":  # the i2v pipelines take one image: one call per prompt
            # (HunyuanVideo 1.5's takes its size from the image)
            sized = {"num_frames": frames} if args.model.startswith("hunyuan") else size
            for prompt in prompts:
                pipe(prompt=[str(prompt)], num_inference_steps=args.steps, output_type="pt",
                     num_videos_per_prompt=args.batch, generator=torch.Generator().manual_seed(0), **sized,
                     **{**extra, "negative_prompt": [""]})
            return
        count = {"num_videos_per_prompt" if frames else "num_images_per_prompt": args.batch}
        pipe(prompt=list(prompts), num_inference_steps=args.steps, output_type="pt",
             generator=torch.Generator().manual_seed(0), **size, **count, **extra)

    medians = median_times(ours, diffusers_call, args.repeats)
    print(f"model: {args.model} tiny stand-in ({type(pipe).__name__}), {width}x{height}"
          f"{f' x {frames} frames' if frames else ''}, {len(prompts)} prompts x {args.batch}, {args.steps} steps, "
          f"guidance {guidance} ({adapter.guidance_kind})")
    print(f"diffusers {type(pipe).__name__}.__call__: median {medians['diffusers'] * 1000:.1f} ms")
    print(f"align rollout ({args.kernel}{', cfg_split' if args.cfg_split else ''}): "
          f"median {medians['ours'] * 1000:.1f} ms")
    print(f"rollout_vs_diffusers_{args.model}={medians['ours'] / medians['diffusers']:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=4, help="images per prompt")
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--compile", action="store_true", help="ours compiled (run.compile's regional compile)")
    parser.add_argument("--cfg-split", action="store_true",
                        help="ours with rollout.cfg_split (Flow-GRPO's default: the CFG branches as two calls)")
    parser.add_argument("--model", help="a model family's tiny stand-in against its own pipeline (see above)")
    parser.add_argument("--transformer-config", help="build the SD3 transformer from this JSON config (random weights)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--compile-backend", default="inductor", help="with --compile: torch.compile's backend")
    parser.add_argument("--kernel", default="flow_grpo",
                        help="with --model: the rollout's step kernel (ode: the engine without noise and log-probs)")
    args = parser.parse_args()
    args.size_given = any(arg.startswith("--size") for arg in sys.argv[1:])
    if args.device == "cpu":
        torch.set_num_threads(2)
    if args.model:
        return family_main(args)

    from align.sampling.rollout import RolloutConfig, rollout
    from pipelines.sd3 import SD3Adapter

    prompts = ["a photo of a cat", "a red car on a street"]
    dtype, cuda = getattr(torch, args.dtype), args.device.startswith("cuda")
    with tempfile.TemporaryDirectory() as tmp:
        if args.transformer_config:
            path = str(build_sd3_from_config(Path(tmp), args.transformer_config, dtype=dtype, device=args.device))
        else:
            path = str(build_small_sd3(Path(tmp), args.size))
        stock = SD3Adapter.from_pretrained(path, torch_dtype=dtype, device=args.device, max_sequence_length=16)
        adapter = SD3Adapter.from_pretrained(path, torch_dtype=dtype, device=args.device, max_sequence_length=16)
    if args.compile:
        from align.compile import compile_denoiser

        compile_denoiser(adapter, backend=args.compile_backend)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    pipe = stock.pipe
    pipe.set_progress_bar_config(disable=True)
    config = RolloutConfig(num_steps=args.steps, kernel="flow_grpo", guidance_scale=args.guidance,
                           cfg_split=args.cfg_split)

    def ours() -> None:
        with torch.no_grad():
            cond = adapter.encode(prompts, "", args.guidance)
            result = rollout(adapter, cond, config, group_size=args.batch, generator=torch.Generator().manual_seed(0),
                             height=args.size, width=args.size)
            adapter.decode(result.samples)
        if cuda:
            torch.cuda.synchronize()
        assert len(result.transitions) == args.steps and result.nfe == args.steps * len(prompts) * args.batch

    def diffusers_call() -> None:
        pipe(prompt=prompts, num_images_per_prompt=args.batch, num_inference_steps=args.steps,
             guidance_scale=args.guidance, height=args.size, width=args.size, output_type="pt",
             generator=torch.Generator().manual_seed(0), max_sequence_length=16)
        if cuda:
            torch.cuda.synchronize()

    medians = median_times(ours, diffusers_call, args.repeats)
    print(f"model: {describe_transformer(args.transformer_config)}, {args.size}px, {len(prompts)} prompts x "
          f"{args.batch}, {args.steps} steps, CFG {args.guidance} (one batch), {args.device} {args.dtype}")
    print(f"diffusers StableDiffusion3Pipeline.__call__: median {medians['diffusers'] * 1000:.1f} ms")
    print(f"align rollout with log-probs (flow_grpo SDE{f', compiled ({args.compile_backend})' if args.compile else ''}"
          f"{', cfg_split' if args.cfg_split else ''}): "
          f"median {medians['ours'] * 1000:.1f} ms")
    print(f"{peak_memory(args.device)} (over the timed calls, both copies of the model loaded)")
    print(f"rollout_vs_diffusers={medians['ours'] / medians['diffusers']:.3f}")


if __name__ == "__main__":
    main()
