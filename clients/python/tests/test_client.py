"""The synchronous client against a real `ppud dev`: submit and collect, idempotency, events that
survive a dropped link and a daemon crash, cancel, and errors that name the field."""

from __future__ import annotations

import signal

import grpc
import pytest
from conftest import Daemon, TcpProxy
from ppu_client import (
    AlreadyExistsError,
    Client,
    DeadlineExceededError,
    Experiment,
    FailedPreconditionError,
    Hold,
    InvalidArgumentError,
    NotFoundError,
    Ramp,
    State,
    StepTo,
    UnavailableError,
    furnace,
    pb,
)

# At --time-scale 2000 a short anneal takes about a second of real time.
RESULT_TIMEOUT_S = 120.0


def short_anneal(
    name: str, temperature_c: float, hold_s: float = 300.0, **labels: str
) -> Experiment:
    return Experiment(
        name,
        [furnace(Ramp(temperature_c, 20.0), Hold(hold_s), StepTo(60.0))],
        sample_id=f"S-{name}",
        labels=labels,
    )


def long_hold(name: str, device_id: str = "") -> Experiment:
    """Occupies a furnace for minutes of real time (48 h physical), until cancelled."""
    return Experiment(name, [furnace(StepTo(40.0), Hold(48 * 3600.0), device_id=device_id)])


def test_submit_and_collect_results(client: Client) -> None:
    exps = [short_anneal(f"collect-{t}", t, suite="collect") for t in (120.0, 150.0, 180.0)]
    batch = client.submit_batch(exps)
    assert len(batch.experiment_ids) == 3
    assert not batch.duplicate
    assert batch.idempotency_key.startswith("auto-sha256:")

    seen = []
    for r in client.results(batch, timeout=RESULT_TIMEOUT_S):
        # Yielded once finished, with the typed furnace result of the step.
        assert r.done
        assert r.state is State.SUCCEEDED, r.message
        (fr,) = r.furnace_results()
        target = r.proto.spec.steps[0].furnace.segments[0].ramp.temperature_c
        assert any(abs(t.temperature_c - target) < 1e-9 for t in fr.targets)
        assert len(fr.trace) > 2
        seen.append(r.id)
    assert sorted(seen) == sorted(batch.experiment_ids)

    # get / list agree with what results() yielded; list is in submission order.
    listed = list(client.list(batch=batch))
    assert [r.id for r in listed] == list(batch.experiment_ids)
    assert [r.name for r in listed] == [e.name for e in exps]
    assert client.get(batch.experiment_ids[1]).name == "collect-150.0"
    assert {r.id for r in client.list(labels={"suite": "collect"}, state=State.SUCCEEDED)} >= set(
        batch.experiment_ids
    )
    assert client.wait(batch.id, timeout=RESULT_TIMEOUT_S)[2].name == "collect-180.0"


def test_resubmission_is_idempotent(client: Client) -> None:
    exps = [short_anneal("idem", 110.0)]
    first = client.submit_batch(exps)
    again = client.submit_batch(exps)  # a retry after a lost reply: same derived key
    assert again.duplicate and again.id == first.id
    assert again.experiment_ids == first.experiment_ids
    # An explicit key submits identical content as a new batch ...
    other = client.submit_batch(exps, key=f"idem-explicit-{first.id}")
    assert not other.duplicate and other.id != first.id
    # ... and reusing that key with different content is refused.
    with pytest.raises(AlreadyExistsError) as ei:
        client.submit_batch([short_anneal("idem-changed", 115.0)], key=f"idem-explicit-{first.id}")
    assert ei.value.code == grpc.StatusCode.ALREADY_EXISTS
    client.wait(first, timeout=RESULT_TIMEOUT_S)
    client.wait(other, timeout=RESULT_TIMEOUT_S)


def test_invalid_batch_raises_naming_the_field(client: Client) -> None:
    too_hot = Experiment("too hot", [furnace(Ramp(5000.0, 10.0))])
    with pytest.raises(InvalidArgumentError) as ei:
        client.submit_batch([short_anneal("valid", 100.0), too_hot])
    err = ei.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.field_path == "experiments[1].steps[0].furnace.segments[0].ramp.temperature_c"
    assert "5000" in err.reason and not err.reason.startswith("experiments[")
    assert err.field_path in str(err)

    with pytest.raises(InvalidArgumentError) as ei:
        client.submit_batch([Experiment("negative hold", [furnace(StepTo(50.0), Hold(-1.0))])])
    assert ei.value.field_path == "experiments[0].steps[0].furnace.segments[1].hold.duration_s"

    # Nothing of a refused batch is stored.
    assert not [r for r in client.list() if r.name in ("valid", "too hot", "negative hold")]

    with pytest.raises(NotFoundError) as ei:
        client.get("no-such-experiment")
    assert ei.value.code == grpc.StatusCode.NOT_FOUND
    assert ei.value.field_path == "id"


def test_cancel_running_and_queued(client: Client) -> None:
    # Both pinned to one furnace: the first runs, the second waits behind it.
    batch = client.submit_batch(
        [long_hold("cancel-running", "furnace-2"), long_hold("cancel-queued", "furnace-2")]
    )
    running_id, queued_id = batch.experiment_ids
    # Wait (on events, with a deadline) until the first is RUNNING.
    for ev in client.events(0, experiment_id=running_id, timeout=RESULT_TIMEOUT_S):
        if (
            ev.WhichOneof("kind") == "experiment_state_changed"
            and ev.experiment_state_changed.to == State.RUNNING
        ):
            break

    queued = client.cancel(queued_id, reason="not needed")
    assert queued.state is State.CANCELLED
    assert queued.message  # the reason is recorded
    client.cancel(running_id, reason="stop the hold")

    results = {r.id: r for r in client.results(batch, timeout=RESULT_TIMEOUT_S)}
    assert results[queued_id].state is State.CANCELLED
    assert results[running_id].state is State.CANCELLED
    (step,) = results[running_id].steps
    assert step.outcome == pb.STEP_OUTCOME_ABORTED

    with pytest.raises(FailedPreconditionError) as ei:
        client.cancel(running_id)
    assert ei.value.code == grpc.StatusCode.FAILED_PRECONDITION


def _assert_exact_log(events: list[pb.Event], client: Client) -> None:
    """Unfiltered, the sequence is the global one: 1, 2, 3, ... with nothing missing or
    repeated, and identical to a fresh replay of the log."""
    seqs = [e.sequence for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "gap or duplicate in the resumed stream"
    replay = []
    for ev in client.events(0, timeout=RESULT_TIMEOUT_S):
        replay.append(ev)
        if ev.sequence == seqs[-1]:
            break
    assert [e.SerializeToString(deterministic=True) for e in replay] == [
        e.SerializeToString(deterministic=True) for e in events
    ]


def test_events_resume_after_daemon_crash_and_restart(own_daemon: Daemon) -> None:
    with Client(own_daemon.addr) as c:
        # The long hold goes first so it is running when the daemon dies.
        batch = c.submit_batch(
            [long_hold("crash-long")]
            + [short_anneal(f"crash-{i}", 150.0 + 10 * i) for i in range(4)]
        )
        long_id = batch.experiment_ids[0]
        pending = set(batch.experiment_ids)
        events: list[pb.Event] = []
        killed_at = None
        first_pid = own_daemon.proc.pid if own_daemon.proc else None
        # One iterator across the crash: it must reconnect and resume by itself.
        stream = c.events(0, timeout=RESULT_TIMEOUT_S, reconnect_timeout=60.0)
        for ev in stream:
            events.append(ev)
            kind = ev.WhichOneof("kind")
            if killed_at is None and kind == "step_started" and ev.experiment_id == long_id:
                # Mid-stream, with the 48 h hold running: kill the daemon (SIGKILL) and bring
                # it back on the same port and data dir.
                killed_at = ev.sequence
                own_daemon.restart()
            if (
                kind == "experiment_state_changed"
                and State(ev.experiment_state_changed.to).terminal
            ):
                pending.discard(ev.experiment_id)
                if not pending:
                    break
        stream.close()
        assert killed_at is not None
        assert own_daemon.starts == 2 and own_daemon.proc and own_daemon.proc.pid != first_pid
        # The restarted daemon marked the long hold INTERRUPTED; that event, committed by the
        # second daemon, reached us through the same iterator.
        interrupted = [
            e
            for e in events
            if e.WhichOneof("kind") == "experiment_state_changed"
            and e.experiment_state_changed.to == State.INTERRUPTED
        ]
        assert long_id in {e.experiment_id for e in interrupted}
        assert all(e.sequence > killed_at for e in interrupted)
        # The short ones all finished, before or after the crash.
        assert all(c.get(i).done for i in batch.experiment_ids)
        _assert_exact_log(events, c)


def test_events_resume_when_the_link_drops(client: Client, proxy: TcpProxy) -> None:
    with Client(proxy.addr) as via_proxy:
        batch = client.submit_batch(
            [short_anneal(f"link-{i}", 130.0 + 10 * i, 3600.0, suite="link") for i in range(3)]
        )
        pending = set(batch.experiment_ids)
        got: list[pb.Event] = []
        cuts = 0
        cut_after = 0  # connections accepted when the link was last cut
        stream = via_proxy.events(0, batch_id=batch.id, timeout=RESULT_TIMEOUT_S)
        for ev in stream:
            got.append(ev)
            # Drop the link twice, mid-stream, while the daemon keeps committing events; the
            # second time only once the client has reconnected (events received before the
            # first cut may still be buffered).
            if (
                cuts < 2
                and proxy.accepted > cut_after
                and ev.WhichOneof("kind") in ("step_started", "step_progress")
            ):
                cut_after = proxy.accepted
                assert proxy.cut() >= 1
                cuts += 1
            if (
                ev.WhichOneof("kind") == "experiment_state_changed"
                and State(ev.experiment_state_changed.to).terminal
            ):
                pending.discard(ev.experiment_id)
                if not pending:
                    break
        stream.close()
        assert cuts == 2 and proxy.accepted >= 3  # it reconnected after each cut
        # Filtered: sequences skip others' events but must be strictly increasing and match a
        # direct replay of the same filter exactly.
        seqs = [e.sequence for e in got]
        assert seqs == sorted(set(seqs))
        direct = []
        for ev in client.events(0, batch_id=batch.id, timeout=RESULT_TIMEOUT_S):
            direct.append(ev)
            if ev.sequence == seqs[-1]:
                break
        assert [e.sequence for e in direct] == seqs


def test_events_from_sequence_skips_what_was_seen(client: Client) -> None:
    batch = client.submit_batch([short_anneal("from-seq", 125.0)])
    client.wait(batch, timeout=RESULT_TIMEOUT_S)
    all_events = []
    for ev in client.events(0, batch_id=batch.id, timeout=RESULT_TIMEOUT_S):
        all_events.append(ev)
        if len(all_events) >= 3:
            break
    after = next(iter(client.events(all_events[1].sequence, batch_id=batch.id, timeout=30.0)))
    assert after.sequence == all_events[2].sequence


def test_events_timeout_and_unreachable_daemon(daemon: Daemon) -> None:
    with Client(daemon.addr) as c:
        with pytest.raises(DeadlineExceededError):
            for _ in c.events(0, experiment_id="01ARZ3NDEKTSV4RRFFQ69G5FAV", timeout=1.0):
                pass
    # Nothing listens on this port (it was free a moment ago): the stream gives up after its
    # reconnect budget instead of hanging.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    with Client(dead) as c, pytest.raises(UnavailableError):
        next(iter(c.events(0, reconnect_timeout=1.0)))


def test_capabilities_and_devices(client: Client) -> None:
    from ppu_client import Capability

    devices = client.devices()
    assert any(d.id == "furnace-1" for d in devices)
    assert Capability.FURNACE_PROGRAM in client.capabilities()


def test_events_give_up_when_the_daemon_stays_down(own_daemon: Daemon) -> None:
    with Client(own_daemon.addr) as c:
        c.submit_batch([short_anneal("down", 100.0)])
        stream = c.events(0, reconnect_timeout=2.0, timeout=RESULT_TIMEOUT_S)
        first = next(stream)
        assert first.sequence == 1
        own_daemon.stop(signal.SIGKILL)
        with pytest.raises(UnavailableError) as ei:
            for _ in stream:
                pass
        assert "not re-established" in str(ei.value)
