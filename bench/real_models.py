"""Expected static memory of the real models on one GPU in bf16, from their released configs.

Each denoiser is built on the meta device from its public config (no weights, no download), so its
parameter count is exact for that config, and its LoRA parameter count is that of the adapter's
default targets at the given rank: sum over the targeted linear layers of rank * (in + out). Text
and image encoders and VAEs are the public figures (their classes are large transformers configs
that add nothing to check here).

Static memory per recipe, in bytes: the bf16 weights on the device (2 per parameter: denoisers,
VAE, and the encoders unless offloaded), plus

- LoRA: 16 per LoRA parameter (fp32 weight, gradient, two Adam moments);
- full: 16 per trained denoiser parameter (fp32 master weight, gradient, two moments) and a bf16
  reference copy (2);
- full + 8-bit Adam: 10 per trained parameter (the moments in 8 bits: 2 bytes) and the copy.

Activations come on top (``bench/memory.py`` measures how much gradient checkpointing removes).
Wan 2.2 A14B holds two 14B experts: both are on the device; LoRA trains both, full fine-tuning the
one expert its reference trains (``model.train_experts``).

    python bench/real_models.py [--rank 32] [--only qwen_image,z_image]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RealModel:
    title: str
    adapter: str
    #: the diffusers class of the denoiser and its released config (differences from the class's defaults)
    denoiser: str
    config: dict = field(default_factory=dict)
    #: copies of the denoiser on the device (two experts) and how many of them full fine-tuning trains
    experts: int = 1
    trained_experts: int = 1
    #: public parameter counts: text / image encoders, VAE
    encoders: float = 0.0
    vae: float = 0.0
    encoder_note: str = ""


#: Qwen-Image, FLUX.2, Z-Image, Wan 2.2, HunyuanVideo 1.5; configs as released (diffusers' config.json of each checkpoint)
MODELS = {
    "qwen_image": RealModel("Qwen-Image", "qwen_image", "QwenImageTransformer2DModel",
                            dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                                 num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
                            encoders=8.29e9, vae=1.27e8, encoder_note="Qwen2.5-VL-7B"),
    "flux2": RealModel("FLUX.2 dev", "flux2", "Flux2Transformer2DModel", {}, encoders=2.4e10, vae=8.4e7,
                       encoder_note="Mistral Small 3.1 24B"),
    "flux2_klein": RealModel("FLUX.2 klein 4B", "flux2_klein", "Flux2Transformer2DModel",
                             dict(num_layers=5, num_single_layers=20, num_attention_heads=24, joint_attention_dim=7680,
                                  guidance_embeds=False),
                             encoders=4.02e9, vae=8.4e7, encoder_note="Qwen3-4B"),
    "z_image": RealModel("Z-Image(-Turbo)", "z_image", "ZImageTransformer2DModel", {}, encoders=4.02e9, vae=8.4e7,
                         encoder_note="Qwen3-4B"),
    "wan22": RealModel("Wan 2.2 T2V A14B", "wan22", "WanTransformer3DModel", {}, experts=2, trained_experts=1,
                       encoders=5.68e9, vae=1.27e8, encoder_note="umT5-XXL"),
    "wan22_ti2v": RealModel("Wan 2.2 TI2V-5B", "wan22", "WanTransformer3DModel",
                            dict(num_attention_heads=24, in_channels=48, out_channels=48, ffn_dim=14336, num_layers=30),
                            encoders=5.68e9, vae=7.0e8, encoder_note="umT5-XXL"),
    "hunyuan_video15": RealModel("HunyuanVideo 1.5 (480p)", "hunyuan_video15", "HunyuanVideo15Transformer3DModel", {},
                                 encoders=8.29e9 + 2.2e8 + 4.3e8, vae=2.5e8,
                                 encoder_note="Qwen2.5-VL-7B + byT5 glyph encoder + SigLIP (i2v)"),
}
RECIPES = ("lora", "lora+offload", "full", "full+offload", "full+adamw8bit", "full+adamw8bit+offload")


def count_denoiser(model: RealModel, rank: int) -> tuple[int, int]:
    """(parameters, LoRA parameters at ``rank`` on the adapter's default targets) of one expert,
    built on the meta device."""
    import torch
    import diffusers

    from pipelines.registry import adapter_class

    with torch.device("meta"):
        network = getattr(diffusers, model.denoiser)(**model.config)
    targets = adapter_class(model.adapter).default_lora_targets
    lora = sum(rank * (m.in_features + m.out_features) for name, m in network.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))
    return sum(p.numel() for p in network.parameters()), lora


def static_gib(model: RealModel, params: int, lora: int, recipe: str) -> float:
    weights = model.experts * params * 2 + model.vae * 2 + (0 if "offload" in recipe else model.encoders * 2)
    if recipe.startswith("full"):
        trained = model.trained_experts * params
        extra = trained * (10 if "adamw8bit" in recipe else 16) + trained * 2
    else:
        extra = model.experts * lora * 16
    return (weights + extra) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank")
    parser.add_argument("--only", default=",".join(MODELS))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    print(f"| model | denoiser params (counted) | LoRA params, rank {args.rank} | text / image encoders | "
          + " | ".join(RECIPES) + " |")
    print("|---|---|---|---|" + "---|" * len(RECIPES))
    totals = {}
    for key in args.only.split(","):
        model = MODELS[key]
        params, lora = count_denoiser(model, args.rank)
        totals[key] = {r: static_gib(model, params, lora, r) for r in RECIPES}
        experts = f"{model.experts} x " if model.experts > 1 else ""
        print(f"| {model.title} | {experts}{params / 1e9:.2f}B | {experts}{lora / 1e6:.1f}M | {model.encoder_note} "
              f"{model.encoders / 1e9:.1f}B | " + " | ".join(f"{v:.1f}" for v in totals[key].values()) + " |")
    fits = sum(1 for t in totals.values() for r, v in t.items() if r == "lora+offload" and v < 80)
    print(f"lora_offload_fits_80gib={fits}/{len(totals)}")


if __name__ == "__main__":
    main()
