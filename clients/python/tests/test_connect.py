"""Reaching the daemon: the target from ``$PPU_ADDR``, and a wrong or dead address failing fast
with an error that names it, for every kind of call, sync and asyncio. A planner that starts
before the daemon can still wait for it (``connect_timeout=None``)."""

from __future__ import annotations

import asyncio
import select
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from ppu_client import AsyncClient, Client, Experiment, UnavailableError, anneal
from ppu_client._connect import DEFAULT_CONNECT_TIMEOUT_S

#: The issue's promise: a wrong address is reported in under 5 s with the defaults.
FAIL_FAST_S = 5.0


def free_port() -> int:
    """A port nothing listens on (it was free a moment ago)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dead() -> str:
    """An address where the connection is refused."""
    return f"127.0.0.1:{free_port()}"


@pytest.fixture
def silent() -> Iterator[str]:
    """An address that accepts TCP connections and never says a word, as a host behind a
    firewall that swallows the HTTP/2 handshake, or a hung process."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()
    for c in accepted:
        c.close()


@pytest.fixture
def http1() -> Iterator[str]:
    """An address where a plain HTTP/1.1 server answers (like ppud's metrics port)."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.recv(4096)
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


def assert_names(e: UnavailableError, addr: str) -> None:
    msg = str(e)
    assert f"ppud at {addr}" in msg, msg
    assert e.code == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("where", ["dead", "silent", "http1"])
def test_a_wrong_address_fails_fast_naming_it(where: str, request: pytest.FixtureRequest) -> None:
    addr = request.getfixturevalue(where)
    calls = {
        "devices": lambda c: c.devices(),
        "submit_batch": lambda c: c.submit_batch([Experiment("x", [anneal(100.0, 60.0)])]),
    }
    if where == "dead":  # every kind of call, once
        calls |= {
            "get": lambda c: c.get("01J0000000000000000000000"),
            "events": lambda c: next(iter(c.events(0))),
            "results": lambda c: next(iter(c.results("01J0000000000000000000000"))),
        }
    with Client(addr) as c:
        for name, call in calls.items():
            started = time.monotonic()
            with pytest.raises(UnavailableError) as ei:
                call(c)
            took = time.monotonic() - started
            assert took < FAIL_FAST_S, f"{name} on {where} took {took:.1f} s"
            assert_names(ei.value, addr)
            # Why, in gRPC's words when it has them.
            msg = str(ei.value)
            if where == "dead":
                assert "refused" in msg.lower(), msg
            if where == "silent":
                assert "no answer" in msg or "SETTINGS" in msg, msg


def test_async_client_fails_fast_naming_the_address(dead: str, silent: str) -> None:
    async def main() -> None:
        for addr in (dead, silent):
            async with AsyncClient(addr) as c:
                for call in (
                    c.devices,
                    lambda: c.submit_batch([Experiment("x", [anneal(100.0, 60.0)])]),
                    lambda: c.events(0).__anext__(),
                ):
                    started = time.monotonic()
                    with pytest.raises(UnavailableError) as ei:
                        await call()
                    assert time.monotonic() - started < FAIL_FAST_S
                    assert_names(ei.value, addr)

    asyncio.run(main())


def test_connect_timeout_is_configurable(dead: str) -> None:
    with Client(dead, connect_timeout=0.5) as c:
        with pytest.raises(UnavailableError) as ei:
            c.devices()
        assert "within 0.5 s" in str(ei.value)
    with Client(dead) as c:
        assert c.connect_timeout == DEFAULT_CONNECT_TIMEOUT_S < FAIL_FAST_S


def test_ppu_addr_is_the_default_target(
    daemon: Daemon, dead: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PPU_ADDR", f"  http://{daemon.addr}\n")
    with Client() as c:
        assert c.target == f"http://{daemon.addr}"
        assert any(d.id == "furnace-1" for d in c.devices())

    async def main() -> None:
        async with AsyncClient() as c:
            assert any(d.id == "furnace-1" for d in await c.devices())

    asyncio.run(main())
    # An explicit target wins over the environment.
    with Client(dead) as c, pytest.raises(UnavailableError) as ei:
        c.devices()
    assert_names(ei.value, dead)
    # A wrong PPU_ADDR is named in the error, as ppuctl names it.
    monkeypatch.setenv("PPU_ADDR", dead)
    with Client() as c, pytest.raises(UnavailableError) as ei:
        c.devices()
    assert_names(ei.value, dead)
    # Unset or blank: ppud's default address.
    monkeypatch.setenv("PPU_ADDR", " ")
    with Client() as c:
        assert c.target == "127.0.0.1:50051"


def test_connect_timeout_none_waits_for_a_daemon_that_starts_later(tmp_path: Path) -> None:
    """A planner started before the daemon: with connect_timeout=None its first call waits
    (within the call's own timeout) and succeeds once ppud listens."""
    # Hold the port with a listener that never accepts, to see the client knock.
    knock = socket.create_server(("127.0.0.1", 0))
    d = Daemon(tmp_path / "data", tmp_path / "ppud.log")
    d.addr = f"127.0.0.1:{knock.getsockname()[1]}"
    outcome: list[object] = []
    with Client(d.addr, connect_timeout=None, timeout=120.0) as c:

        def call() -> None:
            try:
                outcome.append(c.devices())
            except Exception as e:  # handed to the test thread
                outcome.append(e)

        t = threading.Thread(target=call, daemon=True)
        t.start()
        try:
            knocked, _, _ = select.select([knock], [], [], 30.0)
            assert knocked, "the client never tried to connect"
        finally:
            knock.close()  # the pending connection is reset: the client tries again later
        assert not outcome, outcome  # still waiting, not failed
        d.start()
        try:
            t.join(timeout=120.0)
            assert not t.is_alive(), "the waiting call did not complete"
        finally:
            d.stop()
    assert len(outcome) == 1 and isinstance(outcome[0], tuple), outcome
    assert any(dev.id == "furnace-1" for dev in outcome[0])
