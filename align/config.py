"""Configs as dataclasses, merged from YAML files and ``key=value`` overrides with OmegaConf.

A typo in a key or a value of the wrong type is a one-line ``ConfigError`` that names it (and the
closest valid key) before any model loads.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from align.errors import ConfigError, check_choice, closest, unknown_name_error  # noqa: F401 - re-exported for callers

T = TypeVar("T")


def _check_keys(schema_cls, data: dict, prefix: str = "") -> None:
    """Raise a ConfigError for the first key that is not a field of ``schema_cls`` (recursively), or
    whose value is not a mapping where the field is a config block."""
    hints = typing.get_type_hints(schema_cls)
    for key, value in data.items():
        if isinstance(key, bool) and ("on" if key else "off") in hints:  # YAML reads a bare on / off as a boolean
            raise ConfigError(f"config key {prefix}{key}: YAML reads a bare on / off as true / false; quote the key: "
                              f"\"{'on' if key else 'off'}\": ...")
        if key not in hints:
            nested = {f"{block}.{f.name}": f.name for block, hint in hints.items() if dataclasses.is_dataclass(hint)
                      for f in dataclasses.fields(hint)}
            moved = [dotted for dotted, name in nested.items() if name == key]
            if moved:  # a setting of a block given at the top (e.g. ppo.clip_range as clip_range)
                raise ConfigError(f"config key {prefix}{key}: it belongs to a block; write {prefix}{moved[0]}")
            if closest(str(key), hints) is None:  # a mistyped setting of a block: name it with its block
                near = closest(str(key), set(nested.values()))
                dotted = next((d for d, name in nested.items() if name == near), None)
                if dotted is not None:
                    raise ConfigError(f"unknown config key {prefix}{key!r} (did you mean {prefix + dotted!r}?)")
            raise unknown_name_error("config key", prefix + str(key), [prefix + k for k in hints])
        if dataclasses.is_dataclass(hints[key]):
            if isinstance(value, dict):
                _check_keys(hints[key], value, prefix + key + ".")
            elif value is not None:
                raise ConfigError(f"{prefix}{key}: expected a mapping of {hints[key].__name__} keys, got "
                                  f"{type(value).__name__} {value!r}")


def read_yaml(path: str | Path):
    """A config file as an OmegaConf mapping; a missing file, malformed YAML (with its line) or a
    file that is not a mapping of keys is a one-line ConfigError naming the file."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(layer, DictConfig):
        kind = type(layer).__name__.removesuffix("Config").lower()
        raise ConfigError(f"{path}: expected a mapping of config keys, got a {kind}")
    return layer


def load_config(schema_cls: type[T], path: str | Path | None = None,
                overrides: Sequence[str] = (), base: dict | None = None) -> T:
    """Schema defaults <- ``base`` <- YAML file <- ``key=value`` overrides, validated against the
    dataclass ``schema_cls``; returns an instance of it."""
    layers = []
    if base:
        layers.append(OmegaConf.create(base))
    if path is not None:
        layers.append(read_yaml(path))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    for layer in layers:
        _check_keys(schema_cls, OmegaConf.to_container(layer, resolve=False))
    try:
        # a ??? in a file must be filled by a later layer (merging onto the schema would hide it)
        missing = sorted(OmegaConf.missing_keys(_merge_layers(layers[0], layers[1:]))) if layers else []
        merged = _merge_layers(OmegaConf.structured(schema_cls), layers)
        missing += sorted(OmegaConf.missing_keys(merged))
        if missing:
            raise ConfigError(f"config value {missing[0]!r} must be set (it is ??? in the config)")
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:  # wrong types, missing values
        key = getattr(err, "full_key", None)
        first_line = str(err).splitlines()[0]
        raise ConfigError(f"bad config value for {key!r}: {first_line}" if key else first_line) from None


def _merge_layers(schema, layers):
    """OmegaConf.merge, with a one-line ConfigError for the one merge it cannot do: an entry of a list
    set on its own (``rewards[0].lr=0.1``; a list is replaced whole)."""
    merged = schema
    for layer in layers:
        try:
            merged = OmegaConf.merge(merged, layer)
        except TypeError:
            for key in layer:
                try:
                    OmegaConf.merge(merged, {key: layer[key]})
                except TypeError:
                    raise ConfigError(f"{key}: a list is replaced whole, not entry by entry: give all of it, "
                                      f"e.g. {key}=[...] on the command line or in a config file") from None
            raise
    return merged


#: numeric fields by name that must be > 0 wherever they appear (zero or negative is meaningless)
POSITIVE_FIELDS = frozenset({
    "clip_range", "adv_clip", "lr", "iterations", "prompts_per_iteration", "inner_epochs", "num_steps",
    "per_prompt", "branch_factor", "branches_per_step", "trees_per_prompt", "beta", "calibration_rate",
    "fusion_temperature", "t_per_sample", "train_batch_size", "updates_per_epoch", "edges_per_update",
    "trees_per_update", "max_batch", "steps_per_iteration", "window_slide_every", "window_size", "checkpoint_limit",
    "ema_every", "stats_buffer", "stats_min_count", "gradient_accumulation_steps", "rank", "alpha", "max_nfe",
    "split_noise_scale", "num_per_prompt", "fps", "prune_window_slide_every", "max_sequence_length", "height",
    "width", "num_frames", "eps", "labelled_pairs_per_iteration", "pairs_per_iteration", "t_per_pair", "lv_renoise",
    "truncation_steps", "regularizer_samples", "updates_per_iteration", "keep_per_prompt", "temperature", "cut_std",
    "schedule_steps", "ref_refresh_every", "snapshot_every", "logit_std", "refl_last_fraction", "rollout_chunks",
})
#: numeric fields by name that must be >= 0
NON_NEGATIVE_FIELDS = frozenset({
    "kl_beta", "weight_decay", "checkpoint_every", "sample_every", "eval_every_nfe", "guidance_scale", "policy_ema_warmup",
    "max_grad_norm", "policy_ema_rate", "adv_eps", "t_min", "timestep_fraction", "width_keep_fraction",
    "regularizer_weight", "keep_threshold", "min_reward_gap", "split_end", "cut_step",
})


def check_ranges(config: Any, prefix: str = "") -> None:
    """One pass over a config dataclass (recursively): every field named in POSITIVE_FIELDS must be
    > 0 and every one in NON_NEGATIVE_FIELDS >= 0 where set; a ConfigError names the first that is
    not. Fields with their own rule (a range, a choice) are checked by their config's validation."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = prefix + f.name
        if dataclasses.is_dataclass(value):
            check_ranges(value, key + ".")
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        elif f.name in POSITIVE_FIELDS and not value > 0:
            raise ConfigError(f"{key} must be > 0, got {value}")
        elif f.name in NON_NEGATIVE_FIELDS and not value >= 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")


def flat_settings(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A nested mapping as {"dotted.key": value} (the form of ``key=value`` overrides)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_settings(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_dict(config: Any) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(config), resolve=True)


def save_config(config: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
    tmp.replace(path)
