"""``python -m pytest_ephemeral``: the same as the ``pytest-ephemeral`` command."""

from __future__ import annotations

from ._cli import main

raise SystemExit(main())
