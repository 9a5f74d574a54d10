"""The configuration errors of every package (``align``, ``rewards``, ``pipelines``).

One line each, naming the field or file and what was expected; imports nothing, so any module may
use it without creating an import cycle.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class ConfigError(ValueError):
    """A bad config key or value; the message is one line that names it."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return matches[0] if matches else None


def unknown_name_error(what: str, name: str, choices: Iterable[str], *, field: str | None = None) -> ConfigError:
    """``rollout.kernel: unknown step kernel 'flow_grop' (did you mean 'flow_grpo'? valid: ...)``;
    ``field`` is the config key the name was given in."""
    choices = sorted(str(c) for c in choices)
    hint = closest(name, choices)
    did_you_mean = f"did you mean {hint!r}? " if hint else ""
    prefix = f"{field}: " if field else ""
    return ConfigError(f"{prefix}unknown {what} {name!r} ({did_you_mean}valid: {', '.join(choices)})")


def check_choice(field: str, value, choices: Iterable[str], what: str | None = None) -> None:
    """A ConfigError naming ``field`` and the closest valid name unless ``value`` is one of ``choices``."""
    choices = list(choices)
    if value not in choices:
        raise unknown_name_error(what or field.rsplit(".", 1)[-1], value, choices, field=field)
