"""Trackers and the run's logs: metrics.jsonl (always), tensorboard or wandb (``run.log_with``) with
the scalars of every iteration and the evaluation grids as images, and log.txt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRACKERS = ("tensorboard", "wandb", "none")


def init_trackers(run, config: Any) -> None:
    """Start the configured tracker (main process), with the run's settings as flat strings."""
    from align.config import flat_settings, to_dict

    if run.is_main and run.run_config.log_with != "none":
        flat = {k: str(v) for k, v in flat_settings(to_dict(config)).items()}
        run.accelerator.init_trackers("align", config=flat)


def log(run, metrics: dict[str, float], step: int) -> None:
    """One row of metrics.jsonl (with the phase times since the last row, ``time/<phase>``) and the
    same scalars to the tracker."""
    metrics = {k: float(v) for k, v in metrics.items()}
    if any(k.startswith("reward/") for k in metrics):  # an iteration's row (the progress bar shows it)
        run.last_rewards = {k.split("/")[1]: v for k, v in metrics.items()
                            if k.startswith("reward/") and k.endswith("/mean")}
    metrics.update({f"time/{k}": v for k, v in run.phase_seconds.items()})
    run.phase_seconds = {}
    if run.run_config.log_with != "none":
        run.accelerator.log(metrics, step=step)
    if run.is_main:
        with open(run.metrics_path, "a") as f:
            f.write(json.dumps({"iteration": step, **metrics}) + "\n")


def log_text(run, text: str) -> None:
    """A line of the run's log.txt (main process)."""
    if run.is_main:
        with open(run.dir / "log.txt", "a") as f:
            f.write(text + "\n")


def log_grids(run, folder: Path, name: str, step: int) -> None:
    """The sample grid of an evaluation (``folder``'s grid.png, and strip.png of videos: every frame
    of each video in a row) to the tracker as images ``samples/<name>`` and ``samples/<name>/frames``."""
    if run.run_config.log_with == "none" or not run.is_main:
        return
    import numpy as np
    from PIL import Image

    images = {f"samples/{name}": folder / "grid.png", f"samples/{name}/frames": folder / "strip.png"}
    values = {key: np.asarray(Image.open(path).convert("RGB")) for key, path in images.items() if path.is_file()}
    tracker = run.accelerator.get_tracker(run.run_config.log_with)
    if run.run_config.log_with == "tensorboard":
        tracker.log_images(values, step=step, dataformats="HWC")
    else:  # wandb: a list of images per key
        tracker.log_images({key: [value] for key, value in values.items()}, step=step)
