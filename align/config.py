"""Configs as dataclasses, merged from YAML files and ``key=value`` overrides with OmegaConf.

A typo in a key or a value of the wrong type is a one-line ``ConfigError`` that names it (and the
closest valid key) before any model loads.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.errors import ConfigError, check_choice, closest, unknown_name_error  # noqa: F401 - re-exported for callers

T = TypeVar("T")


def _check_keys(schema_cls, data: dict, prefix: str = "") -> None:
    """Raise a ConfigError for the first key that is not a field of ``schema_cls`` (recursively)."""
    hints = typing.get_type_hints(schema_cls)
    for key, value in data.items():
        if key not in hints:
            raise unknown_name_error("config key", prefix + str(key), [prefix + k for k in hints])
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            _check_keys(hints[key], value, prefix + key + ".")


def load_config(schema_cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = (), base: dict | None = None) -> T:
    """Schema defaults <- ``base`` <- YAML file <- ``key=value`` overrides, validated against the
    dataclass ``schema_cls``; returns an instance of it."""
    layers = []
    if base:
        layers.append(OmegaConf.create(base))
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        layers.append(OmegaConf.load(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers:
        _check_keys(schema_cls, OmegaConf.to_container(layer, resolve=False))
    try:
        # a ??? in a file must be filled by a later layer (merging onto the schema would hide it)
        missing = sorted(OmegaConf.missing_keys(OmegaConf.merge(*layers))) if layers else []
        merged = OmegaConf.merge(OmegaConf.structured(schema_cls), *layers)
        missing += sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"config value {missing[0]!r} must be set (it is ??? in the config)")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # wrong types, missing values
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"bad config value for {key!r}: {first_line}" if key else first_line) from None


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    tmp.replace(path)
