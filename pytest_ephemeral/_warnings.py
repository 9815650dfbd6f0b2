"""The warnings the plugin emits: one class per thing a test did, so each can be filtered alone."""

from __future__ import annotations

import pytest


class EphemeralPortWarning(pytest.PytestWarning):
    """A leased port was still in use when its lease ended: a server or socket left open."""

    __module__ = "pytest_ephemeral"


class UnleasedPortWarning(pytest.PytestWarning):
    """A test bound a port it holds no lease on (setting ``audit``): a fixed port, which another
    test, worker or run on this machine may bind too."""

    __module__ = "pytest_ephemeral"
