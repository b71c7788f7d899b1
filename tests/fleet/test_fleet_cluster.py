"""Issue 18's fleet test: three `ppud dev --fleet` labs with different device sets on a 3-node
NATS JetStream cluster (loopback), a planner submitting 300 experiments through the work queue,
`kill -9` of a lab mid-run (then its restart), `kill -9` of a NATS node, and at the end:

- every experiment is accounted for exactly once: run once (in one lab), or refused or
  interrupted with a reason;
- PPU_EVENTS holds every lab's events with consecutive sequences (1..n, no gap, no duplicate);
- a consumer that resumes mid-way (its own durable, dropped and resumed) sees no gap;
- a lab's credentials cannot publish under another lab's prefix, and no log shows a password.

Binaries: `$PPUD_BIN` (else target/debug/ppud) and nats-server (`$PPU_NATS_SERVER`, PATH or
/usr/sbin). Run: `PPUD_BIN=... python -m pytest tests/fleet -rs` in a venv with
`./clients/python[fleet]` and pytest (.ci/run does this). Everything waits on observed state
with deadlines; the labs run on a fast simulated clock so the run takes about two minutes.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest

nats = pytest.importorskip(
    "nats", reason="needs nats-py (pip install './clients/python[fleet]')"
)

from harness import REPO, Lab, NatsCluster, nats_server_binary, wait_until
from ppu_client import (
    Degas,
    Dispense,
    Experiment,
    Hold,
    Isotherm,
    Ramp,
    Refill,
    State,
    StepTo,
    Weigh,
    furnace,
)
from ppu_client.fleet import (
    EVENTS_STREAM,
    TAKEN_BY_PREFIX,
    FleetClient,
    FleetEvent,
    Refusal,
    decode,
)

TIME_SCALE = os.environ.get("PPU_FLEET_TIME_SCALE", "20000")
#: Experiments submitted, and how many of them are refused by design (too hot for any furnace).
TOTAL = 300
REFUSED = 6
#: Whole-run deadline for the 300 to be accounted for (seconds).
RUN_DEADLINE_S = float(os.environ.get("PPU_FLEET_DEADLINE_S", "170"))

LABS = {
    # lab id: its device set (every dev lab also has the dispensing station: two pumps, balance)
    "lab-a": ["--furnaces", "2", "--analysers", "1"],
    "lab-b": ["--furnaces", "1", "--analysers", "1"],
    "lab-c": ["--furnaces", "2", "--analysers", "0"],  # no isotherms here
}


def ppud_binary() -> str:
    path = Path(os.environ.get("PPUD_BIN", REPO / "target" / "debug" / "ppud"))
    if not path.is_file():
        pytest.fail(
            f"ppud not found at {path}: cargo build --bin ppud, or set PPUD_BIN"
        )
    return str(path)


def anneal_only(i: int) -> Experiment:
    return Experiment(
        f"fleet anneal {i}", [furnace(Ramp(120.0, 20.0), Hold(30.0), StepTo(80.0))]
    )


def synthesis(i: int) -> Experiment:
    return Experiment(
        f"fleet synthesis {i}",
        [
            Refill("A"),
            Dispense("A", volume_ml=0.5, rate_ml_per_min=20.0),
            furnace(Ramp(120.0, 20.0), StepTo(80.0)),
        ],
    )


def full(i: int) -> Experiment:
    return Experiment(
        f"fleet sorbent {i}",
        [
            Refill("A"),
            Dispense("A", volume_ml=0.5, rate_ml_per_min=20.0),
            furnace(Ramp(120.0, 20.0), StepTo(80.0)),
            Degas(150.0, duration_s=300.0),
            Isotherm("CO2", 25.0, pressure_bar=[0.15, 1.0]),
        ],
    )


def too_hot(i: int) -> Experiment:
    return Experiment(f"fleet too hot {i}", [furnace(Ramp(5000.0, 10.0), StepTo(80.0))])


def weigh_only(i: int) -> Experiment:
    return Experiment(f"fleet weighing {i}", [Weigh()])


def campaign() -> list[Experiment]:
    """300 experiments: anneals and weighings (any lab), syntheses (dispense + furnace: any
    lab), full sorbent runs (only the labs with an analyser), and a few no furnace accepts."""
    out = []
    for i in range(TOTAL - REFUSED):
        kind = i % 6
        out.append(
            full(i)
            if kind == 0
            else synthesis(i)
            if kind == 3
            else weigh_only(i)
            if kind == 5
            else anneal_only(i)
        )
    out += [too_hot(i) for i in range(REFUSED)]
    return out


class Follower(threading.Thread):
    """The planner's durable follower of PPU_EVENTS: records every event it is given, and can
    be dropped and resumed (a disconnect) on the same durable."""

    def __init__(self, servers: list[str], user: str, password: str) -> None:
        super().__init__(daemon=True)
        self.kw = {"user": user, "password": password}
        self.servers = servers
        self.seen: dict[str, int] = {}
        self.got: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self.stop_flag = threading.Event()
        self.pause = threading.Event()
        self.sessions = 0

    def run(self) -> None:
        try:
            while not self.stop_flag.is_set():
                with FleetClient(self.servers, **self.kw) as fleet:
                    self.sessions += 1
                    while not (self.stop_flag.is_set() or self.pause.is_set()):
                        # Each pass ends after a second; the next binds the same durable.
                        for ev in fleet.events(
                            "ci-follow", last_sequences=self.seen, timeout=1.0
                        ):
                            self.got.append((ev.lab, ev.sequence))
                # Dropped (a disconnect): resume on the same durable once allowed.
                wait_until(
                    "follower resume",
                    lambda: self.stop_flag.is_set() or not self.pause.is_set(),
                    RUN_DEADLINE_S,
                    0.1,
                )
        except BaseException as e:  # reported by the test
            self.error = e


def read_stream(fleet: FleetClient) -> list[FleetEvent | Refusal]:
    """Every message of PPU_EVENTS from the start (an ephemeral consumer)."""

    async def go():
        js = fleet._async._need()
        info = await js.stream_info(EVENTS_STREAM)
        last = info.state.last_seq
        end = time.monotonic() + 60
        while True:
            # Soon after a node's loss the cluster may leave a consumer create unanswered
            # (placed on the lost peer); a reader asks again, as the SDK's client does.
            try:
                sub = await js.pull_subscribe("", stream=EVENTS_STREAM)
                break
            except nats.errors.TimeoutError:
                if time.monotonic() >= end:
                    raise
        out = []
        while time.monotonic() < end:
            try:
                msgs = await sub.fetch(512, timeout=1.0)
            except nats.errors.TimeoutError:
                continue
            for m in msgs:
                await m.ack()
                item = decode(m)
                if item is not None:
                    out.append(item)
                if m.metadata.sequence.stream >= last:
                    await sub.unsubscribe()
                    return out
        raise TimeoutError(f"read {len(out)} of {last} messages of {EVENTS_STREAM}")

    return fleet._run(go())


@pytest.fixture
def fleet_env(tmp_path: Path):
    if nats_server_binary() is None:
        if os.environ.get("CI") == "true":
            pytest.fail(
                "nats-server is not installed (.ci/run installs it)", pytrace=False
            )
        pytest.skip("nats-server not installed (apt-get install nats-server)")
    ppud = ppud_binary()
    cluster = NatsCluster(tmp_path, list(LABS))
    labs: dict[str, Lab] = {}
    try:
        cluster.start_all()
        for i, (name, args) in enumerate(LABS.items()):
            node = cluster.nodes[i % 3]  # each lab homed on its own node
            labs[name] = Lab(
                name,
                tmp_path,
                [
                    *args,
                    "--time-scale",
                    TIME_SCALE,
                    "--on-restart",
                    "interrupt",
                    "--fleet",
                    cluster.url(name, node),
                    "--lab-id",
                    name,
                ],
                ppud,
            )
        yield cluster, labs
    finally:
        for lab in labs.values():
            lab.stop()
        cluster.stop_all()


def test_a_campaign_across_three_labs_survives_a_lab_and_a_node_dying(
    fleet_env,
) -> None:
    cluster, labs = fleet_env
    t0 = time.monotonic()
    planner = {"user": "planner", "password": cluster.users["planner"]}
    with FleetClient(cluster.servers, **planner) as fleet:
        # JetStream up: the meta leader answers.
        wait_until("JetStream ready", lambda: _js_ready(fleet), 30, 0.2)
        for lab in labs.values():
            lab.start()
        wait_until(
            "three labs in PPU_LABS",
            lambda: {x.lab for x in fleet.labs()} >= set(LABS),
            60,
            0.2,
        )
        infos = {x.lab: x for x in fleet.labs()}
        assert "isotherm" not in infos["lab-c"].capabilities
        assert "isotherm" in infos["lab-a"].capabilities

        follower = Follower(cluster.servers, **planner)
        follower.start()

        specs = campaign()
        ids = fleet.submit_batch(specs, batch_id="ci-campaign")
        # Submitting the same batch again runs nothing twice (same message ids).
        assert fleet.submit_batch(specs, batch_id="ci-campaign") == ids
        bad = set(ids[-REFUSED:])

        outcomes: dict[str, list] = defaultdict(list)
        done: set[str] = set()
        results = fleet.results(ids, timeout=RUN_DEADLINE_S)

        def collect_until(n: int) -> None:
            for r in results:
                outcomes[r.msg_id].append(r)
                done.add(r.msg_id)
                if len(done) >= n:
                    return

        # Mid-run: kill -9 one lab, let the others go on, then bring it back.
        def mark(what: str) -> None:
            print(f"  {time.monotonic() - t0:6.1f} s  {what}: {len(done)} accounted, "
                  f"follower {dict(follower.seen)}", flush=True)

        print()
        collect_until(60)
        mark("kill -9 lab-b")
        labs["lab-b"].kill()
        collect_until(120)
        mark("restart lab-b")
        labs["lab-b"].start()
        # Then kill -9 a NATS node (lab-c's home node), with the follower dropped meanwhile
        # and resumed on its durable (a disconnect mid-way).
        collect_until(170)
        mark("drop the follower, kill -9 a NATS node")
        follower.pause.set()
        cluster.kill(cluster.nodes[2])
        collect_until(200)
        mark("resume the follower")
        follower.pause.clear()
        collect_until(TOTAL)
        mark("all accounted")
        run_s = time.monotonic() - t0

        # -- every experiment accounted for exactly once
        assert set(done) == set(ids), f"unaccounted: {sorted(set(ids) - done)[:5]}"
        assert all(len(v) == 1 for v in outcomes.values())
        refused = {m for m, [r] in outcomes.items() if r.refused}
        assert refused == bad, f"refused {sorted(refused ^ bad)[:5]} unexpectedly"
        for m, [r] in outcomes.items():
            if r.refused:
                assert r.refusal.field and r.refusal.reason, r
            elif r.state is not State.SUCCEEDED:
                assert r.state in (State.INTERRUPTED, State.CANCELLED, State.FAILED), r
                assert r.reason, f"{m}: {r.state.name} without a reason"
        states = Counter(
            "REFUSED" if r.refused else r.state.name for [r] in outcomes.values()
        )

        # -- the stream: every lab's events, consecutive from 1, each once
        try:
            wait_until(
                "labs published everything", lambda: _caught_up(fleet, labs), 60, 0.5
            )
        except TimeoutError as e:
            seen = [
                (x.lab, x.last_event_sequence, x.published_sequence)
                for x in fleet.labs()
            ]
            raise AssertionError(
                f"{e}; registry (lab, last, published): {seen}"
            ) from None
        items = read_stream(fleet)
        by_lab: dict[str, list[int]] = defaultdict(list)
        started: dict[str, set[tuple[str, str]]] = defaultdict(set)
        for it in items:
            if isinstance(it, FleetEvent):
                by_lab[it.lab].append(it.sequence)
                if it.kind == "experiment_state_changed" and it.msg_id:
                    ch = it.event.experiment_state_changed
                    if ch.to == State.RUNNING:
                        started[it.msg_id].add((it.lab, it.experiment_id))
        for name in LABS:
            # Each of 1..n exactly once. Stream order may differ from sequence order around
            # the node's death (docs/fleet.md, "Order"); the follower below checks that a
            # reader gets them in order.
            seqs = by_lab[name]
            assert len(seqs) == len(set(seqs)), f"{name}: a sequence stored twice"
            assert sorted(seqs) == list(range(1, len(seqs) + 1)), f"{name}: a gap"
        # Ran at most once: no work id started in two labs or twice in one.
        twice = {m: s for m, s in started.items() if len(s) > 1}
        assert not twice, f"started more than once: {list(twice.items())[:3]}"
        # A lab's copy cancelled as "taken by" another never started.
        for it in items:
            if (
                isinstance(it, FleetEvent)
                and it.kind == "experiment_state_changed"
                and it.event.experiment_state_changed.reason.startswith(TAKEN_BY_PREFIX)
            ):
                assert (it.lab, it.experiment_id) not in started.get(it.msg_id, set())

        # -- the follower resumed (after its drop and the node loss) without a gap
        # It reads the whole stream in the end (it may lag while six processes share two cores).
        try:
            wait_until(
                "the follower caught up",
                lambda: (
                    follower.error is not None
                    or all(follower.seen.get(n, 0) >= len(by_lab[n]) for n in LABS)
                ),
                90,
                0.2,
            )
        except TimeoutError as e:
            want = {n: len(by_lab[n]) for n in LABS}
            raise AssertionError(
                f"{e}: follower at {dict(follower.seen)} of {want}, "
                f"{len(follower.got)} events in {follower.sessions} sessions, "
                f"paused={follower.pause.is_set()}"
            ) from None
        follower.stop_flag.set()
        follower.join(timeout=30)
        assert follower.error is None, f"follower: {follower.error!r}"
        assert follower.sessions >= 2
        got: dict[str, list[int]] = defaultdict(list)
        for name, seq in follower.got:
            got[name].append(seq)
        for name in LABS:
            assert got[name] == list(range(1, len(got[name]) + 1)), (
                f"follower gap in {name}"
            )
            # The stream was read above; a lab may have logged more since (the follower reads on).
            assert len(got[name]) >= len(by_lab[name]), (
                f"follower missed {name}'s last events"
            )

        # -- security: a lab cannot publish as another; no password in any log
        assert _denied(cluster, "lab-a", "ppu.lab-b.events.experiment_state_changed")
        for lab in labs.values():
            text = lab.log.read_text()
            for pw in cluster.users.values():
                assert pw not in text, f"{lab.name}'s log shows a NATS password"

    reasons = Counter(
        f"{r.state.name} in {r.lab}: {r.reason}"
        for [r] in outcomes.values()
        if not r.refused and r.state is not State.SUCCEEDED
    )
    for why, n in reasons.most_common():
        print(f"  {n} x {why}")
    print(
        f"\nfleet run: {TOTAL} experiments in {run_s:.0f} s; outcomes {dict(states)}; "
        f"events per lab { ({k: len(v) for k, v in sorted(by_lab.items())}) }"
    )


def _js_ready(fleet: FleetClient) -> bool:
    async def go():
        try:
            await fleet._async._need().account_info()
            return True
        except Exception:
            return False

    return fleet._run(go())


def _caught_up(fleet: FleetClient, labs: dict[str, Lab]) -> bool:
    """Every running lab reports it published its whole log."""
    infos = {x.lab: x for x in fleet.labs()}
    return all(
        n in infos and infos[n].published_sequence >= infos[n].last_event_sequence > 0
        for n in labs
    )


def _denied(cluster: NatsCluster, user: str, subject: str) -> bool:
    """Whether the server refuses `user` publishing on `subject` (and nothing is stored)."""

    async def go():
        errors: list[Exception] = []

        async def on_error(e: Exception) -> None:
            errors.append(e)

        nc = await nats.connect(
            cluster.servers[:2],
            user=user,
            password=cluster.users[user],
            error_cb=on_error,
        )
        try:
            await nc.publish(subject, b"forged")
            await nc.flush(timeout=5)
            end = time.monotonic() + 10
            while not errors and time.monotonic() < end:
                await asyncio.sleep(
                    0.05
                )  # waiting for the server's -ERR, with a deadline
            return any("permissions violation" in str(e).lower() for e in errors)
        finally:
            await nc.close()

    return asyncio.run(go())
