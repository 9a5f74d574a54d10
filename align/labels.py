"""The labelled preference pairs of a label folder (``align label`` writes it, a person judges it):
the judged pairs and their stored trajectories, as D3PO trains on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from align.errors import ConfigError

PREFERRED = ("a", "b", "tie")


@dataclass
class LabelledPairs:
    """The judged pairs of a label folder, with the stored trajectories."""

    prompts: list[str]  # one per pair, in file order
    winner: torch.Tensor  # row of the preferred trajectory (2p or 2p + 1) of each judged pair
    loser: torch.Tensor
    pair_of: torch.Tensor  # the pair index of each judged pair
    info: dict
    tensors: dict


def read_labels(path: str | Path) -> LabelledPairs:
    """A filled pairs.jsonl and the trajectories beside it; a bad line names the file and line."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"labels: file not found: {path}")
    folder = path.parent
    for name in ("trajectories.json", "trajectories.safetensors"):
        if not (folder / name).is_file():
            raise ConfigError(f"labels: {folder} has no {name} (write the folder with align label)")
    try:
        info = json.loads((folder / "trajectories.json").read_text())
        info["prompts"], info["steps"]  # noqa: B018 - what training reads
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"labels: {folder / 'trajectories.json'} is unreadable ({err}): write the folder again "
                          f"with align label") from None
    winners, losers, pairs = [], [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            p, preferred = int(row["pair"]), row.get("preferred")
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} line {number}: expected {{\"pair\", \"preferred\", ...}} ({err})") from None
        if preferred is not None and preferred not in PREFERRED:
            raise ConfigError(f"{path} line {number}: preferred must be one of a, b, tie or null, got {preferred!r}")
        if not 0 <= p < len(info["prompts"]):
            raise ConfigError(f"{path} line {number}: pair {p} is not in {folder / 'trajectories.json'}")
        if preferred in ("a", "b"):
            a, b = 2 * p, 2 * p + 1
            winners.append(a if preferred == "a" else b)
            losers.append(b if preferred == "a" else a)
            pairs.append(p)
    if not pairs:
        raise ConfigError(f"{path}: no pair is judged yet (set \"preferred\" to \"a\" or \"b\"; see its index.html)")
    from pipelines.base import Prompt

    images = info.get("images") or [None] * len(info["prompts"])
    prompts = [text if image is None else Prompt(text, image) for text, image in zip(info["prompts"], images)]
    return LabelledPairs(prompts, torch.tensor(winners), torch.tensor(losers), torch.tensor(pairs), info,
                         load_file(str(folder / "trajectories.safetensors")))


def labelled_transitions(labels: LabelledPairs, device) -> list:
    """The stored steps as :class:`align.sampling.rollout.Transition` objects (row 2p + k: pair p, side k)."""
    from align.sampling.records import Transition

    out = []
    rows = len(labels.info["prompts"]) * 2
    prompt_index = torch.arange(rows) // 2
    for step in labels.info["steps"]:
        j = step["step"]
        get = lambda name: labels.tensors[f"step{j}.{name}"].to(device)  # noqa: E731
        out.append(Transition(j, get("latents"), get("next_latents"), get("mean"), get("std"), get("log_prob"),
                              prompt_index, torch.arange(rows), torch.arange(rows), kernel=step["kernel"],
                              params=step["params"], expert=step.get("expert")))
    return out
