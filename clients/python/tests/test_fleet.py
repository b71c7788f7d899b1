"""The fleet client against a real nats-server (one node, JetStream), with the lab side played
by this test publishing the messages the contract (docs/fleet.md) says a lab publishes: the
client is tested against the contract, not against a mock of ppud.

nats-server is `$PPU_NATS_SERVER`, else `nats-server` on PATH or /usr/sbin/nats-server; without
it these tests skip with a notice (in CI, where .ci/run installs it, they fail instead).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

nats = pytest.importorskip("nats", reason="the fleet client needs nats-py (ppu-client[fleet])")

from nats.js import api as js_api  # noqa: E402

from ppu_client import Degas, Dispense, Experiment, Isotherm, State, anneal, pb  # noqa: E402
from ppu_client.fleet import (  # noqa: E402
    EVENTS_STREAM,
    WORK_STREAM,
    FleetClient,
    FleetError,
    FleetTimeoutError,
    SequenceGapError,
    capabilities_of,
    work_subject,
)

DEADLINE_S = 20.0


def nats_server_binary() -> str:
    path = os.environ.get("PPU_NATS_SERVER") or shutil.which("nats-server")
    if not path and os.path.exists("/usr/sbin/nats-server"):
        path = "/usr/sbin/nats-server"
    if not path:
        if os.environ.get("CI") == "true":
            pytest.fail("nats-server is not installed (.ci/run installs it)", pytrace=False)
        pytest.skip("nats-server not installed (apt-get install nats-server)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, log: Path, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"nats-server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)  # polling an observable condition, with a deadline
    raise RuntimeError(f"nats-server did not listen on {port} within {deadline_s} s")


class NatsServer:
    """One JetStream nats-server on loopback; `restart()` keeps its port and store."""

    def __init__(self, base: Path) -> None:
        self.bin = nats_server_binary()
        self.port = free_port()
        self.store = base / "js"
        self.log = base / "nats.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.bin, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "a"),
        )
        wait_port(self.port, self.proc, self.log)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)
            self.proc = None


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    s = NatsServer(tmp_path)
    s.start()
    yield s
    s.stop(signal.SIGKILL)


class SimLab:
    """The lab side of the contract, by hand: creates the streams and buckets as a lab does at
    start, and publishes events, refusals and registry entries shaped as the contract says."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.nc = self.run(nats.connect(url))
        self.js = self.nc.jetstream()
        self.seq: dict[str, int] = {}

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        if self.loop.is_closed():
            return

        async def finish() -> None:
            await self.nc.close()
            # nats-py leaves its reader and flusher tasks ending: let them end before closing.
            me = asyncio.current_task()
            rest = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.run(finish())
        self.loop.close()

    def create_objects(self) -> None:
        async def go():
            await self.js.add_stream(
                name=EVENTS_STREAM,
                subjects=["ppu.*.events.>", "ppu.*.refused"],
                storage=js_api.StorageType.FILE,
                retention=js_api.RetentionPolicy.LIMITS,
                duplicate_window=120.0,
            )
            await self.js.add_stream(
                name=WORK_STREAM,
                subjects=["ppu-work.>"],
                storage=js_api.StorageType.FILE,
                retention=js_api.RetentionPolicy.WORK_QUEUE,
                duplicate_window=120.0,
            )
            await self.js.create_key_value(bucket="PPU_CLAIMS")
            await self.js.create_key_value(bucket="PPU_LABS", ttl=6.0)

        self.run(go())

    def event(
        self,
        lab: str,
        kind: str,
        experiment_id: str = "",
        msg_id: str = "",
        batch: str = "",
        seq: int | None = None,
        nats_msg_id: str | None = None,
        **fields,
    ) -> int:
        """Publishes one event of `lab` with its next sequence (or `seq`)."""
        if seq is None:
            seq = self.seq.get(lab, 0) + 1
        self.seq[lab] = max(self.seq.get(lab, 0), seq)
        ev = pb.Event(sequence=seq, experiment_id=experiment_id)
        getattr(ev, kind).CopyFrom(fields.pop("message"))
        headers = {
            "Nats-Msg-Id": nats_msg_id or f"{lab}:{seq}",
            "Ppu-Lab": lab,
            "Ppu-Sequence": str(seq),
        }
        if msg_id:
            headers["Ppu-Msg-Id"] = msg_id
        if batch:
            headers["Ppu-Batch"] = batch
        self.run(
            self.js.publish(f"ppu.{lab}.events.{kind}", ev.SerializeToString(), headers=headers)
        )
        return seq

    def state(self, lab: str, eid: str, mid: str, frm: int, to: int, reason: str = "") -> int:
        return self.event(
            lab,
            "experiment_state_changed",
            eid,
            mid,
            message=pb.ExperimentStateChanged(**{"from": frm, "to": to, "reason": reason}),
        )

    def refuse(self, lab: str, mid: str, batch: str, field: str, reason: str) -> None:
        body = {"msg_id": mid, "batch_id": batch, "field": field, "reason": reason}
        self.run(
            self.js.publish(
                f"ppu.{lab}.refused",
                json.dumps(body).encode(),
                headers={"Nats-Msg-Id": f"{lab}:refused:{mid}"},
            )
        )

    def take(self, subject: str, n: int) -> list:
        """Pulls `n` work messages of `subject` as a lab does (shared durable, one at a time)."""

        async def go():
            name = "work_" + subject.removeprefix("ppu-work.").replace("-", "_")
            sub = await self.js.pull_subscribe(subject, durable=name, stream=WORK_STREAM)
            out = []
            end = time.monotonic() + DEADLINE_S
            while len(out) < n and time.monotonic() < end:
                try:
                    msgs = await sub.fetch(1, timeout=1.0)
                except nats.errors.TimeoutError:
                    continue
                for m in msgs:
                    await m.ack_sync()  # as a lab does: the ack is confirmed before it goes on
                    out.append(m)
            return out

        return self.run(go())

    def stream_msgs(self, stream: str) -> int:
        return self.run(self.js.stream_info(stream)).state.messages


@pytest.fixture
def lab(server: NatsServer) -> Iterator[SimLab]:
    s = SimLab(server.url)
    s.create_objects()
    yield s
    s.close()


def candidate(i: int) -> Experiment:
    return Experiment(
        f"c{i}",
        [
            Dispense("A", volume_ml=1.0 + i, rate_ml_per_min=5.0),
            anneal(400.0, hold_s=600.0),
            Degas(200.0, duration_s=600.0),
            Isotherm("CO2", 25.0, pressure_bar=[0.1, 0.5]),
        ],
        sample_id=f"S-{i}",
    )


U, Q, R, S, C = (
    int(s)
    for s in (State.UNSPECIFIED, State.QUEUED, State.RUNNING, State.SUCCEEDED, State.CANCELLED)
)


def test_capabilities_come_from_the_steps_and_name_the_subject() -> None:
    spec = candidate(0).to_proto()
    assert capabilities_of(spec) == ("degas", "dispense", "furnace_program", "isotherm")
    assert work_subject(capabilities_of(spec)) == "ppu-work.degas-dispense-furnace_program-isotherm"
    with pytest.raises(ValueError, match="capabilities: 'Bad-cap'"):
        work_subject(["Bad-cap"])
    empty = pb.ExperimentSpec(name="x", steps=[pb.Step()])
    with pytest.raises(ValueError, match=r"steps\[0\]"):
        capabilities_of(empty)


def test_submit_publishes_one_message_per_experiment_with_its_id(lab: SimLab) -> None:
    with FleetClient(lab.url) as fleet:
        ids = fleet.submit_batch([candidate(i) for i in range(3)], batch_id="camp-1")
        assert ids == ["camp-1.0", "camp-1.1", "camp-1.2"]
        # The same batch again: JetStream keeps one copy of each message id.
        assert fleet.submit_batch([candidate(i) for i in range(3)], batch_id="camp-1") == ids
        assert lab.stream_msgs(WORK_STREAM) == 3
        # The caller may name the capabilities: a lab with only a furnace pulls this one.
        [solo] = fleet.submit_batch(
            [candidate(9)], batch_id="camp-2", capabilities=["furnace_program"]
        )
    taken = lab.take("ppu-work.degas-dispense-furnace_program-isotherm", 3)
    assert [m.headers["Nats-Msg-Id"] for m in taken] == ids
    assert {m.headers["Ppu-Batch"] for m in taken} == {"camp-1"}
    assert [pb.ExperimentSpec.FromString(m.data) for m in taken] == [
        candidate(i).to_proto() for i in range(3)
    ]
    [f] = lab.take("ppu-work.furnace_program", 1)
    assert f.headers["Nats-Msg-Id"] == solo == "camp-2.0"
    assert lab.stream_msgs(WORK_STREAM) == 0  # work queue: acked work is gone


def test_submit_refuses_bad_ids_and_a_fleet_without_streams(server: NatsServer) -> None:
    with FleetClient(server.url) as fleet:
        with pytest.raises(ValueError, match="batch_id"):
            fleet.submit_batch([candidate(0)], batch_id="has.dot")
        with pytest.raises(ValueError, match=r"msg_ids\[0\]"):
            fleet.submit_batch([candidate(0)], msg_ids=["a b"])
        with pytest.raises(FleetError, match="PPU_WORK does not exist"):
            fleet.submit_batch([candidate(0)])


def test_events_resume_on_a_durable_consumer_without_gap_or_duplicate(lab: SimLab) -> None:
    for i in range(12):
        lab.state("a", f"ea{i}", "", U, Q)
        if i % 2 == 0:
            lab.state("b", f"eb{i}", "", U, Q)
    seen: dict[str, int] = {}
    got: list[tuple[str, int]] = []
    with FleetClient(lab.url) as fleet:
        for ev in fleet.events("planner-1", last_sequences=seen, timeout=DEADLINE_S):
            got.append((ev.lab, ev.sequence))
            if len(got) == 7:
                break  # the planner stops (or its link drops) mid-way
    # More events while it is away, and a lab re-sending one it already published: JetStream
    # drops the repeat by its message id.
    lab.state("a", "ea-late", "", U, Q)
    lab.event(
        "a", "experiment_state_changed", "ea0", seq=1, message=pb.ExperimentStateChanged(to=Q)
    )
    with FleetClient(lab.url) as fleet:
        for ev in fleet.events("planner-1", last_sequences=seen, timeout=DEADLINE_S):
            got.append((ev.lab, ev.sequence))
            if len(got) == 13 + 6:
                break
    by_lab: dict[str, list[int]] = {}
    for name, seq in got:
        by_lab.setdefault(name, []).append(seq)
    assert by_lab == {"a": list(range(1, 14)), "b": list(range(1, 7))}
    assert seen == {"a": 13, "b": 6}


def test_a_redelivered_event_is_dropped_and_a_missing_one_raises(lab: SimLab) -> None:
    lab.state("a", "e1", "", U, Q)
    lab.state("a", "e1", "", Q, R)
    # A lab bug: sequence 2 again under another message id, then 4 without 3.
    lab.event(
        "a",
        "experiment_state_changed",
        "e1",
        seq=2,
        nats_msg_id="other",
        message=pb.ExperimentStateChanged(to=R),
    )
    lab.event("a", "experiment_state_changed", "e1", seq=4, message=pb.ExperimentStateChanged(to=S))
    got = []
    with FleetClient(lab.url) as fleet:
        with pytest.raises(SequenceGapError, match="lab a: event sequence 4 follows 2"):
            for ev in fleet.events("p-gap", gap_timeout=0.0, timeout=DEADLINE_S):
                got.append(ev.sequence)
    assert got == [1, 2]


def test_an_early_event_waits_for_the_one_before_it(lab: SimLab) -> None:
    # JetStream redelivers an event lost in flight after its ack wait, behind later ones; the
    # stream itself holds them in order, so here the lab publishes out of order to get that.
    lab.state("a", "e1", "", U, Q)
    lab.event("a", "experiment_state_changed", "e1", seq=3, message=pb.ExperimentStateChanged(to=S))
    lab.event("a", "experiment_state_changed", "e1", seq=2, message=pb.ExperimentStateChanged(to=R))
    lab.state("a", "e2", "", U, Q)
    with FleetClient(lab.url) as fleet:
        got = [ev.sequence for ev in fleet.events("p-early", idle_timeout=2.0)]
    assert got == [1, 2, 3, 4]


def test_results_follow_each_submission_to_its_outcome(lab: SimLab) -> None:
    with FleetClient(lab.url) as fleet:
        ids = fleet.submit_batch([candidate(i) for i in range(3)], batch_id="r1")
        # ids[0]: lab a runs it and measures an isotherm.
        lab.state("a", "A1", ids[0], U, Q)
        lab.state("a", "A1", ids[0], Q, R)
        iso = pb.IsothermResult(points=[pb.IsothermPoint(pressure_bar=0.1, amount_mmol_per_g=1.5)])
        lab.event(
            "a",
            "step_finished",
            "A1",
            ids[0],
            message=pb.StepFinished(result=pb.StepResult(step_index=3, isotherm=iso)),
        )
        # ids[1]: committed by lab a and by lab b after a redelivery; b claimed it first.
        lab.state("a", "A2", ids[1], U, Q)
        lab.state("b", "B1", ids[1], U, Q)
        lab.state("a", "A2", ids[1], Q, C, "taken by lab b")
        lab.state("b", "B1", ids[1], Q, R)
        lab.state("b", "B1", ids[1], R, S)
        lab.state("a", "A1", ids[0], R, S)
        # ids[2]: refused.
        lab.refuse(
            "b",
            ids[2],
            "r1",
            "experiments[0].steps[1].furnace.segments[0].ramp",
            "above the furnace's max_temperature_c",
        )
        results = {r.msg_id: r for r in fleet.results(ids, timeout=DEADLINE_S)}
        assert set(results) == set(ids)
        a = results[ids[0]]
        assert (a.lab, a.experiment_id, a.state.name) == ("a", "A1", "SUCCEEDED")
        assert a.isotherm() is not None and a.isotherm().points[0].amount_mmol_per_g == 1.5
        b = results[ids[1]]
        assert (b.lab, b.experiment_id, b.state.name) == ("b", "B1", "SUCCEEDED")
        c = results[ids[2]]
        assert c.refused and c.lab == "b" and "max_temperature_c" in c.reason
        [ref] = list(fleet.refusals(idle_timeout=1.0))
        assert (ref.msg_id, ref.field) == (
            ids[2],
            "experiments[0].steps[1].furnace.segments[0].ramp",
        )
        with pytest.raises(FleetTimeoutError, match="1 experiment"):
            list(fleet.results(["r1.99"], timeout=1.0))


def test_labs_reads_the_registry(lab: SimLab) -> None:
    entry = {
        "lab": "lab-a",
        "devices": [
            {
                "id": "furnace-1",
                "family": "furnace",
                "capabilities": ["furnace_program"],
                "state": "connected",
            }
        ],
        "capabilities": ["furnace_program"],
        "queue_depth": 2,
        "running": 1,
        "capacity": 3,
        "heartbeat": "2026-12-07T00:00:00Z",
        "last_event_sequence": 40,
        "published_sequence": 39,
    }

    async def put():
        kv = await lab.js.key_value("PPU_LABS")
        await kv.put("lab-a", json.dumps(entry).encode())

    lab.run(put())
    with FleetClient(lab.url) as fleet:
        [info] = fleet.labs()
    assert info.lab == "lab-a" and info.capabilities == ("furnace_program",)
    assert (info.queue_depth, info.running, info.capacity) == (2, 1, 3)
    assert info.heartbeat is not None and info.heartbeat.year == 2026
    assert info.published_sequence == 39 and info.devices[0]["id"] == "furnace-1"


def test_a_follower_rides_out_a_server_restart(server: NatsServer, lab: SimLab) -> None:
    for i in range(5):
        lab.state("a", f"e{i}", "", U, Q)
    lab.close()
    got: list[int] = []
    with FleetClient(server.url) as fleet:
        for ev in fleet.events("p-restart", timeout=60.0):
            got.append(ev.sequence)
            if len(got) == 3:
                # The node dies under the follower and comes back on the same port and store;
                # the lab publishes on.
                server.stop(signal.SIGKILL)
                server.start()
                lab2 = SimLab(server.url)
                try:
                    lab2.seq["a"] = 5
                    for i in range(5, 8):
                        lab2.state("a", f"e{i}", "", U, Q)
                finally:
                    lab2.close()
            if len(got) == 8:
                break
    assert got == list(range(1, 9))
