"""The prompts of a run or a sampling command: a prompt file in its two forms (one prompt a line,
or JSONL entries that may name the conditioning image of image-to-video or the source images of an
edit, docs/prompt_files.md),
the check that prompts with images meet a model that takes them, and each training iteration's draw
of prompts and its noise generator."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import torch

from align.errors import ConfigError


def prompt_list(prompts: Sequence[str] | None, prompt_file: str | None, default: Sequence[str]) -> list[str]:
    """The run's prompts: ``prompt_file`` (one prompt a line, or a ``.jsonl`` file of
    ``{"prompt": ..., "image": ...}`` entries, see :func:`read_prompt_jsonl`), else ``prompts``,
    else ``default``."""
    if prompt_file:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt_file not found: {path}")
        if path.suffix == ".jsonl":
            return read_prompt_jsonl(path)
        lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not lines:
            raise ConfigError(f"prompt_file {path} has no prompts")
        return lines
    return list(prompts) if prompts else list(default)


def read_prompt_jsonl(path: Path) -> list[str]:
    """Prompts of a JSONL file, one ``{"prompt": TEXT, "image": PATH}`` object a line. ``image``
    (optional) is the conditioning image of image-to-video or the source of an edit, or a list of
    paths (a multi-image edit); ``mask`` and ``target`` (optional paths) are what edit rewards read:
    the editable region and a reference result. Paths are relative to the file's folder. Entries
    with an image become :class:`pipelines.base.Prompt` strings carrying them. Every problem (bad
    JSON, no prompt, a missing file) is one line naming the file and line."""
    import json

    from pipelines.base import Prompt

    keys = ("prompt", "image", "mask", "target")
    out: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"prompt_file {path} line {number}"
        try:
            entry = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{where}: not JSON ({str(err).splitlines()[0]})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise ConfigError(f"{where}: expected an object with a non-empty \"prompt\" string")
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ConfigError(f"{where}: unknown key {unknown[0]!r} (keys: {', '.join(keys)})")
        if entry.get("image") is None:
            if entry.get("mask") is not None or entry.get("target") is not None:
                raise ConfigError(f"{where}: a mask or target needs the \"image\" it edits")
            out.append(entry["prompt"])
            continue

        def found(key: str, value) -> str:
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{where}: {key} must be a path (a string), got {value!r}")
            file = Path(value) if Path(value).is_absolute() else path.parent / value
            if not file.is_file():
                raise ConfigError(f"{where}: {key} not found: {file}")
            return str(file)

        image = entry["image"]
        if isinstance(image, list):
            if not image:
                raise ConfigError(f"{where}: image is an empty list")
            image = [found("image", item) for item in image]
        else:
            image = found("image", image)
        extras = {key: found(key, entry[key]) for key in ("mask", "target") if entry.get(key) is not None}
        out.append(Prompt(entry["prompt"], image, **extras))
    if not out:
        raise ConfigError(f"prompt_file {path} has no prompts")
    return out


def check_prompt_images(prompts, model: str, tasks: Sequence[str], field: str = "prompt_file") -> None:
    """Prompts with images need a model with an image task (``tasks``: the checkpoint's, e.g.
    ``pipelines.registry.model_tasks``; image-to-video or editing), and a model whose every task
    takes an image (i2v alone, edit alone) needs an image with every prompt: one line each."""
    from pipelines.base import IMAGE_TASKS

    with_image = sum(getattr(p, "image", None) is not None for p in prompts)
    tasks = tuple(tasks)
    if with_image and not set(tasks) & set(IMAGE_TASKS):
        raise ConfigError(f"{field}: {with_image} prompts name an image, but the {model!r} model takes none "
                          f"(tasks: {', '.join(tasks)})")
    if with_image not in (0, len(prompts)):
        raise ConfigError(f"{field}: {len(prompts) - with_image} of {len(prompts)} prompts have no image; give "
                          f"every prompt one (image-to-video, editing) or none")
    if not with_image and needs_images(tasks):
        what = "edits an image" if "edit" in tasks else "animates an image"
        raise ConfigError(f"{field}: the {model!r} model {what}: give a JSONL {field} "
                          f"of {{\"prompt\": ..., \"image\": ...}} entries")


def needs_images(tasks: Sequence[str]) -> bool:
    """True when every task of a model takes an image (an image-to-video-only or editing-only model)."""
    from pipelines.base import IMAGE_TASKS

    return bool(tasks) and set(tasks) <= set(IMAGE_TASKS)


def prompts_for_iteration(prompts: Sequence[str], count: int, seed: int, iteration: int,
                          process_index: int = 0, num_processes: int = 1) -> list[str]:
    """A deterministic draw per (seed, iteration): a resumed run sees the same prompts; each
    process takes its own slice."""
    rng = random.Random(f"{seed}-{iteration}")
    total = count * num_processes
    chosen = rng.sample(list(prompts), total) if total <= len(prompts) else rng.choices(list(prompts), k=total)
    return chosen[process_index * count:(process_index + 1) * count]


def iteration_generator(seed: int, iteration: int, process_index: int = 0, stream: str = "") -> torch.Generator:
    """The generator of one (seed, iteration, process): the rollout's by default; another ``stream``
    (e.g. "train") gives an independent one, so training noise never replays the rollout's."""
    import zlib

    # ints only: hash() of a str changes from process to process (PYTHONHASHSEED)
    key = (seed, iteration, process_index) if not stream else (seed, iteration, process_index,
                                                                zlib.crc32(stream.encode()))
    return torch.Generator().manual_seed(hash(key) % (2**63))
