"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON, and a manifest
written last that lists every file with its size, so a missing or truncated file is found before a
resume loads anything (and the newest intact checkpoint is used instead).

A part is a name and a state: nested dicts / lists of tensors, numbers, strings, booleans and None.
Part ``name`` becomes ``name.json`` (the structure, tensors replaced by references) and
``name.safetensors`` (the tensors).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

MANIFEST = "checkpoint.json"
FORMAT = 1


def split_tensors(tree: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """(the tree with every tensor replaced by {"__tensor__": key}, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path):
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous().clone()
            return {"__tensor__": path}
        if isinstance(node, dict):
            return {"__dict__": [[key, walk(value, f"{path}.{i}")] for i, (key, value) in enumerate(node.items())]}
        if isinstance(node, (list, tuple)):
            return [walk(value, f"{path}.{i}") for i, value in enumerate(node)]
        if isinstance(node, float) and not math.isfinite(node):
            return {"__float__": repr(node)}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot checkpoint a {type(node).__name__} at {path or 'the top'}")

    return walk(tree, prefix or "t"), tensors


def join_tensors(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`split_tensors`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__float__" in tree:
            return float(tree["__float__"])
        return {key: join_tensors(value, tensors) for key, value in tree["__dict__"]}
    if isinstance(tree, list):
        return [join_tensors(value, tensors) for value in tree]
    return tree


def write_checkpoint(folder: Path, parts: dict[str, Any]) -> None:
    """Write every part into ``folder`` (which must exist), then the manifest."""
    from safetensors.torch import save_file

    files = {}
    for name, state in parts.items():
        structure, tensors = split_tensors(state)
        (folder / f"{name}.json").write_text(json.dumps(structure))
        save_file(tensors, str(folder / f"{name}.safetensors"))
        files.update({f"{name}.json": None, f"{name}.safetensors": None})
    sizes = {f: (folder / f).stat().st_size for f in files}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "parts": sorted(parts), "files": sizes}, indent=1))


def checkpoint_problem(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed (one line), or None when it is intact: the manifest is
    missing or unreadable, a listed file is missing or has another size, a tensor file is unreadable."""
    from safetensors import safe_open

    manifest = folder / MANIFEST
    try:
        info = json.loads(manifest.read_text())
        files = dict(info["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{manifest.name} is missing or unreadable"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is truncated ({path.stat().st_size} of {size} bytes)"
        if name.endswith(".safetensors"):
            try:
                with safe_open(str(path), framework="pt") as f:
                    f.keys()
            except Exception as err:  # noqa: BLE001 - any failure to parse means unusable
                return f"{name} is unreadable ({str(err).splitlines()[0]})"
    return None


def read_part(folder: Path, name: str) -> Any:
    """One part of an intact checkpoint."""
    from safetensors.torch import load_file

    structure = json.loads((folder / f"{name}.json").read_text())
    return join_tensors(structure, load_file(str(folder / f"{name}.safetensors")))


def has_part(folder: Path, name: str) -> bool:
    return (folder / f"{name}.json").is_file()
