"""Which folder a run writes to, and whether it may start there: checked before any model loads.

``run.output_dir`` null (the default) gives every run a fresh folder ``runs/<trainer>-<date>-<time>``.
``run.resume`` decides what happens in a folder that already holds a run:

- ``auto`` (default): continue from the folder's newest intact checkpoint, when the run there was
  made with the same settings; a different trainer or a changed setting that shapes the trained
  state is refused (one line naming the setting), and so is a run that already finished.
- ``latest``: as ``auto``; with a null ``run.output_dir`` it continues the newest
  ``runs/<trainer>-*`` folder instead of starting a fresh one.
- a checkpoint folder: continue from it explicitly, with the settings of this config.
- null: start over in the folder (its old checkpoints and metrics are removed when the run starts).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from align.errors import ConfigError

#: where runs without a run.output_dir go
RUNS_ROOT = Path("runs")
#: settings a resumed run may change: how long it runs, where it logs, how it is evaluated and on
#: which hardware; every other setting shapes the trained state, and changing it is refused
RESUMABLE_CHANGES = (
    "iterations", "max_nfe", "heldout_rewards", "eval_prompts", "eval_prompt_file", "eval.", "model.device", "model.dtype",
    "run.resume", "run.output_dir", "run.checkpoint_every", "run.checkpoint_limit", "run.log_with",
    "run.progress", "run.sample_every", "run.eval_every_nfe", "run.mixed_precision", "run.max_unscored_fraction",
    "run.overlap_scoring", "run.compile", "run.compile_options", "rollout.fused_step", "model.attention_backend",
    "model.vae_dtype", "model.offload_text_encoders", "run.rollout_workers", "ray.",
)


def continues_a_run(resume: str | None) -> bool:
    """``run.resume`` values that continue the folder's own checkpoints."""
    return resume in ("auto", "latest")


def resolve_output_dir(config: Any) -> None:
    """Set a null ``run.output_dir``: the newest ``runs/<trainer>-*`` folder for ``run.resume=latest``
    (when there is one), otherwise a fresh timestamped one."""
    if config.run.output_dir:
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each process would pick its own timestamp
        raise ConfigError("run.output_dir: set it for a multi-process run (align launch sets it for you)")
    if config.run.resume == "latest":
        previous = sorted(p for p in RUNS_ROOT.glob(f"{config.trainer}-*") if (p / "run.json").is_file())
        if previous:
            config.run.output_dir = str(previous[-1])
            return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder, n = RUNS_ROOT / f"{config.trainer}-{stamp}", 1
    while folder.exists():  # two runs started in the same second
        n += 1
        folder = RUNS_ROOT / f"{config.trainer}-{stamp}-{n}"
    config.run.output_dir = str(folder)


def changed_setting(saved: dict, current: dict) -> tuple[str, Any, Any] | None:
    """The first setting (dotted key, saved value, current value) that differs between two
    flattened configs and is not one a resume may change; keys only one side has are ignored."""
    for key, value in current.items():
        if key in saved and saved[key] != value and not any(key == p or (p.endswith(".") and key.startswith(p))
                                                            for p in RESUMABLE_CHANGES):
            return key, saved[key], value
    return None


def newest_checkpoint_state(folder: Path) -> tuple[Path, dict] | None:
    """(checkpoint, its run state) of the newest intact checkpoint in a run folder, or None."""
    from align.training.checkpoint_files import checkpoint_problem, read_part

    checkpoints = folder / "checkpoints"
    if not checkpoints.is_dir():
        return None
    for candidate in sorted(checkpoints.glob("iteration-*"), key=lambda p: int(p.name.split("-")[1]), reverse=True):
        if checkpoint_problem(candidate) is None:
            return candidate, read_part(candidate, "state")
    return None


def check_writable_folder(folder: Path, field: str) -> None:
    """``folder`` is a folder (or can be made) and can be written: a one-line ConfigError naming
    ``field`` otherwise, before any work starts."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{field}: {folder} is a file, not a folder")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ConfigError(f"{field}: {existing} is a file, so {folder} cannot be made")
    if existing is not None and not os.access(existing, os.W_OK):
        raise ConfigError(f"{field}: {existing} is not writable")


def check_run_folder(config: Any) -> None:
    """The run folder can be written, and may hold this run: see the module docstring."""
    from align.config import flat_settings, read_yaml, to_dict

    resolve_output_dir(config)
    folder = Path(config.run.output_dir)
    check_writable_folder(folder, "run.output_dir")
    if config.run.resume and not continues_a_run(config.run.resume):
        from align.training.checkpoint_files import checkpoint_problem

        checkpoint = Path(config.run.resume)
        if not checkpoint.is_dir():
            raise ConfigError(f"run.resume: checkpoint folder not found: {checkpoint}")
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            raise ConfigError(f"run.resume: checkpoint {checkpoint} is unusable: {problem}")
    if not continues_a_run(config.run.resume) or not (folder / "run.json").is_file():
        return
    try:
        previous = json.loads((folder / "run.json").read_text()).get("trainer")
    except (OSError, ValueError):
        previous = None
    if previous and previous != config.trainer:
        raise ConfigError(f"run.output_dir: {folder} holds a {previous} run; give another run.output_dir for "
                          f"{config.trainer} (or run.resume=null to start over there)")
    newest = newest_checkpoint_state(folder)
    if newest is None:  # nothing to resume: the run starts over
        return
    checkpoint, state = newest
    if (folder / "config.yaml").is_file():
        from omegaconf import OmegaConf

        saved = flat_settings(OmegaConf.to_container(read_yaml(folder / "config.yaml"), resolve=True))
        change = changed_setting(saved, flat_settings(to_dict(config)))
        if change is not None:
            key, before, now = change
            raise ConfigError(f"run.output_dir: {folder} holds a run with {key}={before!r}, this config has "
                              f"{key}={now!r}: give another run.output_dir, run.resume={checkpoint} to continue "
                              f"it with the new settings, or run.resume=null to start over there")
    iteration, nfe = int(state.get("iteration", 0)), int(state.get("nfe", 0))
    if iteration >= config.iterations or (config.max_nfe is not None and nfe >= config.max_nfe):
        limit = f"iterations={config.iterations}" if iteration >= config.iterations else f"max_nfe={config.max_nfe}"
        raise ConfigError(f"run.output_dir: {folder} already finished ({limit}; its checkpoint is at iteration "
                          f"{iteration}): raise iterations to train on, give another run.output_dir, or "
                          f"run.resume=null to start over there")
