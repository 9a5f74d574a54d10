"""Checkpointing and resume: the run folder's atomic checkpoints (trainable weights, optimizer, run
and trainer state, EMA; align/training/checkpoint_files.py holds the file format), resume from the
newest intact one, metrics truncation on resume, run.json, and the LoRA export."""

from __future__ import annotations

import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from align.config import save_config
from align.errors import ConfigError
from align.training.trackers import log_text


def checkpoints(run) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    folder = run.dir / "checkpoints"
    return sorted(folder.glob("iteration-*"), key=lambda p: int(p.name.split("-")[1])) if folder.is_dir() else []


def trainable_state(run) -> dict[str, Tensor]:
    """The trainable weights only (LoRA: a few MB instead of the whole model), whole tensors
    (sharded: gathered, so every process must call it)."""
    from align.sharding import full_tensors

    model = run.accelerator.unwrap_model(run.adapter.denoiser)
    return {n: full_tensors(p.detach()).cpu().contiguous() for n, p in model.named_parameters()
            if p.requires_grad}


def optimizer_state(run) -> dict:
    """The optimizer's state dict with whole tensors (sharded: gathered on every process)."""
    from align.sharding import full_tensors

    return full_tensors(run.optimizer.state_dict())


def export_lora(run, directory: Path) -> None:
    """The trained LoRA written by the main process (sharded: gathered on every process first)."""
    from align.sharding import full_tensors

    state = full_tensors(run.adapter.lora_state()) if run.sharded else None
    if run.is_main:
        run.adapter.export_lora(directory, state=state)


def save_checkpoint(run) -> Path:
    """Trainable weights, optimizer, run state and EMA as safetensors + JSON (no pickle; see
    align/training/checkpoint_files.py), written to a temporary folder and renamed when complete: a kill
    mid-write leaves the previous checkpoint intact."""
    from align.training.checkpoint_files import write_checkpoint

    folder = run.dir / "checkpoints"
    final = folder / f"iteration-{run.state.iteration:06d}"
    tmp = folder / f".tmp-{final.name}"
    run.accelerator.wait_for_everyone()
    if run.is_main or run.sharded:  # sharded: every process takes part in the gathers
        trainable, optimizer = trainable_state(run), optimizer_state(run)
    if run.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        parts = {"trainable": trainable, "optimizer": optimizer,
                 "state": {**run.state.state_dict(), "accelerator_step": int(run.accelerator.step)}}
        if run.ema is not None:
            parts["ema"] = run.ema.state_dict()
        write_checkpoint(tmp, parts)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in checkpoints(run)[:-max(1, run.run_config.checkpoint_limit)]:
            shutil.rmtree(old)
    run.accelerator.wait_for_everyone()
    return final


def resume(run) -> bool:
    """``run.resume`` (see align/training/run_folder.py): "auto" / "latest" take the newest intact
    checkpoint of the run folder (a newer one with a missing or truncated file is skipped, with
    a one-line warning), a path that checkpoint; null starts over (the folder's old checkpoints
    and metrics go). Whatever is not resumed starts with an empty metrics.jsonl."""
    from align.training.checkpoint_files import checkpoint_problem
    from align.training.run_folder import continues_a_run

    resume = run.run_config.resume
    path = None
    if continues_a_run(resume):
        for candidate in reversed(checkpoints(run)):
            problem = checkpoint_problem(candidate)
            if problem is None:
                path = candidate
                break
            message = f"checkpoint {candidate} is unusable ({problem}): trying the one before"
            warnings.warn(message, stacklevel=2)
            log_text(run, message)
    elif resume:
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"run.resume: checkpoint folder not found: {path}")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ConfigError(f"run.resume: checkpoint {path} is unusable: {problem}")
    if path is None:
        if not resume and run.is_main:
            for old in checkpoints(run):
                shutil.rmtree(old)
        drop_metrics_after(run, -1)
        return False
    load_checkpoint(run, path)
    drop_metrics_after(run, run.state.iteration)
    message = f"resuming {run.dir} at iteration {run.state.iteration} (from {path.name})"
    log_text(run, message)
    if run.is_main and run.run_config.progress:
        print(message, flush=True)
    return True


def describe_run(run) -> None:
    """Write config.yaml and run.json: called once the run has started (resumed or not), so a
    start that fails never overwrites the folder's saved config."""
    if run.is_main:
        save_config(run.config, run.dir / "config.yaml")
        describe_run_folder(run.dir, run.config)


def drop_metrics_after(run, iteration: int) -> None:
    """A resumed run redoes the iterations after its checkpoint: their old metrics rows go, so
    metrics.jsonl never holds an iteration twice."""
    if not run.is_main or not run.metrics_path.is_file():
        return
    kept = [line for line in run.metrics_path.read_text().splitlines()
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    tmp = run.metrics_path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(run.metrics_path)


def load_checkpoint(run, path: Path) -> None:
    from align.training.checkpoint_files import has_part, read_part

    trainable = read_part(path, "trainable")
    expected = trainable_state(run)
    if set(trainable) != set(expected) or any(trainable[k].shape != expected[k].shape for k in expected):
        differ = sorted(set(expected) ^ set(trainable))[:1] or [k for k in expected
                                                                if trainable[k].shape != expected[k].shape][:1]
        raise ConfigError(f"checkpoint {path} does not match the model's trainable weights (first difference: "
                          f"{differ[0]}); was it made with other LoRA settings (lora.rank, lora.target_modules)?")
    from align.sharding import shard_like

    model = run.accelerator.unwrap_model(run.adapter.denoiser)
    if run.sharded:  # each process keeps its shard of the whole tensors
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in trainable:
                    param.copy_(shard_like(trainable[name].to(expected[name].dtype), param))
    else:
        model.load_state_dict({k: v.to(expected[k].dtype) for k, v in trainable.items()}, strict=False)
    optimizer = read_part(path, "optimizer")
    optimizer["state"] = {int(k): v for k, v in optimizer["state"].items()}
    if run.sharded:
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        optimizer["state"] = {i: {k: shard_like(v, params[i]) for k, v in values.items()}
                              for i, values in optimizer["state"].items()}
    run.optimizer.load_state_dict(optimizer)
    state = read_part(path, "state")
    run.accelerator.step = int(state.pop("accelerator_step", 0))
    run.state.load_state_dict(state)
    if run.ema is not None and has_part(path, "ema"):
        run.ema.load_state_dict(read_part(path, "ema"))


def describe_run_folder(directory: Path, config: Any) -> Path:
    """``run.json``: what a run folder holds, so ``align`` commands, the demo and sweeps can read
    any run: the trainer, the package version, the resolved config, metrics, checkpoints, grids
    and the LoRA export (written atomically; the config file is ``config.yaml`` beside it)."""
    from importlib import metadata

    try:
        version = metadata.version("align-diffusion")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        version = "unknown"
    info = {"trainer": getattr(config, "trainer", None), "version": version, "config": "config.yaml",
            "metrics": "metrics.jsonl", "checkpoints": "checkpoints", "samples": "samples", "lora": "lora",
            "log": "log.txt", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path = directory / "run.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2) + "\n")
    tmp.replace(path)
    return path
