"""pytest-ephemeral: every test gets its own network port, however many tests run at once.

Importing this package is cheap: the allocator (and ``filelock``) load on first use, and names
that need pytest load only when asked for.
"""

from __future__ import annotations

from ._errors import ConfigError, EphemeralError, LockDirError, PortsExhausted

TYPE_CHECKING = False  # not typing's: importing typing would be most of this module's cost
if TYPE_CHECKING:
    from typing import Any

    from ._api import lease_block, lease_port
    from .plugin import EphemeralPortWarning, PortFactory

__all__ = [
    "ConfigError",
    "EphemeralError",
    "EphemeralPortWarning",
    "LockDirError",
    "PortFactory",
    "PortsExhausted",
    "lease_block",
    "lease_port",
]

_LAZY = {
    "EphemeralPortWarning": ".plugin",
    "PortFactory": ".plugin",
    "lease_block": "._api",
    "lease_port": "._api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
