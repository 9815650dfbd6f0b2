"""The search order alone: seeded random sources, no sockets, no locks."""

from __future__ import annotations

import random
from collections.abc import Callable, Container

import pytest

from pytest_ephemeral._search import JUMP_WITHIN, JUMPS, Walk


class Counting:
    """A seeded random source that counts its draws."""

    def __init__(self, seed: int) -> None:
        self.draws = 0
        self._random = random.Random(seed)

    def randrange(self, stop: int, /) -> int:
        self.draws += 1
        return self._random.randrange(stop)


def walk_over(walk: Walk, outcome: Callable[[int], str | None]) -> tuple[list[int], int | None]:
    """Drive ``walk`` with one-port blocks: ``outcome(index)`` is "bound", "locked" or None
    (leased). The starts tried, and the start leased (None if the pass gave up)."""
    tried = []
    for start in walk:
        tried.append(start)
        met = outcome(start)
        if met is None:
            walk.leased(start)
            return tried, start
        walk.stopped(0, bound=met == "bound")
    return tried, None


def everything(met: str) -> Callable[[int], str]:
    return lambda index: met


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("met", ["locked", "bound"])
def test_a_pass_sees_every_candidate_once_before_giving_up(seed: int, met: str) -> None:
    walk = Walk(50, None, random.Random(seed))
    tried, leased = walk_over(walk, everything(met))
    assert leased is None
    assert sorted(set(tried)) == list(range(50))
    if met == "locked":  # no jumps: each candidate exactly once, in order from the cursor
        assert len(tried) == 50
        assert tried == [(tried[0] + step) % 50 for step in range(50)]


@pytest.mark.parametrize("seed", range(20))
def test_jumps_are_bounded_and_the_last_walk_covers_the_range(seed: int) -> None:
    source = Counting(seed)
    walk = Walk(100, None, source)
    tried, _ = walk_over(walk, everything("bound"))
    assert source.draws == 1 + JUMPS  # the start, then at most JUMPS jumps
    assert len(tried) <= JUMPS * JUMP_WITHIN + 100
    assert tried[-100:] == [(tried[-100] + step) % 100 for step in range(100)]


def test_a_walk_jumps_only_when_it_meets_a_bound_port_early() -> None:
    bound = set(range(10, 20))  # a stretch left in TIME_WAIT
    source = Counting(1)
    walk = Walk(100, 10, source)
    tried, leased = walk_over(walk, lambda index: "bound" if index in bound else None)
    assert source.draws >= 1  # it started again elsewhere instead of walking the stretch
    assert leased is not None
    assert leased not in bound
    assert len([index for index in tried if index in bound]) <= JUMPS * JUMP_WITHIN

    late = Counting(1)  # a bound port met after the first JUMP_WITHIN starts: walk on
    walk = Walk(100, 0, late)
    locked_first: Container[int] = range(JUMP_WITHIN)
    tried, leased = walk_over(
        walk, lambda i: "locked" if i in locked_first else "bound" if i < 8 else None
    )
    assert late.draws == 0
    assert tried == list(range(9))
    assert leased == 8


def test_the_cursor_starts_at_random_then_moves_past_each_lease() -> None:
    seeded = random.Random(7)
    expected_start = random.Random(7).randrange(10)
    walk = Walk(10, None, seeded)
    assert walk.cursor == expected_start
    cursor: int | None = None
    leased_in_turn = []
    for _ in range(10):
        walk = Walk(10, cursor, seeded)
        _, leased = walk_over(walk, lambda index: None)
        assert leased is not None
        leased_in_turn.append(leased)
        cursor = walk.cursor
        assert cursor == (leased + 1) % 10
    # A port just released comes back last: ten leases in a row see all ten ports.
    assert sorted(leased_in_turn) == list(range(10))


def test_a_pass_that_gives_up_keeps_its_cursor() -> None:
    walk = Walk(10, 3, random.Random(0))
    assert walk_over(walk, everything("locked")) == ([*range(3, 10), *range(3)], None)
    assert walk.cursor == 3


def test_giving_up_early_moves_the_cursor_on() -> None:
    walk = Walk(10, 3, random.Random(0))
    for count, _ in enumerate(walk, start=1):
        walk.stopped(0, bound=False)
        if count == 4:
            walk.give_up()
            break
    assert walk.cursor == 7  # the next bounded pass tries other candidates


@pytest.mark.parametrize("cursor", range(7))
def test_blocks_start_only_where_n_candidates_fit(cursor: int) -> None:
    holes = {4}  # the range's port numbers jump after index 3: no block may span 3..4
    n = 3

    def fits(start: int) -> bool:
        return not any(start < hole <= start + n - 1 for hole in holes)

    walk = Walk(8, cursor, random.Random(0), n, fits)
    starts = []
    for start in walk:
        starts.append(start)
        walk.stopped(0, bound=False)
    assert sorted(starts) == [0, 1, 4, 5]


def test_a_block_that_fails_part_way_skips_the_starts_that_would_meet_it_again() -> None:
    walk = Walk(10, 0, random.Random(0), n=3)
    starts = []
    for start in walk:
        starts.append(start)
        if start == 0:
            walk.stopped(2, bound=False)  # 0 and 1 leased, 2 locked: starts 1 and 2 meet 2
        elif start == 3:
            walk.leased(start)
    assert starts == [0, 3]
    assert walk.cursor == 6
