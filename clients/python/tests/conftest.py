"""Fixtures: a real `ppud dev` (built by `cargo build --bin ppud`) on a free port with a
temporary data dir, and a TCP proxy whose connections a test can cut to force a disconnect.

The daemon binary is `$PPUD_BIN`, else `<repo>/target/debug/ppud`; without it the tests error
out (they never skip for lack of a daemon).
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from ppu_client import Client

REPO = Path(__file__).resolve().parents[3]
TIME_SCALE = os.environ.get("PPU_TEST_TIME_SCALE", "2000")
START_TIMEOUT_S = 60.0


def ppud_binary() -> Path:
    path = Path(os.environ.get("PPUD_BIN", REPO / "target" / "debug" / "ppud"))
    if not path.is_file():
        pytest.fail(
            f"ppud binary not found at {path}: run `cargo build --bin ppud` in {REPO} "
            "or set PPUD_BIN",
            pytrace=False,
        )
    return path


class Daemon:
    """A `ppud dev` child process. `restart()` brings it back on the same port and data dir."""

    def __init__(self, data_dir: Path, log_path: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.extra_args = extra_args
        self.addr = "127.0.0.1:0"
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    @property
    def port(self) -> int:
        return int(self.addr.rsplit(":", 1)[1])

    def start(self) -> None:
        assert self.proc is None, "already running"
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            [
                str(ppud_binary()),
                "dev",
                "--listen",
                self.addr,
                "--data-dir",
                str(self.data_dir),
                "--time-scale",
                TIME_SCALE,
                # SiLA on a free port: several daemons run side by side here.
                "--sila-listen",
                "127.0.0.1:0",
                *self.extra_args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        log.close()
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            # Keeps draining stdout for the daemon's lifetime so it never blocks on a full pipe.
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=START_TIMEOUT_S)
            except queue.Empty:
                self.stop(signal.SIGKILL)
                raise RuntimeError(
                    f"ppud did not report listening within {START_TIMEOUT_S} s"
                ) from None
            if line is None:
                code = self.proc.wait()
                self.proc = None
                raise RuntimeError(
                    f"ppud exited with {code} before listening; log:\n{self.log_tail()}"
                )
            if line.startswith("listening on "):
                self.addr = line.split()[-1]
                self.starts += 1
                return

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

    def restart(self, sig: int = signal.SIGKILL) -> None:
        """Stops the daemon (killed by default: a crash) and starts it on the same port."""
        self.stop(sig)
        self.start()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "".join(self.log_path.read_text().splitlines(True)[-lines:])
        except OSError:
            return ""


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One `ppud dev` shared by the tests that do not disturb it."""
    base = tmp_path_factory.mktemp("ppud-session")
    d = Daemon(base / "data", base / "ppud.log")
    d.start()
    yield d
    d.stop()


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A `ppud dev` of the test's own, for tests that kill or restart it. Work running at a
    restart is marked INTERRUPTED (not resumed), so a crash shows in the event log."""
    d = Daemon(tmp_path / "data", tmp_path / "ppud.log", ("--on-restart", "interrupt"))
    d.start()
    yield d
    d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[Client]:
    with Client(daemon.addr, timeout=30.0) as c:
        yield c


class TcpProxy:
    """Forwards a local port to the daemon; `cut()` drops every open connection (both ways) as
    a broken link would, and keeps accepting new ones."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.addr = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self.accepted = 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.upstream, timeout=5)
                up.settimeout(None)
            except OSError:
                down.close()
                continue
            with self._lock:
                if self._closed:
                    down.close()
                    up.close()
                    return
                self._conns += [down, up]
                self.accepted += 1
            threading.Thread(target=self._pump, args=(down, up), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def cut(self) -> int:
        """Drops every open connection; returns how many proxied connections were cut."""
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        return len(conns) // 2

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.listener.close()
        self.cut()


@pytest.fixture
def proxy(daemon: Daemon) -> Iterator[TcpProxy]:
    p = TcpProxy(daemon.addr)
    yield p
    p.close()
