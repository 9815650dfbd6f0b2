"""Demo suite for pytest-ephemeral: real servers on leased ports.

Run it from the repository root with ``pytest -n 4 examples``.
"""

from __future__ import annotations
