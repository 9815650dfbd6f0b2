"""The running pytest session's settings, for ``lease_port()``: one small named handle.

``pytest_configure`` opens it with the session's layers and resolved settings, and
``pytest_unconfigure`` closes it again, restoring what was there before: pytester runs inner
sessions in-process inside an outer one, and when an inner one ends ``lease_port()`` uses the
outer one's settings again. A plain module global, not a context variable: a thread a test starts
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
    __slots__ = ("generation", "session")

    def __init__(self) -> None:
        self.session: Session | None = None
        #: Changes whenever ``session`` does, so that caches of what it resolves to can tell.
        self.generation = 0


SESSION = _Handle()


def open_session(session: Session) -> Session | None:
    """Make ``session`` the current one; returns the one to restore with ``close_session``."""
    outer, SESSION.session = SESSION.session, session
    SESSION.generation += 1
    return outer


def close_session(outer: Session | None) -> None:
    SESSION.session = outer
    SESSION.generation += 1
