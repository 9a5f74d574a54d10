"""Rewards by name: the built-in reward modules (loaded on first use, like the ``align.rewards``
entry points of other packages), ``build_reward`` from a config spec and ``build_rewards`` for a
weighted combination. Reward modules import only :mod:`rewards.base`, so the import graph has no
cycle."""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Sequence

from align.errors import ConfigError, unknown_name_error
from rewards.base import REWARDS, CombinedReward, Reward

ENTRY_POINT_GROUP = "align.rewards"
#: the modules that register the built-in rewards
BUILTIN_REWARD_MODULES = ("aesthetic", "critique", "dense", "dino", "edit", "hpsv3", "image_reward", "jpeg", "ocr",
                          "preference", "remote", "toy", "toy_edit", "toy_video", "video", "video_reward")


def _load_builtins() -> None:
    for name in BUILTIN_REWARD_MODULES:
        importlib.import_module(f"rewards.{name}")


def _load_entry_points() -> None:
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        REWARDS.setdefault(entry.name, entry.value)


def available_rewards() -> list[str]:
    _load_builtins()
    _load_entry_points()
    return sorted(REWARDS)


def reward_class(name: str, field: str | None = None):
    """The reward class registered as ``name`` (``field``: the config key it was given in, for the error)."""
    if name not in available_rewards():
        raise unknown_name_error("reward", name, REWARDS, field=field)
    target = REWARDS[name]
    if isinstance(target, str):  # "module:attr" from an entry point
        module, _, attr = target.partition(":")
        target = getattr(importlib.import_module(module), attr)
        REWARDS[name] = target
    return target


#: option values that look like a local file (a hub name such as "org/model" does not)
LOCAL_PATH_PREFIXES = ("/", "./", "../", "~")


def check_reward_options(name: str, options: dict, field: str | None = None) -> None:
    """A one-line ConfigError for an option the reward ``name`` does not take, or for a ``*_path``
    option that names a local file or folder that does not exist (checked before any model loads)."""
    import inspect
    import os

    params = inspect.signature(reward_class(name, field=field).__init__).parameters
    accepts_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    for key, value in options.items():
        if key not in params and not accepts_any:
            raise unknown_name_error(f"option of reward {name!r}", key, [p for p in params if p != "self"], field=field)
        if (key.endswith("path") and isinstance(value, str) and value.startswith(LOCAL_PATH_PREFIXES)
                and not os.path.exists(os.path.expanduser(value))):
            from rewards.loading import CheckpointError

            raise CheckpointError(f"{field + ': ' if field else ''}{name}.{key}: file not found: {value}")


def check_reward_specs(specs, field: str) -> None:
    """A one-line ConfigError for a reward spec without a name or with an unknown one, an unknown
    option or a missing local file (``field``: the config key of the list, e.g. ``rewards``), checked
    before anything loads."""
    for i, spec in enumerate(specs):
        name = spec if isinstance(spec, str) else dict(spec).get("name")
        if name is None:
            raise ConfigError(f"{field}[{i}]: a reward needs a 'name'")
        options = {} if isinstance(spec, str) else {k: v for k, v in dict(spec).items()
                                                     if k not in ("name", "weight", "normalize", "key")}
        check_reward_options(name, options, field=f"{field}[{i}]")


def build_reward(spec: str | dict) -> Reward:
    """A reward from its name or a config dict ``{name, weight?, normalize?, **options}``; an unknown
    name or option is a one-line ConfigError."""
    if isinstance(spec, str):
        spec = {"name": spec}
    spec = dict(spec)
    if "name" not in spec:
        raise ConfigError(f"reward config {spec} has no 'name'")
    name = spec.pop("name")
    spec.pop("weight", None), spec.pop("normalize", None)
    check_reward_options(name, spec)
    return reward_class(name)(**spec)


def build_rewards(specs: Sequence[str | dict]) -> Reward:
    """One reward for one spec; a :class:`CombinedReward` for several (weights / normalize per spec)."""
    if not specs:
        raise ConfigError("no reward configured: give at least one reward")
    only = {"name": specs[0]} if isinstance(specs[0], str) else dict(specs[0])
    if len(specs) == 1 and float(only.get("weight", 1.0)) == 1.0 and only.get("normalize", "none") == "none":
        return build_reward({k: v for k, v in only.items() if k != "key"})
    rewards, weights, normalize = {}, {}, {}
    for spec in specs:
        spec = {"name": spec} if isinstance(spec, str) else dict(spec)
        key = spec.get("key", spec.get("name"))
        spec.pop("key", None)
        weights[key] = float(spec.get("weight", 1.0))
        normalize[key] = spec.get("normalize", "none")
        rewards[key] = build_reward(spec)
    return CombinedReward(rewards, weights, normalize)
