"""Errors a user can act on: each names the field or file, the value and what is allowed."""

from __future__ import annotations

from typing import Any

#: Where a refused command writes its error when set (``rlbench compare`` sets it per cell: a
#: refused start writes nothing into the run directory, yet the report names the cause).
ERROR_FILE_ENV = "RLBENCH_ERROR_FILE"


class RLBenchError(Exception):
    """Base class of errors that the CLI reports as one line with exit status 2."""


class ConfigError(RLBenchError, ValueError):
    """A bad configuration value. ``field`` is a dotted path such as ``algorithm.grpo.eps_low``."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: {allowed}")

    def under(self, section: str) -> ConfigError:
        """The same error with its field path prefixed by ``section``."""
        return ConfigError(f"{section}.{self.field}" if section else self.field, self.value, self.allowed)


def require(condition: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ``ConfigError`` unless ``condition``; used in config ``__post_init__`` checks."""
    if not condition:
        raise ConfigError(field, value, allowed)


class RewardError(RLBenchError):
    """A task's reward function returned something unusable (wrong length, not a number)."""
