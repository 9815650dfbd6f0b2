"""Errors that travel: every exception of the package survives ``pickle`` with its message,
advice and attributes, so a worker process's error reaches its parent as it was raised."""

from __future__ import annotations

import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import pytest_ephemeral
from pytest_ephemeral import (
    ConfigError,
    ConfigTypeError,
    EphemeralError,
    LockDirError,
    PortNotLeased,
    PortsExhausted,
    lease_port,
)

from .conftest import MakeRange

HOLDERS: list[dict[str, Any]] = [
    {"port": 61001, "pid": 4242, "host": "ci-7", "nodeid": "t.py::a", "since": 1.5},
    {"port": 61002, "pid": None, "problem": "no holder record"},
]


def exhausted() -> PortsExhausted:
    return PortsExhausted(
        range_text="61000-61003",
        size=4,
        n=2,
        waited=10.0,
        locked=2,
        bound=1,
        forbidden=1,
        forbidden_reason="permission denied by the OS",
        unusable={61003: "a FIFO"},
        held_here=0,
        holders=HOLDERS,
    )


def with_advice(error: EphemeralError) -> EphemeralError:
    error.advice = "Widen the range (port_range=)."
    return error


ERRORS: dict[str, EphemeralError] = {
    "EphemeralError": EphemeralError("out of file descriptors while leasing a port"),
    "ConfigError": ConfigError("bad value 'x' for port_range (argument port_range=)"),
    "ConfigTypeError": ConfigTypeError("the number of ports must be an int, not str"),
    "LockDirError": LockDirError("/tmp/locks", "is a symbolic link"),
    "LockDirError with advice": with_advice(LockDirError("/tmp/locks", "is not a directory")),
    "PortNotLeased": PortNotLeased("port 61000 is not leased in /tmp/locks"),
    "PortsExhausted": exhausted(),
    "PortsExhausted with advice": with_advice(exhausted()),
}


@pytest.mark.parametrize("name", ERRORS)
def test_every_error_pickles_with_its_message_and_attributes(name: str) -> None:
    error = ERRORS[name]
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert copy.args == error.args
    assert vars(copy) == vars(error)
    assert copy.advice == error.advice


def test_the_errors_keep_their_builtin_bases() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(ConfigTypeError, TypeError)
    assert issubclass(LockDirError, OSError)
    assert issubclass(PortsExhausted, RuntimeError)
    assert issubclass(PortNotLeased, ValueError)
    for error in ERRORS.values():
        assert isinstance(error, EphemeralError)
        assert type(error).__module__ == "pytest_ephemeral"
        assert getattr(pytest_ephemeral, type(error).__name__) is type(error)


def test_a_lock_dir_error_says_its_path_and_reason() -> None:
    error = pickle.loads(pickle.dumps(ERRORS["LockDirError with advice"]))
    assert isinstance(error, LockDirError)
    assert (error.path, error.reason) == ("/tmp/locks", "is not a directory")
    assert str(error) == "lock dir '/tmp/locks' is not a directory\nWiden the range (port_range=)."


def lease_the_held_port(port: int, lock_dir: str) -> int:
    """A worker's job: lease ``port``, which the parent holds; raises ``PortsExhausted``."""
    with lease_port(port_range=f"{port}-{port}", lock_dir=lock_dir, timeout=0) as leased:
        return leased


#: Spawn, the start method of Windows and macOS, rather than fork: the test process runs threads
#: (xdist's), so fork warns from Python 3.12 on (an error under -W error), and a forked child would
#: inherit this process's allocator and its lease, and see the port as held by itself rather than
#: locked by another process. A spawned child is a fresh interpreter: a real other process.
SPAWN = multiprocessing.get_context("spawn")


def assert_is_the_exhaustion(error: BaseException, port: int) -> None:
    assert type(error) is PortsExhausted
    assert (error.range_text, error.size, error.n) == (str(port), 1, 1)
    assert (error.locked, error.bound, error.held_here) == (1, 0, 0)
    assert [holder["port"] for holder in error.holders] == [port]
    assert error.holders[0]["pid"] == os.getpid()
    assert "Widen the range (port_range=" in str(error)  # lease_port()'s advice came along


@pytest.fixture
def held(private_range: MakeRange) -> Any:
    """A port this process holds through ``lease_port``, and its lock dir."""
    private = private_range(1)
    with lease_port(port_range=private.spec, lock_dir=private.lock_dir) as port:
        yield port, private.lock_dir


def test_a_pool_worker_that_cannot_lease_returns_the_error(held: tuple[int, Path]) -> None:
    """0.2.0's pool never returned: unpickling the error killed its result thread."""
    port, lock_dir = held
    with SPAWN.Pool(1) as pool:
        result = pool.apply_async(lease_the_held_port, (port, str(lock_dir)))
        with pytest.raises(PortsExhausted) as caught:
            result.get(timeout=60)
        pool.terminate()
    assert_is_the_exhaustion(caught.value, port)


def test_a_process_pool_executor_returns_the_error(held: tuple[int, Path]) -> None:
    """0.2.0's executor said BrokenProcessPool instead."""
    port, lock_dir = held
    with ProcessPoolExecutor(1, mp_context=SPAWN) as executor:
        error = executor.submit(lease_the_held_port, port, str(lock_dir)).exception(timeout=60)
    assert error is not None
    assert_is_the_exhaustion(error, port)


def test_unusable_arguments_are_ephemeral_errors(private_range: MakeRange) -> None:
    private = private_range(1)
    protocol: Any = []  # not even hashable
    bad_protocol = lease_port(protocol=protocol, port_range=private.spec, lock_dir=private.lock_dir)
    with pytest.raises(ConfigError, match=r"protocol must be 'tcp', 'udp' or 'both', not \[\]"):
        bad_protocol.__enter__()
    bad_dir = lease_port(port_range=private.spec, lock_dir=f"{private.lock_dir}/a\0b")
    with pytest.raises(LockDirError, match="holds a NUL character"):
        bad_dir.__enter__()
