"""An ``asyncio.start_server`` echo server on ``free_port``, driven from plain sync tests.

Each test runs one coroutine with ``asyncio.run``: start the server, talk to it, and close it with
``async with server`` -- no asyncio test plugin needed.
"""

from __future__ import annotations

import asyncio

import pytest

from ._support import HOST, echo_lines, echo_round_trip


async def serve_and_echo(port: int, payloads: list[bytes]) -> list[bytes]:
    """Serve on ``port``, send each payload over its own connection, all at once; return replies."""
    server = await asyncio.start_server(echo_lines, HOST, port)
    async with server:  # closes the server (and its listening socket) on the way out
        return list(await asyncio.gather(*(echo_round_trip(port, p) for p in payloads)))


@pytest.mark.parametrize(
    "payload",
    [b"", b"ping", b"hello, world", "héllo wörld".encode(), b"\t tabs and spaces \t", b"7" * 1000],
    ids=["empty", "ping", "ascii", "utf8", "whitespace", "1kB"],
)
def test_echo_round_trip(free_port: int, payload: bytes) -> None:
    assert asyncio.run(serve_and_echo(free_port, [payload])) == [payload]


@pytest.mark.parametrize("clients", [1, 2, 3, 5, 8, 13, 21, 34])
def test_concurrent_clients(free_port: int, clients: int) -> None:
    payloads = [f"client {n}".encode() for n in range(clients)]
    assert asyncio.run(serve_and_echo(free_port, payloads)) == payloads
