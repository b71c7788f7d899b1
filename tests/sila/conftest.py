"""Fixtures for the SiLA 2 acceptance tests: a real `ppud dev` serving ppu.v1 and SiLA 2 on
free loopback ports, clients of two independent SiLA 2 libraries (`sila2`, `unitelabs-sila`)
and the `ppuctl` binary.

The binaries are `$PPUD_BIN` and `$PPUCTL_BIN`, else `<repo>/target/debug/{ppud,ppuctl}`;
without them the tests error out (they never skip for lack of a daemon). Readiness is what the
daemon prints (`listening on ADDR`) followed by the SiLA port accepting connections and
answering SiLAService, polled with a deadline: no sleeps as synchronisation.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from sila2.client import SilaClient

REPO = Path(__file__).resolve().parents[2]
TIME_SCALE = os.environ.get("PPU_TEST_TIME_SCALE", "2000")
START_TIMEOUT_S = 90.0
TIMEOUT_S = 120.0

# Tokens of the secured daemon (tokens file: SHA-256 entries, as `ppud token` prints them).
PLANNER = "ppu_silaplanner-5e1d9c0b7a6f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d"
VIEWER = "ppu_silaviewer-9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2a1f0e9d8c7b6a5f4e3d2c1b0a9f8e"
PLANNER_PRINCIPAL = "orchestrator-1"
VIEWER_PRINCIPAL = "dashboard"


def binary(env: str, name: str) -> Path:
    path = Path(os.environ.get(env, REPO / "target" / "debug" / name))
    if not path.is_file():
        pytest.fail(
            f"{name} binary not found at {path}: run `cargo build --bin {name}` in {REPO} "
            f"or set {env}",
            pytrace=False,
        )
    return path


def wait_until(what: str, check: Callable[[], Any], timeout: float = TIMEOUT_S) -> Any:
    """Polls `check` (observable state, never a sleep standing in for an event) until it
    returns something truthy, or fails naming `what`."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            got = check()
            if got:
                return got
        except Exception as e:  # noqa: BLE001 (kept for the failure message)
            last = e
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last error: {last!r}")


class Daemon:
    """A `ppud dev` child process with its SiLA 2 endpoint on a free loopback port.

    Both ports are chosen by ppud (port 0) and read back from its start-up lines, on every
    start: a port picked here and handed over would be free only "a moment ago", and ppud dev
    binds several of its own (the simulated lab's) before its SiLA listener."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.base = base
        self.data_dir = base / "data"
        self.log_path = base / "ppud.log"
        self.extra_args = extra_args
        self.addr = "127.0.0.1:0"
        self.sila_port = 0
        self.proc: subprocess.Popen[str] | None = None
        self.stdout_lines: list[str] = []

    @property
    def sila_host(self) -> str:
        return "127.0.0.1"

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(self.log_path, "a")
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "info")
        # A start-up error stays the log's last line: with RUST_BACKTRACE set (CI sets it),
        # anyhow would append a backtrace longer than the tail a failure message shows.
        env["RUST_LIB_BACKTRACE"] = "0"
        # The Python that runs these tests has `sila2`: ppud dev starts its simulated SiLA
        # instrument (shaker-1) with it unless PPU_SILA_PYTHON names another.
        env.setdefault("PPU_SILA_PYTHON", sys.executable)
        self.proc = subprocess.Popen(
            [
                str(binary("PPUD_BIN", "ppud")),
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--sila-listen",
                "127.0.0.1:0",
                "--data-dir",
                str(self.data_dir),
                "--time-scale",
                TIME_SCALE,
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        log.close()
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            # Drains stdout for the daemon's lifetime so it never blocks on a full pipe.
            for line in stdout:
                self.stdout_lines.append(line)
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"ppud did not report its gRPC and SiLA addresses within "
                    f"{START_TIMEOUT_S} s; log:\n"
                    f"{self.log_tail()}"
                ) from None
            if line is None:
                code = self.proc.wait()
                self.proc = None
                raise RuntimeError(
                    f"ppud exited with {code} before listening; log:\n{self.log_tail()}"
                )
            if line.startswith("listening on "):
                self.addr = line.split()[-1]
            elif line.startswith("  sila: "):
                # "  sila: http://127.0.0.1:PORT"
                self.sila_port = int(line.rsplit(":", 1)[1])
                break
        # The SiLA listener comes up with the daemon; wait until SiLAService answers.
        channel = grpc.insecure_channel(f"{self.sila_host}:{self.sila_port}")
        try:
            grpc.channel_ready_future(channel).result(
                timeout=max(1.0, deadline - time.monotonic())
            )
        except grpc.FutureTimeoutError:
            raise RuntimeError(
                f"ppud's SiLA port {self.sila_port} did not accept connections; log:\n"
                f"{self.log_tail()}"
            ) from None
        finally:
            channel.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stops the daemon and starts it again on the same data dir (new ports)."""
        self.stop(sig)
        self.start()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(True)[-lines:])
        except OSError:
            return ""

    # --- ppuctl -----------------------------------------------------------------------------

    def ppuctl(self, *args: str, token: str | None = None, check: bool = True) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPU_TOKEN")}
        if token is not None:
            env["PPU_TOKEN"] = token
        done = subprocess.run(
            [str(binary("PPUCTL_BIN", "ppuctl")), "--addr", f"http://{self.addr}", *args],
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"ppuctl {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
            )
        return done.stdout

    def ppuctl_json(self, *args: str, token: str | None = None) -> Any:
        return json.loads(self.ppuctl("--json", *args, token=token))

    def watch_text_until(
        self, match: Callable[[str], bool], *args: str, timeout: float = TIMEOUT_S
    ) -> list[str]:
        """Runs `ppuctl watch --from-start ARGS` (the human view, the durable event log from its
        start, then live) until a line matches; returns the lines up to and including it."""
        proc = subprocess.Popen(
            [str(binary("PPUCTL_BIN", "ppuctl")), "--addr", f"http://{self.addr}", "watch",
             "--from-start", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env={k: v for k, v in os.environ.items() if not k.startswith("PPU_TOKEN")},
        )
        lines: list[str] = []
        found: list[bool] = []
        stdout = proc.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                lines.append(line.rstrip("\n"))
                if match(line):
                    found.append(True)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        proc.kill()
        proc.wait()
        if not found:
            raise AssertionError(
                f"no matching line in `ppuctl watch {' '.join(args)}` within {timeout} s:\n"
                + "\n".join(lines[-20:])
            )
        return lines

    def watch_until(
        self,
        match: Callable[[dict[str, Any]], bool],
        *args: str,
        token: str | None = None,
        timeout: float = TIMEOUT_S,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Runs `ppuctl --json watch --from-start ARGS` (the durable event log from its start,
        then live)
        until an event matches; returns it and every event read before it."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPU_TOKEN")}
        if token is not None:
            env["PPU_TOKEN"] = token
        proc = subprocess.Popen(
            [str(binary("PPUCTL_BIN", "ppuctl")), "--addr", f"http://{self.addr}", "--json",
             "watch", "--from-start", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        seen: list[dict[str, Any]] = []
        found: list[dict[str, Any]] = []
        stdout = proc.stdout
        assert stdout is not None

        def read() -> None:
            for line in stdout:
                try:
                    event = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if match(event):
                    found.append(event)
                    return
                seen.append(event)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout)
        proc.kill()
        proc.wait()
        if not found:
            stderr = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(
                f"no matching event in `ppuctl watch {' '.join(args)}` within {timeout} s; "
                f"{len(seen)} events seen, last: {seen[-3:]}; stderr: {stderr}"
            )
        return found[0], seen


def tokens_file(base: Path) -> Path:
    path = base / "tokens.toml"
    path.write_text(
        "".join(
            f'[[token]]\nprincipal = "{p}"\nrole = "{r}"\n'
            f'sha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n\n'
            for p, r, t in [
                (PLANNER_PRINCIPAL, "planner", PLANNER),
                (VIEWER_PRINCIPAL, "viewer", VIEWER),
            ]
        )
    )
    return path


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One open `ppud dev` (no tokens: every caller is admin) shared by the tests that do
    not disturb it."""
    d = Daemon(tmp_path_factory.mktemp("ppud-sila"))
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """`ppud dev --tokens-file`: a planner and a viewer token."""
    base = tmp_path_factory.mktemp("ppud-sila-secured")
    d = Daemon(base, ("--tokens-file", str(tokens_file(base))))
    d.start()
    yield d
    d.stop()


class _Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call on a channel."""

    def __init__(self, token: str) -> None:
        self.header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = list(details.metadata or []) + [self.header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(
            details.method, details.timeout, metadata, details.credentials,
            getattr(details, "wait_for_ready", None), getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # noqa: ANN001
        return continuation(self._details(details), request)


class _Details(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):  # noqa: ANN001
        self.method = method
        self.timeout = timeout
        self.metadata = metadata
        self.credentials = credentials
        self.wait_for_ready = wait_for_ready
        self.compression = compression


def sila_client(d: Daemon, bearer: str | None = None) -> SilaClient:
    """A `sila2` SilaClient on the daemon's SiLA port, plaintext (loopback). With `bearer`,
    every call it makes (also the ExecutionInfo, intermediate and result calls, which
    `sila2` sends without metadata) carries `authorization: Bearer <token>`."""
    if bearer is None:
        return SilaClient(d.sila_host, d.sila_port, insecure=True)
    real = grpc.insecure_channel
    try:
        grpc.insecure_channel = lambda target, *a, **kw: grpc.intercept_channel(  # type: ignore[assignment]
            real(target, *a, **kw), _Bearer(bearer)
        )
        return SilaClient(d.sila_host, d.sila_port, insecure=True)
    finally:
        grpc.insecure_channel = real  # type: ignore[assignment]


@pytest.fixture(scope="session")
def client(daemon: Daemon) -> Iterator[SilaClient]:
    c = sila_client(daemon)
    yield c
    c.close()


@pytest.fixture
def no_client_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turns off the `sila2` client's own constraint checks, so a bad value reaches the
    server and what answers is ppud's check."""
    from sila2.framework.data_types.constrained import Constrained

    monkeypatch.setattr(Constrained, "_Constrained__validate", lambda self, value: None)
