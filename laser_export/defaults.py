"""Defaults and environment settings, defined once and validated up front.

Every ``LASER_EXPORT_*`` number the tool reads is parsed here; a value that is not a finite number
in range is an :class:`EnvironmentSettingError` (exit 2, naming the variable) raised by
:func:`check_environment` before anything loads, never silently replaced by the default.
Imports nothing heavy (the CLI calls it before torch loads).
"""

from __future__ import annotations

import math
import os

from .errors import InputError

#: seconds allowed for each Hub request to connect and for each read (``--hub-timeout``)
HUB_TIMEOUT = 60.0
HUB_TIMEOUT_VAR = "LASER_EXPORT_HUB_TIMEOUT"
#: GB of prefix activations the baseline cache may store per entry (0: never store a prefix)
PREFIX_CACHE_GB = 2.0
PREFIX_CACHE_GB_VAR = "LASER_EXPORT_PREFIX_CACHE_GB"


class EnvironmentSettingError(InputError):
    """A ``LASER_EXPORT_*`` environment variable holds a value the tool cannot use."""


def _number(name: str, default: float, *, positive: bool) -> float:
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return default
    want = "a positive number" if positive else "a number >= 0"
    try:
        value = float(raw)
    except ValueError:
        raise EnvironmentSettingError(f"{name}={raw!r}: expected {want}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise EnvironmentSettingError(f"{name}={raw!r}: expected {want} (finite)")
    return value


def hub_timeout() -> float:
    """``$LASER_EXPORT_HUB_TIMEOUT`` in seconds (default :data:`HUB_TIMEOUT`)."""
    return _number(HUB_TIMEOUT_VAR, HUB_TIMEOUT, positive=True)


def prefix_cache_gb() -> float:
    """``$LASER_EXPORT_PREFIX_CACHE_GB`` (default :data:`PREFIX_CACHE_GB`; 0: never store a prefix)."""
    return _number(PREFIX_CACHE_GB_VAR, PREFIX_CACHE_GB, positive=False)


def check_environment() -> None:
    """Validate every ``LASER_EXPORT_*`` number now (the CLI calls this before any command runs)."""
    hub_timeout()
    prefix_cache_gb()
