"""The ordinary denoising / flow-matching loss on given clean latents: ReFL's regulariser, RAFT and
Flow-RWR fine-tuning, and the per-sample errors Diffusion-DPO / Flow-DPO compare.

Training levels come from a fine schedule of the model itself (``schedule_steps`` steps: its
timesteps and noise levels, shift included), so every adapter -- velocity, epsilon or v prediction,
image or video -- is trained at timesteps it knows. Predictions are conditional only (no CFG).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from align.errors import ConfigError
from align.losses import noised_and_target
from align.sampling.kernels import reduce_elements
from align.sampling.rollout import predict_in_chunks
from pipelines.base import Schedule

T_DISTRIBUTIONS = ("uniform", "logit_normal")


@dataclass
class DenoisingConfig:
    #: steps of the model schedule the training levels are drawn from (500: every other of a
    #: DDPM model's 1000 timesteps, whatever its spacing and offset)
    schedule_steps: int = 500
    #: "uniform" over those levels, or "logit_normal": the level nearest sigmoid(N(logit_mean,
    #: logit_std)) (flow models: SD3's training distribution; on DDPM models read as 1 - alpha_bar)
    t_distribution: str = "uniform"
    #: logit_normal: the mean of the normal whose sigmoid is the target noise level (0: centred on 0.5)
    logit_mean: float = 0.0
    #: logit_normal: the std of that normal (1: SD3's logit-normal(0, 1) with logit_mean 0)
    logit_std: float = 1.0

    def validate(self, field: str = "denoising") -> None:
        if self.t_distribution not in T_DISTRIBUTIONS:
            from align.errors import unknown_name_error

            raise unknown_name_error("t distribution", self.t_distribution, T_DISTRIBUTIONS,
                                     field=f"{field}.t_distribution")
        if self.schedule_steps < 1:
            raise ConfigError(f"{field}.schedule_steps must be >= 1, got {self.schedule_steps}")
        if self.logit_std <= 0:
            raise ConfigError(f"{field}.logit_std must be > 0, got {self.logit_std}")


def training_schedule(adapter, config: DenoisingConfig, latent_kwargs: dict) -> Schedule:
    """The adapter's schedule of ``config.schedule_steps`` steps at the run's latent size."""
    return adapter.schedule(config.schedule_steps, latent_shape=adapter.latent_shape(**latent_kwargs))


def draw_levels(schedule: Schedule, count: int, config: DenoisingConfig, generator: torch.Generator) -> Tensor:
    """Indices into the schedule's steps (count,), by ``config.t_distribution``."""
    steps = len(schedule)
    if config.t_distribution == "uniform":
        return torch.randint(steps, (count,), generator=generator)
    noise_level = torch.sigmoid(config.logit_mean + config.logit_std * torch.randn(count, generator=generator))
    levels = schedule.levels[:steps].float().cpu()
    noise_of_level = levels if schedule.kind == "flow" else 1 - levels
    return (noise_of_level[None, :] - noise_level[:, None]).abs().argmin(dim=1)


def denoising_errors(adapter, x0: Tensor, cond, schedule: Schedule, index: Tensor, noise: Tensor,
                     max_batch: int | None = None) -> Tensor:
    """Per-sample mean squared error ||f_theta(x_t, t) - target||^2 / D of the model's prediction
    at step ``index`` (per row) of ``schedule`` with the given ``noise`` (so pairs can share t and
    noise), against the denoising target of its prediction type."""
    levels = schedule.levels[index.cpu()].to(x0.device)
    x_t, target = noised_and_target(x0.float(), noise.float().to(x0.device), levels, schedule.kind,
                                    adapter.prediction_type)
    timesteps = schedule.timesteps[index.cpu()].to(x0.device)
    out = predict_in_chunks(adapter, x_t, timesteps, cond, max_batch)
    return reduce_elements((out.float() - target) ** 2, "mean")


def fit_to_size(image: Tensor, height: int, width: int) -> Tensor:
    """An image (C, H, W) in [0, 1] resized (bilinear, antialiased) to cover height x width and
    centre-cropped to it: data of any size becomes the size the run trains at."""
    import torch.nn.functional as F

    _, h, w = image.shape
    scale = max(height / h, width / w)
    size = (max(height, round(h * scale)), max(width, round(w * scale)))
    if size != (h, w):
        image = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)[0]
    top, left = (image.shape[1] - height) // 2, (image.shape[2] - width) // 2
    return image[:, top:top + height, left:left + width].clamp(0, 1)


def encode_image_files(adapter, paths, latent_kwargs: dict, chunk: int = 8) -> Tensor:
    """Image files as the run's clean latents: each fitted to the run's size (``latent_kwargs``
    height / width, else the adapter's default), encoded by the model's VAE ``chunk`` at a time."""
    from rewards.media import load_sample

    height = latent_kwargs.get("height") or adapter.default_height
    width = latent_kwargs.get("width") or adapter.default_width
    latents = []
    with torch.no_grad():
        for start in range(0, len(paths), chunk):
            images = torch.stack([fit_to_size(load_sample(Path(p)), height, width) for p in paths[start:start + chunk]])
            latents.append(adapter.encode_images(images.to(adapter.device, adapter.dtype)).float())
    return torch.cat(latents)
