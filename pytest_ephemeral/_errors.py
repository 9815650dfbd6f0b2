"""Exceptions of the leasing core (the pytest plugin turns ``ConfigError`` into a usage error)."""

from __future__ import annotations


class EphemeralError(Exception):
    """Base class of every error pytest-ephemeral raises."""


class ConfigError(EphemeralError, ValueError):
    """A setting has a value that cannot be used; the message names the value and its source."""


class PortsExhausted(EphemeralError, RuntimeError):
    """No port of the range could be leased in time; the message says who holds them."""


for _public in (EphemeralError, ConfigError, PortsExhausted):
    _public.__module__ = "pytest_ephemeral"  # tracebacks show where users import them from
