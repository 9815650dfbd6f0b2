"""Exceptions of the leasing core. They carry data; the caller adds the advice that fits it.

The core says what happened (the range, the counts, the holders, the lock dir and the cause).
Whoever called it knows what the user can change: the plugin names its ``--ephemeral-*`` options,
``lease_port()`` its keyword arguments and environment variables. Either sets ``advice``, which
``str()`` appends.

Every one survives ``pickle`` with its message, advice and attributes, so an error raised in a
``multiprocessing`` or ``concurrent.futures`` worker reaches the parent as it was raised.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing would cost more than this package's import
if TYPE_CHECKING:
    from typing import Any


class EphemeralError(Exception):
    """Base class of every error pytest-ephemeral raises."""

    #: What the user can do about it, in the words of whoever called the core; may be empty.
    advice: str = ""

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n{self.advice}" if self.advice else text

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the message and the attributes as they are, not by calling __init__ again:
        # subclasses take keyword-only arguments, and a message that quotes a holder's age must
        # not change on its way to another process.
        return _restore, (type(self), self.args), self.__dict__


def _restore(kind: type[EphemeralError], args: tuple[Any, ...]) -> EphemeralError:
    """An error of ``kind`` with ``args`` and no ``__init__`` run; pickle then sets its
    attributes (``__setstate__``)."""
    error = kind.__new__(kind, *args)
    error.args = args  # OSError.__new__ leaves args empty for a subclass with its own __init__
    return error


class ConfigError(EphemeralError, ValueError):
    """A setting or argument has a value that cannot be used; the message names it and where it
    came from."""


class ConfigTypeError(EphemeralError, TypeError):
    """An argument of the wrong type (``lease_block("3")``): a mistake in the calling code, so a
    ``TypeError``, not a ``ConfigError``."""


class LockDirError(EphemeralError, OSError):
    """The lock directory cannot be used (unsafe, not writable, full, ...): ``path`` and ``reason``.

    Every lease in that lock dir fails with it until the process is restarted or the problem is
    fixed; a run that leases no port never meets it.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"lock dir {path!r} {reason}")
        self.path = path
        self.reason = reason

    def __str__(self) -> str:  # OSError's own __str__ would show the args tuple
        text = str(self.args[0]) if self.args else ""
        return f"{text}\n{self.advice}" if self.advice else text


class PortsExhausted(EphemeralError, RuntimeError):
    """No port (or block) of the range could be leased in time; the attributes say why.

    ``locked``: ports locked by other processes that follow the lock protocol; ``bound``: ports
    bound by other programs or in TIME_WAIT; ``forbidden``: ports this process may not bind;
    ``unusable``: ports whose lock path holds something other than our own regular file;
    ``held_here``: ports this process holds; ``holders``: records of up to ten holders.
    """

    def __init__(
        self,
        *,
        range_text: str,
        size: int,
        n: int,
        waited: float | None,
        locked: int,
        bound: int,
        forbidden: int,
        unusable: dict[int, str],
        held_here: int,
        holders: list[dict[str, Any]],
        forbidden_reason: str | None = None,
    ) -> None:
        self.range_text = range_text
        self.size = size
        self.n = n
        self.waited = waited
        self.locked = locked
        self.bound = bound
        self.forbidden = forbidden
        self.forbidden_reason = forbidden_reason
        self.unusable = unusable
        self.held_here = held_here
        self.holders = holders
        super().__init__(self._describe())

    def _describe(self) -> str:
        from ._holder import describe

        what = "free port" if self.n == 1 else f"block of {self.n} free consecutive ports"
        when = "now" if self.waited is None else f"within {self.waited:g} s"
        ports = f"{self.size} port{'s' * (self.size != 1)}"
        counts = [
            f"{self.locked} locked by other processes",
            f"{self.bound} bound by other programs or in TIME_WAIT",
            f"{self.held_here} held by this process",
        ]
        if self.forbidden:
            counts.append(f"{self.forbidden} not allowed to this process ({self.forbidden_reason})")
        if self.unusable:
            counts.append(f"{len(self.unusable)} with an unusable lock file")
        lines = [f"no {what} in {self.range_text} ({ports}) {when}: {', '.join(counts)}."]
        if self.holders:
            lines.append("Holders:")
            lines.extend(f"  {describe(record)}" for record in self.holders)
        if self.unusable:
            lines.append("Unusable lock files (remove them):")
            shown = sorted(self.unusable.items())[:10]
            lines.extend(f"  port {port}: {reason}" for port, reason in shown)
        return "\n".join(lines)


class PortNotLeased(EphemeralError, ValueError):
    """A port given back that is not leased here: never leased, or released already."""


class Advice:
    """``with Advice(lock_dir=..., exhausted=...):`` gives the core's errors that need advice
    (a bad lock dir, an exhausted range) the caller's, in the caller's terms."""

    def __init__(self, *, lock_dir: str, exhausted: str) -> None:
        self._lock_dir = lock_dir
        self._exhausted = exhausted

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, error: BaseException | None, traceback: object) -> None:
        self.add_to(error)

    def add_to(self, error: BaseException | None) -> None:
        """Give ``error`` this advice if it is an error that takes advice and has none yet."""
        if isinstance(error, LockDirError):
            error.advice = error.advice or self._lock_dir
        elif isinstance(error, PortsExhausted):
            error.advice = error.advice or self._exhausted


for _public in (
    EphemeralError,
    ConfigError,
    ConfigTypeError,
    LockDirError,
    PortNotLeased,
    PortsExhausted,
):
    _public.__module__ = "pytest_ephemeral"  # tracebacks show where users import them from
