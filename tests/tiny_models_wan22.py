"""Tiny random Wan 2.2 pipelines built in code, for offline CPU tests.

Two layouts of ``WanPipeline``, with the real classes at tiny sizes and the shared UMT5 tokenizer /
encoder of :mod:`tests.tiny_models`:

- A14B (text-to-video, two experts): ``transformer`` (high-noise) and ``transformer_2`` (low-noise)
  ``WanTransformer3DModel`` s with different random weights, the Wan 2.1 VAE layout (8x spatial, 4x
  time, 4 latent channels here) and ``boundary_ratio`` in the pipeline config;
- TI2V-5B (text- and image-to-video, one transformer): ``expand_timesteps=True`` and the Wan 2.2 VAE
  layout (``AutoencoderKLWan`` with 48 latent channels, residual blocks, 2x2 pixel patchify:
  16x spatial, 4x time compression).

Each builder saves with ``save_pretrained`` and returns the directory, so tests load it back through
the adapter's ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path

import torch

try:
    from tests.tiny_models import HIDDEN, _save, t5_text_encoder, t5_tokenizer
except ImportError:  # tests/ on sys.path (pytest's default rootdir-less import mode)
    from tiny_models import HIDDEN, _save, t5_text_encoder, t5_tokenizer

#: the released A14B checkpoints switch experts at sigma 0.875 (T2V) / 0.9 (I2V)
BOUNDARY_RATIO = 0.875
#: latent channels of the Wan 2.2 VAE
Z_DIM_22 = 48


def tiny_wan_transformer(in_channels: int, *, seed: int):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
        out_channels=in_channels, text_dim=HIDDEN, freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ).eval()


def _scheduler(unipc: bool, shift: float):
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if unipc:  # what the released checkpoints ship
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    return FlowMatchEulerDiscreteScheduler(shift=shift)


def build_wan22_a14b(directory, *, seed: int = 0, unipc: bool = False,
                     boundary_ratio: float = BOUNDARY_RATIO) -> Path:
    """``WanPipeline`` in the Wan 2.2 T2V-A14B layout: two experts switched at ``boundary_ratio``.
    With the default Euler scheduler (shift 3) and 4 steps the timesteps are 1000, 857.7, 602.2, 8.9:
    the first on the high-noise expert, the other three on the low-noise one."""
    from diffusers import AutoencoderKLWan, WanPipeline

    tok = t5_tokenizer()
    te = t5_text_encoder(tok, umt5=True, seed=seed + 1)
    z = 4
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=4, z_dim=z, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3], latents_std=[1.5, 0.8, 1.2, 2.0],
    ).eval()
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=_scheduler(unipc, 3.0),
                       transformer=tiny_wan_transformer(z, seed=seed),
                       transformer_2=tiny_wan_transformer(z, seed=seed + 10), boundary_ratio=boundary_ratio)
    return _save(pipe, directory)


def tiny_wan22_vae(seed: int = 0):
    """``AutoencoderKLWan`` in the Wan 2.2 layout (the TI2V-5B VAE's settings at tiny widths): 48
    latent channels, residual down / up blocks, 2x2 patchify of the pixels (12 input channels), so
    16x spatial and 4x temporal compression."""
    from diffusers import AutoencoderKLWan

    gen = torch.Generator().manual_seed(seed + 100)
    mean = (torch.rand(Z_DIM_22, generator=gen) - 0.5).tolist()
    std = (0.5 + torch.rand(Z_DIM_22, generator=gen)).tolist()
    torch.manual_seed(seed)
    return AutoencoderKLWan(
        base_dim=8, decoder_base_dim=8, z_dim=Z_DIM_22, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
        scale_factor_spatial=16, scale_factor_temporal=4, latents_mean=mean, latents_std=std,
    ).eval()


def build_wan22_ti2v(directory, *, seed: int = 0, unipc: bool = False) -> Path:
    """``WanPipeline`` in the Wan 2.2 TI2V-5B layout: one transformer on 48-channel latents of the
    Wan 2.2 VAE, per-token timesteps (``expand_timesteps``). The same folder loads as
    ``WanImageToVideoPipeline`` for image-to-video."""
    from diffusers import WanPipeline

    tok = t5_tokenizer()
    te = t5_text_encoder(tok, umt5=True, seed=seed + 1)
    vae = tiny_wan22_vae(seed + 2)
    pipe = WanPipeline(tokenizer=tok, text_encoder=te, vae=vae, scheduler=_scheduler(unipc, 5.0),
                       transformer=tiny_wan_transformer(Z_DIM_22, seed=seed), expand_timesteps=True)
    return _save(pipe, directory)


BUILDERS = {"wan22_a14b": build_wan22_a14b, "wan22_ti2v": build_wan22_ti2v}
