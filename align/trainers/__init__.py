"""Trainers by name: each module has a config dataclass ``CONFIG`` and ``train(config) -> summary``."""

from __future__ import annotations

import importlib

from align.errors import unknown_name_error

TRAINERS: dict[str, str] = {
    "flow_grpo": "align.trainers.flow_grpo",
    "branch_grpo": "align.trainers.branch_grpo",
    "dense_grpo": "align.trainers.dense_grpo",
    "tempflow_grpo": "align.trainers.tempflow_grpo",
    "diffusion_nft": "align.trainers.diffusion_nft",
    "awm": "align.trainers.awm",
    "dgpo": "align.trainers.dgpo",
    "ddpo": "align.trainers.ddpo",
    "reward_backprop": "align.trainers.reward_backprop",
    "dpo": "align.trainers.dpo",
    "d3po": "align.trainers.d3po",
    "prdp": "align.trainers.prdp",
    "raft": "align.trainers.raft",
    "b2_diffurl": "align.trainers.b2_diffurl",
}


def trainer_module(name: str):
    if name not in TRAINERS:
        raise unknown_name_error("trainer", name, TRAINERS, field="trainer")
    return importlib.import_module(TRAINERS[name])


def resolve_trainer(method: str | None, config_path: str | None, overrides) -> str:
    """The trainer to run: the command's argument, or the ``trainer`` key of the config file (a
    method preset names its trainer); when both are given they must agree."""
    from align.config import read_yaml
    from align.errors import ConfigError

    named = read_yaml(config_path).get("trainer") if config_path is not None else None
    named = next((o.split("=", 1)[1] for o in overrides if o.startswith("trainer=")), named)
    if method and named and method != named:
        raise ConfigError(f"trainer: the command runs {method!r} but the config names {named!r}")
    if not (method or named):
        raise ConfigError("trainer: give a trainer name (align train flow_grpo ...) or a --config that names one")
    return method or named
