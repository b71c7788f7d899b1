"""The fleet test's processes: a 3-node nats-server cluster with JetStream on loopback, with the
accounts and per-lab permissions of docs/fleet.md, and `ppud dev --fleet` labs.

Everything waits on an observable condition with a deadline (a port that answers, a line the
daemon prints, JetStream answering an API call), never on a fixed sleep.
"""

from __future__ import annotations

import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def nats_server_binary() -> str | None:
    path = os.environ.get("PPU_NATS_SERVER") or shutil.which("nats-server")
    if not path and os.path.exists("/usr/sbin/nats-server"):
        path = "/usr/sbin/nats-server"
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def wait_until(what: str, cond, deadline_s: float, interval_s: float = 0.05):
    """Polls `cond` (an observable condition) until it returns a true value or the deadline."""
    end = time.monotonic() + deadline_s
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() >= end:
            raise TimeoutError(f"{what}: not within {deadline_s:g} s")
        time.sleep(interval_s)


# -- accounts ---------------------------------------------------------------------------------------


def lab_permissions(lab: str) -> dict:
    """What a lab may publish and subscribe: its own subject prefix, the work queue it pulls
    from, the claims, its own registry key, and the JetStream API calls these need. Nothing
    else: not another lab's subjects, not the work subjects, not stream deletion."""
    api = "$JS.API"
    streams = ("PPU_EVENTS", "PPU_WORK", "KV_PPU_CLAIMS", "KV_PPU_LABS")
    publish = [
        f"ppu.{lab}.>",  # its events and refusals, nothing of another lab
        f"{api}.INFO",
        *(f"{api}.STREAM.INFO.{s}" for s in streams),
        *(f"{api}.STREAM.CREATE.{s}" for s in streams),
        *(f"{api}.STREAM.UPDATE.{s}" for s in streams),
        # the shared work-queue consumers: create/bind, pull, ack/term
        f"{api}.CONSUMER.CREATE.PPU_WORK",
        f"{api}.CONSUMER.CREATE.PPU_WORK.>",
        f"{api}.CONSUMER.DURABLE.CREATE.PPU_WORK.>",
        f"{api}.CONSUMER.INFO.PPU_WORK.>",
        f"{api}.CONSUMER.MSG.NEXT.PPU_WORK.>",
        "$JS.ACK.PPU_WORK.>",
        # claims: create-only puts and reads; the registry: its own key
        "$KV.PPU_CLAIMS.>",
        f"$KV.PPU_LABS.{lab}",
        f"{api}.DIRECT.GET.KV_PPU_CLAIMS.>",
        f"{api}.DIRECT.GET.KV_PPU_CLAIMS",
        f"{api}.STREAM.MSG.GET.KV_PPU_CLAIMS",
        f"{api}.DIRECT.GET.KV_PPU_LABS.>",
        f"{api}.STREAM.MSG.GET.KV_PPU_LABS",
    ]
    # ppu-work.>: the doorbell (a plain subscription rung by each publish of work), so an idle
    # lab takes new work at once rather than at its next poll.
    return {"publish": publish, "subscribe": ["_INBOX.>", "ppu-work.>"]}


def planner_permissions() -> dict:
    """A planner: publishes work, follows PPU_EVENTS with its own consumers, reads the labs."""
    api = "$JS.API"
    publish = [
        "ppu-work.>",
        f"{api}.INFO",
        f"{api}.STREAM.INFO.*",
        f"{api}.STREAM.NAMES",
        f"{api}.CONSUMER.CREATE.PPU_EVENTS",
        f"{api}.CONSUMER.CREATE.PPU_EVENTS.>",
        f"{api}.CONSUMER.DURABLE.CREATE.PPU_EVENTS.>",
        f"{api}.CONSUMER.INFO.PPU_EVENTS.>",
        f"{api}.CONSUMER.DELETE.PPU_EVENTS.>",
        f"{api}.CONSUMER.MSG.NEXT.PPU_EVENTS.>",
        "$JS.ACK.PPU_EVENTS.>",
        # reading the KV buckets (get, and the key listing's ordered consumer)
        f"{api}.DIRECT.GET.KV_PPU_LABS.>",
        f"{api}.DIRECT.GET.KV_PPU_CLAIMS.>",
        f"{api}.STREAM.MSG.GET.KV_PPU_LABS",
        f"{api}.STREAM.MSG.GET.KV_PPU_CLAIMS",
        f"{api}.CONSUMER.CREATE.KV_PPU_LABS",
        f"{api}.CONSUMER.CREATE.KV_PPU_LABS.>",
        f"{api}.CONSUMER.CREATE.KV_PPU_CLAIMS",
        f"{api}.CONSUMER.CREATE.KV_PPU_CLAIMS.>",
        "$JS.FC.>",
    ]
    return {"publish": publish, "subscribe": ["_INBOX.>"]}


def _conf_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def accounts_conf(users: dict[str, str], labs: list[str]) -> str:
    """The `accounts` block: account PPU (JetStream on) with one user per lab and a planner,
    and the system account. `users` maps user name to password."""
    lines = ["accounts {", "  PPU {", "    jetstream: enabled", "    users: ["]
    for name, pw in users.items():
        if name == "sys":
            continue
        perms = lab_permissions(name) if name in labs else planner_permissions()
        lines += [
            f'      {{ user: "{name}", password: "{pw}", permissions: {{',
            f"          publish: {{ allow: {_conf_list(perms['publish'])} }},",
            f"          subscribe: {{ allow: {_conf_list(perms['subscribe'])} }} }} }}",
        ]
    lines += [
        "    ]",
        "  }",
        "  SYS {",
        f'    users: [{{ user: "sys", password: "{users["sys"]}" }}]',
    ]
    lines += ["  }", "}", "system_account: SYS"]
    return "\n".join(lines) + "\n"


# -- the cluster ------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    port: int
    cluster_port: int
    conf: Path
    log: Path
    proc: subprocess.Popen | None = None


@dataclass
class NatsCluster:
    """Three nats-server nodes in one cluster, JetStream on each, on loopback ports."""

    base: Path
    labs: list[str]
    nodes: list[Node] = field(default_factory=list)
    users: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        binary = nats_server_binary()
        if binary is None:
            raise FileNotFoundError(
                "nats-server is not installed (apt-get install nats-server)"
            )
        self.binary = binary
        self.users = {
            name: secrets.token_hex(12) for name in [*self.labs, "planner", "sys"]
        }
        ports = [(free_port(), free_port()) for _ in range(3)]
        accounts = self.base / "accounts.conf"
        accounts.write_text(accounts_conf(self.users, self.labs))
        for i, (port, cport) in enumerate(ports):
            name = f"n{i + 1}"
            routes = ", ".join(
                f'"nats-route://127.0.0.1:{c}"'
                for j, (_, c) in enumerate(ports)
                if j != i
            )
            conf = self.base / f"{name}.conf"
            conf.write_text(
                f"server_name: {name}\n"
                f"listen: 127.0.0.1:{port}\n"
                f'jetstream {{ store_dir: "{self.base / name}", max_memory_store: 64MB, '
                f"max_file_store: 1GB }}\n"
                f"cluster {{ name: ppu-fleet, listen: 127.0.0.1:{cport}, routes: [{routes}] }}\n"
                f"include ./accounts.conf\n"
            )
            self.nodes.append(Node(name, port, cport, conf, self.base / f"{name}.log"))

    def url(self, user: str, node: Node | None = None) -> str:
        """A URL carrying a user's credentials (for the labs' --fleet)."""
        n = node or self.nodes[0]
        return f"nats://{user}:{self.users[user]}@127.0.0.1:{n.port}"

    @property
    def servers(self) -> list[str]:
        return [f"nats://127.0.0.1:{n.port}" for n in self.nodes]

    def start(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            [self.binary, "-c", str(node.conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(node.log, "a"),
            cwd=self.base,
        )
        wait_until(
            f"{node.name} listening",
            lambda: port_open(node.port) or self._died(node),
            20,
        )

    def _died(self, node: Node) -> bool:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"{node.name} exited:\n{node.log.read_text()[-3000:]}")
        return False

    def start_all(self) -> None:
        for n in self.nodes:
            self.start(n)

    def kill(self, node: Node) -> None:
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(timeout=10)
            node.proc = None

    def stop_all(self) -> None:
        for n in self.nodes:
            if n.proc is not None:
                n.proc.send_signal(signal.SIGTERM)
        for n in self.nodes:
            if n.proc is not None:
                try:
                    n.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    n.proc.kill()
                    n.proc.wait()
                n.proc = None

    def permission_violations(self) -> list[str]:
        out = []
        for n in self.nodes:
            try:
                text = n.log.read_text()
            except OSError:
                continue
            out += [ln for ln in text.splitlines() if "Permissions Violation" in ln]
        return out


# -- labs -------------------------------------------------------------------------------------------


@dataclass
class Lab:
    """A `ppud dev --fleet` process with its own data dir; `restart` keeps the data dir."""

    name: str
    base: Path
    args: list[str]
    ppud: str
    proc: subprocess.Popen | None = None
    addr: str = ""
    starts: int = 0

    @property
    def log(self) -> Path:
        return self.base / f"{self.name}.log"

    def start(self, deadline_s: float = 90.0) -> None:
        assert self.proc is None
        log = open(self.log, "a")
        self.proc = subprocess.Popen(
            [
                self.ppud,
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--no-sila",
                "--data-dir",
                str(self.base / f"{self.name}-data"),
                *self.args,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=self.base,
        )
        log.close()
        lines: queue.Queue[str | None] = queue.Queue()
        stdout = self.proc.stdout
        assert stdout is not None

        def pump() -> None:
            for line in stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + deadline_s
        while True:
            try:
                line = lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                self.kill()
                raise TimeoutError(
                    f"{self.name}: ppud did not report listening"
                ) from None
            if line is None:
                code = self.proc.wait()
                self.proc = None
                raise RuntimeError(
                    f"{self.name}: ppud exited with {code}:\n{self.tail()}"
                )
            if line.startswith("listening on "):
                self.addr = line.split()[-1]
                self.starts += 1
                return

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def tail(self, n: int = 40) -> str:
        try:
            return "".join(self.log.read_text().splitlines(True)[-n:])
        except OSError:
            return ""


def redact(text: str, secrets_: list[str]) -> str:
    for s in secrets_:
        text = text.replace(s, "***")
    return re.sub(r"(nats://[^:/@]+:)[^@]+@", r"\1***@", text)
