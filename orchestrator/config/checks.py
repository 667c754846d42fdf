"""What the config components share to check themselves: str-valued choice enums and the
helpers that raise one ConfigError naming the key, the bad value and what to do instead."""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum
from typing import Any

from orchestrator.errors import ConfigError


class Choice(str, Enum):
    """A closed set of string values for a config field.

    Members are named by their value (OmegaConf parses a YAML string by member name and
    writes members back by name), and behave as that string: `x == "colocated"`, dict
    lookups, f-strings and JSON all see the value.
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


def choice(value: Any, key: str, choices: Iterable[Any]) -> None:
    """`value` must be one of `choices`."""
    choices = [str(c) for c in choices]
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid. Valid values: {', '.join(choices)}")


def positive(value: float, key: str, allow_zero: bool = False) -> None:
    """`value` > 0 (or >= 0 with `allow_zero`)."""
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}={value} must be {'>= 0' if allow_zero else '> 0'}")
