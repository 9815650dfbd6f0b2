"""pytest-ephemeral: every test gets its own network port, however many tests run at once.

Importing this package is cheap: the allocator (and ``filelock``) load on first use, and names
that need pytest load only when asked for.
"""

from __future__ import annotations

from ._errors import (
    ConfigError,
    ConfigTypeError,
    EphemeralError,
    LockDirError,
    PortNotLeased,
    PortsExhausted,
)

TYPE_CHECKING = False  # not typing's: importing typing would be most of this module's cost
if TYPE_CHECKING:
    from ._api import lease_block, lease_port
    from ._factory import PortFactory
    from ._warnings import EphemeralPortWarning, UnleasedPortWarning

    __version__: str

__all__ = [
    "ConfigError",
    "ConfigTypeError",
    "EphemeralError",
    "EphemeralPortWarning",
    "LockDirError",
    "PortFactory",
    "PortNotLeased",
    "PortsExhausted",
    "UnleasedPortWarning",
    "lease_block",
    "lease_port",
]

_LAZY = {
    "EphemeralPortWarning": "._warnings",
    "PortFactory": "._factory",
    "UnleasedPortWarning": "._warnings",
    "lease_block": "._api",
    "lease_port": "._api",
}


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


if not TYPE_CHECKING:  # for type checkers the names above are all there is: a typo is an error

    def __getattr__(name):
        if name == "__version__":  # read from the installed metadata on first use, then kept
            from importlib.metadata import PackageNotFoundError, version

            try:
                globals()["__version__"] = version("pytest-ephemeral")
            except PackageNotFoundError:  # run from a source tree that was never installed
                globals()["__version__"] = "0+unknown"
            return globals()["__version__"]
        if name in _LAZY:
            import importlib

            return getattr(importlib.import_module(_LAZY[name], __name__), name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
