"""The running pytest session's settings, for ``lease_port()``: one small named handle.

``pytest_configure`` opens it with the session's layers and resolved settings, and
``pytest_unconfigure`` closes it again: pytester runs inner sessions in-process inside an outer
one, and when an inner one ends ``lease_port()`` uses the outer one's settings again, whatever
order the inner ones end in. A plain module global, not a context variable: a thread a test starts
must see the session too.
"""

from __future__ import annotations

from typing import NamedTuple

from ._settings import Layer, Settings


class Session(NamedTuple):
    """What ``lease_port()`` takes from the session: its layers (its keywords go on top of them)
    and what they resolved to."""

    layers: tuple[Layer, ...]
    settings: Settings


class _Handle:
    __slots__ = ("generation", "open", "session")

    def __init__(self) -> None:
        #: The sessions open now, in the order they were opened: the last is the current one.
        self.open: list[Session] = []
        self.session: Session | None = None
        #: Changes whenever ``session`` does, so that caches of what it resolves to can tell.
        self.generation = 0


SESSION = _Handle()


def open_session(session: Session) -> Session:
    """Make ``session`` the current one; ``close_session(session)`` ends that."""
    SESSION.open.append(session)
    SESSION.session = session
    SESSION.generation += 1
    return session


def close_session(session: Session) -> None:
    """End ``session``; the one opened before it (still open) is current again. Sessions may
    end in any order (a pytester config may outlive a session run after it)."""
    SESSION.open = [other for other in SESSION.open if other is not session]
    SESSION.session = SESSION.open[-1] if SESSION.open else None
    SESSION.generation += 1
