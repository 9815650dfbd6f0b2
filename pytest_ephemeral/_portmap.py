"""A map of the port space in text: one line per set of ports, one column per equal slice of ports.

A column shows a mark if any port of its slice is in the line's set, so a single leased port still
shows. Plain ``#`` and ``.`` unless ``colour`` asks for ANSI colours (then block characters).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ._ranges import Spans, intersect

WIDTH = 64
HIGH = 65535
_RESET = "\033[0m"
_DIM = "\033[2m"


class Row(NamedTuple):
    """One line of the map: a label, the ports, what to print after the bar, and its colour."""

    label: str
    spans: Spans
    detail: str
    colour: str = "\033[32m"  # ANSI green


def axis_low(*spans: Spans) -> int:
    """Where the map starts: 49152 (IANA's dynamic range), or lower if a row starts lower."""
    return min([49152, *(low for row in spans for low, _ in row[:1])])


def draw(rows: list[Row], low: int, colour: bool = False) -> list[str]:
    """The map of ``low``-65535, a line per row and the axis on top, and its legend last."""
    step = math.ceil((HIGH - low + 1) / WIDTH)
    columns = [(start, min(start + step - 1, HIGH)) for start in range(low, HIGH + 1, step)]
    label_width = max(len(row.label) for row in rows)
    bar_width = len(columns)
    axis = f"{low}".ljust(bar_width - len(str(HIGH))) + str(HIGH)
    lines = [f"{'':<{label_width}}  {axis}"]
    mark, gap = ("\N{FULL BLOCK}", "\N{MIDDLE DOT}") if colour else ("#", ".")
    for row in rows:
        cells = [mark if intersect(row.spans, (column,)) else gap for column in columns]
        bar = "".join(cells)
        if colour:
            bar = "".join(
                f"{row.colour}{cell}{_RESET}" if cell == mark else f"{_DIM}{cell}{_RESET}"
                for cell in cells
            )
        lines.append(f"{row.label:<{label_width}}  {bar}  {row.detail}")
    lines.append(
        f"{mark}: some ports of the line's set, {gap}: none; one column is {step} ports,"
        f" {low} to {HIGH}"
    )
    return lines
