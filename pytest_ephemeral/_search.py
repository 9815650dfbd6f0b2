"""The search order: which candidates of a range a lease tries, and in what order. No I/O.

Rule: one pass sees every start of a block before it gives up. A pass begins at the cursor (a
random index on the range's first lease, so concurrent processes rarely try the same candidate)
and walks up the range, wrapping around. After a lease the cursor moves on past it, so a port
just released is the last one this process comes back to (giving its TIME_WAIT time to pass).

An earlier run that leased its way up the range leaves a stretch of ports in TIME_WAIT behind it.
A walk landing in such a stretch would try every port of it in turn, so a walk that meets a bound
port among its first ``JUMP_WITHIN`` starts begins again at a random index, at most ``JUMPS``
times; then it walks on from there over the whole range.

The caller tries the candidates (locks, sockets) and tells the walk what stopped each block. (The
allocator tries the candidate at the cursor of a one-port lease first, before any walk, and
begins the walk after it only when it fails.)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

JUMPS, JUMP_WITHIN = 4, 4


class RandomSource(Protocol):
    """What the walk needs of a random source: ``random.Random(seed)`` or ``SystemRandom()``."""

    def randrange(self, stop: int, /) -> int: ...


class Walk:
    """One pass over the ``size`` candidates of a range for a block of ``n`` consecutive ones.

    Iterating gives block starts (indices); the block is ``start .. start + n - 1``. After each
    start the caller says how it went: ``leased()`` ends the pass, ``stopped(taken, bound)`` says
    the block failed after ``taken`` candidates were leased, at a candidate that was bound (True)
    or locked, held or unusable (False). ``cursor`` is where the next pass over the range begins.
    """

    __slots__ = ("_done", "_fits", "_jumps", "_random", "_skip", "_step", "cursor", "n", "size")

    def __init__(
        self,
        size: int,
        cursor: int | None,
        random: RandomSource,
        n: int = 1,
        fits: Callable[[int], bool] | None = None,
    ) -> None:
        """``fits(start)``: whether ``n`` consecutive ports begin at ``start`` (no hole in the
        range between them); by default every start with ``n`` candidates up to the end."""
        self.size = size
        self.n = n
        self.cursor = random.randrange(size) if cursor is None else cursor
        self._random = random
        self._fits = fits
        self._step = 0  # starts taken from the cursor
        self._jumps = 0
        self._skip = 0  # starts the last failure rules out
        self._done = False

    def __iter__(self) -> Iterator[int]:
        size, n, fits = self.size, self.n, self._fits
        while not self._done:
            self._step += self._skip
            self._skip = 0
            if self._step >= size:
                return
            start = (self.cursor + self._step) % size
            self._step += 1
            if start + n <= size and (fits is None or fits(start)):
                yield start

    def leased(self, start: int) -> None:
        """The block at ``start`` is leased: the pass ends, the next one begins after it."""
        self.cursor = (start + self.n) % self.size
        self._done = True

    def stopped(self, taken: int, bound: bool) -> None:
        """The block failed after ``taken`` of its candidates; ``bound``: at a bound one."""
        if bound and self._step <= JUMP_WITHIN and self._jumps < JUMPS:
            self.cursor, self._step, self._skip = self._random.randrange(self.size), 0, 0
            self._jumps += 1
        else:
            self._skip = taken  # every start up to the failed candidate would meet it again

    def give_up(self) -> None:
        """The caller stops early: the next pass begins where this one stopped."""
        self.cursor = (self.cursor + self._step + self._skip) % self.size
