"""The fleet client: one campaign across many ppud labs through NATS JetStream (docs/fleet.md).

A planner does not talk to the labs. It publishes one message per experiment into the work
queue (stream ``PPU_WORK``, subject ``ppu-work.<capabilities>``); every lab pulls the subjects
whose capabilities it has, only while it has capacity, commits the experiment locally and
publishes its event log into the stream ``PPU_EVENTS`` (``ppu.<lab>.events.<kind>``). The
planner follows that stream with a durable consumer of its own, so it resumes after a
disconnect or a restart where it stopped::

    from ppu_client import Experiment, anneal
    from ppu_client.fleet import FleetClient

    with FleetClient(["nats://n1:4222", "nats://n2:4222"], user="planner", password=pw) as fleet:
        ids = fleet.submit_batch([Experiment("LDH 450 C", [anneal(450.0, hold_s=3600.0)])])
        for r in fleet.results(ids, timeout=3600):
            print(r.msg_id, r.lab, r.state.name, r.reason)

Needs ``nats-py`` (``pip install 'ppu-client[fleet]'``). `AsyncFleetClient` is the asyncio
API; `FleetClient` runs it on a private event loop thread for synchronous code.

Delivery: an event is acknowledged to JetStream once the caller asks for the next one (or stops
iterating), so a planner that crashes while handling an event gets it again. Within one lab the
events carry consecutive sequences: the client checks them (`last_sequences`), drops a
redelivered one and raises `SequenceGapError` if one is missing.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import json
import re
import secrets
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, MutableMapping
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import Any, TypeVar, Union

try:
    import nats
    import nats.errors
    import nats.js.errors
    from nats.js import api as js_api
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "ppu_client.fleet needs nats-py; install it with `pip install 'ppu-client[fleet]'`"
    ) from e

from . import pb
from . import schema as _schema
from .models import State
from .recipes import ExperimentLike

#: Stream of every lab's events and refusals.
EVENTS_STREAM = "PPU_EVENTS"
#: Work-queue stream planners publish experiments to.
WORK_STREAM = "PPU_WORK"
#: KV bucket of the labs (registry with a heartbeat TTL).
LABS_BUCKET = "PPU_LABS"
#: KV bucket of the exactly-once claims (key: work message id, value: lab id).
CLAIMS_BUCKET = "PPU_CLAIMS"
#: Subject prefix of the work queue.
WORK_PREFIX = "ppu-work."
#: Filter of every lab's events, and of every lab's refusals.
EVENTS_FILTER = "ppu.*.events.>"
REFUSALS_FILTER = "ppu.*.refused"

#: Headers of the contract (FLEET.md).
MSG_ID_HEADER = "Nats-Msg-Id"
BATCH_HEADER = "Ppu-Batch"
LAB_HEADER = "Ppu-Lab"
SEQUENCE_HEADER = "Ppu-Sequence"
#: On a fleet experiment's events: the work message id it came from.
WORK_ID_HEADER = "Ppu-Msg-Id"

#: A capability name: one subject token, no `-` (it joins them in the subject).
_CAPABILITY = re.compile(r"^[a-z0-9_]+$")
#: A batch id: a KV key token (the claims bucket keys are message ids), no `.` (it separates
#: the batch id from the index in a message id).
_BATCH_ID = re.compile(r"^[A-Za-z0-9_=-]{1,128}$")
#: A message id: a valid KV key (claims are keyed by it).
_MSG_ID = re.compile(r"^[A-Za-z0-9_=./-]{1,256}$")
#: Reason a lab gives when it cancels its copy of an experiment another lab claimed first.
TAKEN_BY_PREFIX = "taken by lab "

#: How many publishes of a batch are in flight at once.
_PUBLISH_WINDOW = 64
#: Events fetched per pull request.
_FETCH_BATCH = 256
#: Longest wait of one pull request (seconds); deadlines are checked between them.
_FETCH_WAIT_S = 1.0
#: After this long without a message, check that the consumer still exists (seconds).
_CHECK_AFTER_S = 3.0

_T = TypeVar("_T")

SpecLike = Union[ExperimentLike, pb.ExperimentSpec]
CapabilityOverride = Union[None, Iterable[str], Callable[[pb.ExperimentSpec], Iterable[str]]]


class FleetError(Exception):
    """A fleet operation failed (the message says which and why)."""


class SequenceGapError(FleetError):
    """A lab's events skipped a sequence: an event is missing from the fleet stream."""

    def __init__(self, lab: str, expected: int, got: int) -> None:
        super().__init__(
            f"lab {lab}: event sequence {got} follows {expected - 1}; "
            f"{got - expected} event(s) missing from {EVENTS_STREAM}"
        )
        self.lab = lab
        self.expected = expected
        self.got = got


class FleetTimeoutError(FleetError, TimeoutError):
    """Results did not all arrive in time; `pending` names the work ids still open."""

    def __init__(self, pending: Seq[str], timeout: float) -> None:
        shown = ", ".join(sorted(pending)[:5]) + (" ..." if len(pending) > 5 else "")
        super().__init__(f"{len(pending)} experiment(s) unfinished after {timeout:g} s: {shown}")
        self.pending = tuple(pending)


# -- contract helpers -----------------------------------------------------------------------------


def capabilities_of(
    spec: pb.ExperimentSpec, schema: _schema.Schema | None = None
) -> tuple[str, ...]:
    """The sorted unique capabilities an experiment's steps need (`furnace_program`, ...), read
    from the family schemas (compiled ones, plus the daemon's after `Client.schema()`).
    ValueError naming the step for one no family declares."""
    sch = schema or _schema.current()
    caps = set()
    for i, step in enumerate(spec.steps):
        found = sch.command_of(step)
        if found is None:
            kind = step.WhichOneof("kind") or "nothing"
            raise ValueError(
                f"steps[{i}]: a {kind} step runs no device family's command, so no lab "
                "capability can be derived for it (pass capabilities=)"
            )
        caps.add(found[0].capability)
    if not caps:
        raise ValueError("steps: an experiment needs at least one step")
    return tuple(sorted(caps))


def work_subject(capabilities: Iterable[str]) -> str:
    """``ppu-work.<caps>``: the sorted unique capability names joined by ``-``."""
    caps = sorted(set(capabilities))
    if not caps:
        raise ValueError("capabilities: at least one is needed")
    for c in caps:
        if not _CAPABILITY.match(c):
            raise ValueError(
                f"capabilities: {c!r} is not a capability name (lower-case letters, digits, _)"
            )
    return WORK_PREFIX + "-".join(caps)


def new_batch_id() -> str:
    """A fresh batch id, sortable by time: ``b<ms hex><random hex>``."""
    return f"b{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


def msg_id(batch_id: str, index: int) -> str:
    """The work message id (and the labs' idempotency key) of a batch's `index`-th experiment."""
    return f"{batch_id}.{index}"


def _spec(x: SpecLike) -> pb.ExperimentSpec:
    if isinstance(x, pb.ExperimentSpec):
        return x
    to_proto = getattr(x, "to_proto", None)
    if to_proto is None:
        raise TypeError(f"expected an Experiment or pb.ExperimentSpec, got {type(x).__name__}")
    return to_proto()


# -- what the fleet says --------------------------------------------------------------------------


@dataclass(frozen=True)
class FleetEvent:
    """One lab event from the fleet stream."""

    #: The lab that recorded it.
    lab: str
    #: The lab's own event sequence (consecutive within a lab).
    sequence: int
    #: Its position in the PPU_EVENTS stream (across labs).
    stream_sequence: int
    #: The Event oneof field name (`experiment_state_changed`, ...).
    kind: str
    #: The work message id of a fleet experiment's event ("" otherwise).
    msg_id: str
    #: The planner's batch id, when the work message had one.
    batch_id: str
    #: The event itself (its `sequence` is the lab's).
    event: pb.Event = field(repr=False)

    @property
    def experiment_id(self) -> str:
        """The lab's id of the experiment ("" for a lab-wide event)."""
        return self.event.experiment_id


@dataclass(frozen=True)
class Refusal:
    """A lab refused a work message (validation): the reason names the field."""

    lab: str
    msg_id: str
    batch_id: str
    field: str
    reason: str
    stream_sequence: int = 0


@dataclass(frozen=True)
class LabInfo:
    """A lab's registry entry (`PPU_LABS`); it disappears when its heartbeat stops."""

    lab: str
    capabilities: tuple[str, ...]
    devices: tuple[Mapping[str, Any], ...]
    queue_depth: int
    running: int
    capacity: int
    heartbeat: _dt.datetime | None
    last_event_sequence: int
    published_sequence: int
    raw: Mapping[str, Any] = field(repr=False)

    @classmethod
    def from_json(cls, key: str, data: bytes) -> LabInfo:
        d = json.loads(data)
        hb = d.get("heartbeat")
        when = None
        if isinstance(hb, str) and hb:
            try:
                when = _dt.datetime.fromisoformat(hb.replace("Z", "+00:00"))
            except ValueError:
                when = None
        return cls(
            lab=str(d.get("lab") or key),
            capabilities=tuple(d.get("capabilities") or ()),
            devices=tuple(d.get("devices") or ()),
            queue_depth=int(d.get("queue_depth") or 0),
            running=int(d.get("running") or 0),
            capacity=int(d.get("capacity") or 0),
            heartbeat=when,
            last_event_sequence=int(d.get("last_event_sequence") or 0),
            published_sequence=int(d.get("published_sequence") or 0),
            raw=d,
        )


@dataclass
class FleetResult:
    """Where one submitted experiment ended: run in one lab (its final state and step results),
    or refused with a reason."""

    msg_id: str
    lab: str = ""
    experiment_id: str = ""
    state: State = State.UNSPECIFIED
    #: Why it failed, was cancelled or interrupted, or the refusal's reason.
    reason: str = ""
    refusal: Refusal | None = None
    #: Results of its finished steps, in the order they finished.
    steps: list[pb.StepResult] = field(default_factory=list, repr=False)

    @property
    def refused(self) -> bool:
        return self.refusal is not None

    def isotherm(self) -> pb.IsothermResult | None:
        """The last isotherm measured, or None."""
        for r in reversed(self.steps):
            if r.WhichOneof("result") == "isotherm":
                return r.isotherm
        return None


def _header(msg: Any, name: str) -> str:
    h = msg.headers or {}
    return str(h.get(name, ""))


def _stream_seq(msg: Any) -> int:
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:  # not a JetStream delivery (never for our consumers)
        return 0


def decode(msg: Any) -> FleetEvent | Refusal | None:
    """A PPU_EVENTS message as a `FleetEvent` or a `Refusal`; None for a subject outside the
    contract (skipped)."""
    parts = msg.subject.split(".")
    if len(parts) == 3 and parts[0] == "ppu" and parts[2] == "refused":
        d = json.loads(msg.data or b"{}")
        return Refusal(
            lab=parts[1],
            msg_id=str(d.get("msg_id", "")),
            batch_id=str(d.get("batch_id", "")),
            field=str(d.get("field", "")),
            reason=str(d.get("reason", "")),
            stream_sequence=_stream_seq(msg),
        )
    if len(parts) >= 4 and parts[0] == "ppu" and parts[2] == "events":
        ev = pb.Event.FromString(msg.data)
        seq = ev.sequence or int(_header(msg, SEQUENCE_HEADER) or 0)
        return FleetEvent(
            lab=_header(msg, LAB_HEADER) or parts[1],
            sequence=seq,
            stream_sequence=_stream_seq(msg),
            kind=ev.WhichOneof("kind") or parts[3],
            msg_id=_header(msg, WORK_ID_HEADER),
            batch_id=_header(msg, BATCH_HEADER),
            event=ev,
        )
    return None


async def _drop(sub: Any) -> None:
    """Unsubscribes a pull subscription (best effort); returns None to clear the caller's."""
    if sub is not None:
        try:
            await sub.unsubscribe()
        except Exception:
            pass
    return None


# -- the asyncio client ---------------------------------------------------------------------------

#: Errors after which a pull is retried (the cluster is electing a leader, a node went away,
#: the connection is re-established).
_TRANSIENT = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    nats.js.errors.ServerError,
    nats.js.errors.NoStreamResponseError,
    asyncio.TimeoutError,
)


class AsyncFleetClient:
    """The fleet through NATS JetStream (asyncio). See the module doc.

    Args:
        servers: NATS URL(s) (``nats://host:4222``, ``tls://host:4222``).
        user, password: NATS user credentials (the planner's account user).
        creds: a NATS ``.creds`` file (JWT + nkey seed), for operator-mode servers.
        nkey_seed: a file holding an nkey seed, for nkey users.
        tls: an `ssl.SSLContext` (CA, client certificate), or None.
        name: the connection name shown in the server's monitoring.
        connect_timeout: seconds to wait for the first connection.
        request_timeout: seconds to wait for a JetStream reply (a publish ack, an API call).

    Credentials are passed to nats-py and never shown in a repr or an error message.
    """

    def __init__(
        self,
        servers: str | Seq[str] = "nats://127.0.0.1:4222",
        *,
        user: str | None = None,
        password: str | None = None,
        creds: str | None = None,
        nkey_seed: str | None = None,
        tls: ssl.SSLContext | None = None,
        name: str = "ppu-planner",
        connect_timeout: float = 5.0,
        request_timeout: float = 10.0,
    ) -> None:
        self._servers = [servers] if isinstance(servers, str) else list(servers)
        if not self._servers:
            raise ValueError("servers: at least one NATS URL is needed")
        if (user is None) != (password is None):
            raise ValueError("user and password go together")
        self._opts: dict[str, Any] = {
            "servers": self._servers,
            "name": name,
            "connect_timeout": connect_timeout,
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
        }
        if user is not None:
            self._opts["user"] = user
            self._opts["password"] = password
        if creds is not None:
            self._opts["user_credentials"] = creds
        if nkey_seed is not None:
            self._opts["nkeys_seed"] = nkey_seed
        if tls is not None:
            self._opts["tls"] = tls
        self._request_timeout = request_timeout
        self._nc: Any = None
        self._js: Any = None
        #: When this client published each work id (for `results` to start reading there).
        self._submitted_at: dict[str, _dt.datetime] = {}

    def __repr__(self) -> str:
        return f"AsyncFleetClient(servers={self._servers!r})"

    async def connect(self) -> AsyncFleetClient:
        if self._nc is None:

            async def quiet(_e: Exception) -> None:
                # nats-py reports every failed reconnect attempt here; the calls that need
                # the connection retry or raise on their own.
                return None

            try:
                self._nc = await nats.connect(error_cb=quiet, **self._opts)
            except Exception as e:
                raise FleetError(
                    f"cannot connect to NATS at {', '.join(self._servers)}: {type(e).__name__}"
                    f"{': ' + str(e) if str(e) else ''}"
                ) from None
            self._js = self._nc.jetstream(timeout=self._request_timeout)
        return self

    async def close(self) -> None:
        if self._nc is not None:
            nc, self._nc = self._nc, None
            try:
                await nc.drain()
            except Exception:
                await nc.close()

    async def __aenter__(self) -> AsyncFleetClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _need(self) -> Any:
        if self._js is None:
            raise FleetError("not connected: use `async with AsyncFleetClient(...)` or connect()")
        return self._js

    # -- submit ---------------------------------------------------------------------------------

    async def submit_batch(
        self,
        specs: Iterable[SpecLike],
        batch_id: str | None = None,
        *,
        capabilities: CapabilityOverride = None,
        msg_ids: Seq[str] | None = None,
    ) -> list[str]:
        """Publishes one work message per experiment and returns their message ids, in order.

        Each goes to ``ppu-work.<caps>``, the capabilities its steps need (from the family
        schemas), unless `capabilities` gives them: one set for every experiment, or a function
        of the `ExperimentSpec`. The message id is ``<batch_id>.<index>`` (or `msg_ids`): the
        labs' idempotency key, so submitting the same batch again never runs anything twice
        (JetStream drops a repeat within its 2-minute window; a lab that already committed the
        id drops it after). Returns when JetStream has stored every message.
        """
        js = self._need()
        specs = [_spec(s) for s in specs]
        if not specs:
            raise ValueError("specs: a batch needs at least one experiment")
        if batch_id is None:
            batch_id = new_batch_id()
        elif not _BATCH_ID.match(batch_id):
            raise ValueError(
                f"batch_id: {batch_id!r} must be 1-128 characters of A-Z a-z 0-9 _ = -"
            )
        if msg_ids is None:
            ids = [msg_id(batch_id, i) for i in range(len(specs))]
        else:
            ids = list(msg_ids)
            if len(ids) != len(specs):
                raise ValueError(f"msg_ids: {len(ids)} ids for {len(specs)} experiments")
            for i, m in enumerate(ids):
                if not _MSG_ID.match(m):
                    raise ValueError(
                        f"msg_ids[{i}]: {m!r} must be 1-256 characters of A-Z a-z 0-9 _ = . / -"
                    )
            if len(set(ids)) != len(ids):
                raise ValueError("msg_ids: ids must be unique within a batch")
        subjects = []
        for i, s in enumerate(specs):
            if capabilities is None:
                try:
                    caps: Iterable[str] = capabilities_of(s)
                except ValueError as e:
                    raise ValueError(f"specs[{i}].{e}") from None
            elif callable(capabilities):
                caps = capabilities(s)
            else:
                caps = capabilities
            subjects.append(work_subject(caps))

        sem = asyncio.Semaphore(_PUBLISH_WINDOW)
        now = _dt.datetime.now(_dt.timezone.utc)

        async def publish(subject: str, spec: pb.ExperimentSpec, mid: str) -> None:
            headers = {MSG_ID_HEADER: mid, BATCH_HEADER: batch_id}
            data = spec.SerializeToString()
            async with sem:
                for attempt in range(8):
                    try:
                        await js.publish(subject, data, stream=WORK_STREAM, headers=dict(headers))
                        self._submitted_at[mid] = now
                        return
                    except nats.js.errors.NoStreamResponseError:
                        raise FleetError(
                            f"no JetStream stream takes {subject}: {WORK_STREAM} does not exist "
                            "yet (each lab creates it when it starts with [fleet])"
                        ) from None
                    except _TRANSIENT:
                        # A leader election or a lost node: the same message id makes the retry
                        # safe (JetStream keeps one copy).
                        await asyncio.sleep(min(0.25 * 2**attempt, 3.0))
                raise FleetError(f"{mid}: JetStream did not acknowledge the publish")

        await asyncio.gather(*(publish(sj, s, m) for sj, s, m in zip(subjects, specs, ids)))
        return ids

    # -- follow ---------------------------------------------------------------------------------

    async def _consumer(
        self,
        *,
        durable: str | None,
        filter_subject: str | None,
        deliver: str,
        start_time: _dt.datetime | None,
        start_seq: int | None,
    ) -> Any:
        """Binds (creating it if needed) a pull consumer on PPU_EVENTS."""
        js = self._need()
        if durable is not None:
            try:
                await js.consumer_info(EVENTS_STREAM, durable)
                return await js.pull_subscribe_bind(durable=durable, stream=EVENTS_STREAM)
            except nats.js.errors.NotFoundError:
                pass
        cfg = js_api.ConsumerConfig(
            durable_name=durable,
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=30.0,
            max_ack_pending=4 * _FETCH_BATCH,
            filter_subject=filter_subject,
        )
        if start_seq is not None:
            cfg.deliver_policy = js_api.DeliverPolicy.BY_START_SEQUENCE
            cfg.opt_start_seq = start_seq
        elif start_time is not None:
            cfg.deliver_policy = js_api.DeliverPolicy.BY_START_TIME
            cfg.opt_start_time = start_time.astimezone(_dt.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S.%fZ"
            )
        elif deliver == "new":
            cfg.deliver_policy = js_api.DeliverPolicy.NEW
        elif deliver == "all":
            cfg.deliver_policy = js_api.DeliverPolicy.ALL
        else:
            raise ValueError(f"deliver: {deliver!r} is neither 'all' nor 'new'")
        if durable is None:
            cfg.inactive_threshold = 60.0
            # An ephemeral consumer is R1 unless asked: replicate it as the stream is, so it
            # outlives the loss of the node that leads it (a durable does so by default).
            try:
                stream = await js.stream_info(EVENTS_STREAM)
                cfg.num_replicas = stream.config.num_replicas or 1
            except nats.js.errors.NotFoundError:
                pass  # reported by add_consumer below
        try:
            info = await js.add_consumer(EVENTS_STREAM, cfg)
        except nats.js.errors.NotFoundError:
            raise FleetError(
                f"{EVENTS_STREAM} does not exist yet (each lab creates it when it starts with "
                "[fleet])"
            ) from None
        return await js.pull_subscribe_bind(durable=durable, name=info.name, stream=EVENTS_STREAM)

    async def _messages(
        self,
        *,
        durable: str | None,
        filter_subject: str | None,
        deliver: str = "all",
        start_time: _dt.datetime | None = None,
        deadline: float | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        """Every message of the consumer, across disconnects and node losses. The caller acks
        (or naks) each; one redelivered within this call is acked and dropped here (by stream
        sequence: JetStream redelivers out of order after a leader change, so "not newer than
        the last" would drop a message that was lost in flight). What a fetch brought and the
        caller never saw is handed back (nak) at the end, so a resuming consumer gets it at
        once instead of after the ack wait."""
        sub = None
        seen: set[int] = set()
        idle_since = time.monotonic()
        backoff = 0.1
        held: list[Any] = []
        checked = time.monotonic()
        try:
            while True:
                now = time.monotonic()
                if deadline is not None and now >= deadline:
                    return
                if idle_timeout is not None and now - idle_since >= idle_timeout:
                    return
                if sub is None:
                    try:
                        sub = await self._consumer(
                            durable=durable,
                            filter_subject=filter_subject,
                            deliver=deliver,
                            start_time=start_time,
                            start_seq=None,
                        )
                        backoff = 0.1
                    except _TRANSIENT:
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, 2.0)
                        continue
                wait = _FETCH_WAIT_S
                if deadline is not None:
                    wait = max(0.05, min(wait, deadline - now))
                try:
                    held = await sub.fetch(_FETCH_BATCH, timeout=wait)
                except nats.js.errors.NotFoundError:
                    sub = await _drop(sub)  # the consumer is gone: bind (or recreate) it
                    continue
                except _TRANSIENT:
                    # Nothing came. A pull to a consumer lost with its node gets no answer at
                    # all, so now and then ask whether it still exists.
                    if time.monotonic() - checked >= _CHECK_AFTER_S:
                        checked = time.monotonic()
                        try:
                            await sub.consumer_info()
                        except nats.js.errors.NotFoundError:
                            sub = await _drop(sub)
                        except Exception:
                            pass  # no answer either: the next pass asks again
                    continue
                except nats.js.errors.APIError:
                    # e.g. 409 "consumer deleted" / "leadership change": bind again.
                    sub = await _drop(sub)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                    continue
                idle_since = checked = time.monotonic()
                while held:
                    msg = held.pop(0)
                    seq = _stream_seq(msg)
                    if seq in seen:
                        await msg.ack()  # redelivered: the caller had it
                        continue
                    seen.add(seq)
                    yield msg
        finally:
            held.extend(await self._late(sub))
            for m in held:
                try:
                    await m.nak()
                except Exception:
                    pass
            await _drop(sub)

    async def _late(self, sub: Any) -> list[Any]:
        """What the last pull request delivered after its fetch returned: the server may send
        a message just before the request expires, and it lands in the subscription's queue
        after the fetch gave up. Dropped with the subscription, it would stay pending until its
        ack wait (30 s) and hold back everything after it in that lab's order. A flush (a
        round trip: what the server sent before it has arrived) then the queue's contents."""
        if sub is None or self._nc is None:
            return []
        try:
            await self._nc.flush(timeout=1.0)
            waiting = sub.pending_msgs
            if waiting:
                return list(await sub.fetch(waiting + 1, timeout=0.5))
        except Exception:
            pass  # best effort: anything missed comes back after the ack wait
        return []

    async def events(
        self,
        durable: str,
        *,
        deliver: str = "all",
        last_sequences: MutableMapping[str, int] | None = None,
        on_gap: str = "raise",
        gap_timeout: float = 75.0,
        labs: Iterable[str] | None = None,
        kinds: Iterable[str] | None = None,
        batch_id: str | None = None,
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[FleetEvent]:
        """Every lab's events from PPU_EVENTS through the durable consumer `durable` (created on
        first use from `deliver` = ``"all"`` or ``"new"``; later calls resume where the last
        one stopped, across disconnects and restarts of this process).

        Per lab, events are yielded in sequence order. `last_sequences` (lab → last sequence
        handled) is updated as they are yielded: keep it (e.g. in a file) and pass it back so
        the check also covers the first events after a resume. A redelivered event (sequence
        already handled) is dropped. One that arrives early (JetStream redelivers an event
        lost in flight after its ack wait, out of order) waits, unacknowledged, for the
        missing ones; if they have not come within `gap_timeout` seconds the stream has a
        gap: `SequenceGapError` (``on_gap="raise"``), or go on past it (``"ignore"``).

        An event is acked when the caller asks for the next one (or stops), so one being
        handled when the planner crashes comes again. `labs`, `kinds` (Event oneof names) and
        `batch_id` (the planner's) select what is yielded; the sequence check sees every event.
        Stops after `timeout` seconds, or once no event came for `idle_timeout` seconds; by
        default it follows forever.
        """
        if on_gap not in ("raise", "ignore"):
            raise ValueError(f"on_gap: {on_gap!r} is neither 'raise' nor 'ignore'")
        seen = last_sequences if last_sequences is not None else {}
        want_labs = set(labs) if labs is not None else None
        want_kinds = set(kinds) if kinds is not None else None
        deadline = time.monotonic() + timeout if timeout is not None else None
        # lab -> sequence -> (event, message), and when the lab's first early one came.
        early: dict[str, dict[int, tuple[FleetEvent, Any]]] = {}
        waiting_since: dict[str, float] = {}

        def wanted(ev: FleetEvent) -> bool:
            return (
                (want_labs is None or ev.lab in want_labs)
                and (want_kinds is None or ev.kind in want_kinds)
                and (batch_id is None or ev.batch_id == batch_id)
            )

        try:
            async for msg in self._messages(
                durable=durable,
                filter_subject=EVENTS_FILTER,
                deliver=deliver,
                deadline=deadline,
                idle_timeout=idle_timeout,
            ):
                ev = decode(msg)
                if not isinstance(ev, FleetEvent):
                    await msg.ack()
                    continue
                last = seen.get(ev.lab)
                if last is not None and ev.sequence <= last:
                    await msg.ack()  # already handled (redelivered, or re-published)
                    continue
                if last is not None and ev.sequence != last + 1:
                    early.setdefault(ev.lab, {})[ev.sequence] = (ev, msg)
                    waiting_since.setdefault(ev.lab, time.monotonic())
                    # A gap that outlived the redelivery of anything lost in flight is real.
                    for lab, since in list(waiting_since.items()):
                        if time.monotonic() - since < gap_timeout:
                            continue
                        first = min(early[lab])
                        if on_gap == "raise":
                            raise SequenceGapError(lab, seen[lab] + 1, first)
                        seen[lab] = first - 1  # go on past the gap
                        del waiting_since[lab]
                        async for out in self._release(lab, seen, early, wanted):
                            yield out
                    continue
                seen[ev.lab] = ev.sequence
                if wanted(ev):
                    yield ev
                await msg.ack()
                waiting_since.pop(ev.lab, None)
                async for out in self._release(ev.lab, seen, early, wanted):
                    yield out
                if early.get(ev.lab):
                    waiting_since[ev.lab] = time.monotonic()
        finally:
            # Early events never yielded go back (they come again on the next call).
            for by_seq in early.values():
                for _, m in by_seq.values():
                    try:
                        await m.nak()
                    except Exception:
                        pass

    @staticmethod
    async def _release(
        lab: str,
        seen: MutableMapping[str, int],
        early: dict[str, dict[int, tuple[FleetEvent, Any]]],
        wanted: Callable[[FleetEvent], bool],
    ) -> AsyncIterator[FleetEvent]:
        """Yields the early events of `lab` that now follow on, in order."""
        by_seq = early.get(lab, {})
        while seen[lab] + 1 in by_seq:
            ev, m = by_seq.pop(seen[lab] + 1)
            seen[lab] = ev.sequence
            if wanted(ev):
                yield ev
            await m.ack()

    async def refusals(
        self,
        durable: str | None = None,
        *,
        deliver: str = "all",
        timeout: float | None = None,
        idle_timeout: float | None = None,
    ) -> AsyncIterator[Refusal]:
        """The labs' refusals (``ppu.<lab>.refused``): through the durable consumer `durable`,
        or an ephemeral one reading from `deliver`."""
        deadline = time.monotonic() + timeout if timeout is not None else None
        async for msg in self._messages(
            durable=durable,
            filter_subject=REFUSALS_FILTER,
            deliver=deliver,
            deadline=deadline,
            idle_timeout=idle_timeout,
        ):
            r = decode(msg)
            if isinstance(r, Refusal):
                yield r
            await msg.ack()

    async def results(
        self,
        msg_ids: Iterable[str],
        *,
        timeout: float | None = None,
        since: _dt.datetime | None = None,
    ) -> AsyncIterator[FleetResult]:
        """Each submitted experiment's outcome as it becomes final, in the order they finish:
        a terminal state in the lab that runs it, or a refusal. A lab's cancellation of its
        copy that another lab claimed first ("taken by lab ...") is not an outcome: the other
        lab's is. Reads PPU_EVENTS (events and refusals) from `since` (default: when this
        client submitted the first of them, else the stream's start). Raises
        `FleetTimeoutError` naming the unfinished ones after `timeout` seconds."""
        pending = set(msg_ids)
        if not pending:
            return
        if since is None:
            known = [self._submitted_at[m] for m in pending if m in self._submitted_at]
            if len(known) == len(pending):
                since = min(known) - _dt.timedelta(seconds=5)
        deadline = time.monotonic() + timeout if timeout is not None else None
        # (lab, experiment id) -> the result being gathered. Step results are keyed by step
        # index: events of one experiment may arrive out of order after a redelivery.
        open_: dict[tuple[str, str], FleetResult] = {}
        steps: dict[tuple[str, str], dict[int, pb.StepResult]] = {}
        async for msg in self._messages(
            durable=None,
            filter_subject=None,
            start_time=since,
            deadline=deadline,
        ):
            item = decode(msg)
            await msg.ack()
            if isinstance(item, Refusal):
                if item.msg_id in pending:
                    pending.discard(item.msg_id)
                    yield FleetResult(
                        msg_id=item.msg_id,
                        lab=item.lab,
                        state=State.UNSPECIFIED,
                        reason=f"{item.field}: {item.reason}" if item.field else item.reason,
                        refusal=item,
                    )
            elif isinstance(item, FleetEvent) and item.msg_id in pending:
                key = (item.lab, item.experiment_id)
                r = open_.setdefault(
                    key, FleetResult(msg_id=item.msg_id, lab=item.lab, experiment_id=key[1])
                )
                if item.kind == "step_finished":
                    res = item.event.step_finished.result
                    steps.setdefault(key, {})[res.step_index] = res
                elif item.kind == "experiment_state_changed":
                    ch = item.event.experiment_state_changed
                    if not State(ch.to).terminal:
                        continue
                    r.state = State(ch.to)
                    r.reason = ch.reason
                    if r.state is State.CANCELLED and ch.reason.startswith(TAKEN_BY_PREFIX):
                        continue  # another lab owns it
                    pending.discard(item.msg_id)
                    r.steps = [v for _, v in sorted(steps.pop(key, {}).items())]
                    del open_[key]
                    yield r
            if not pending:
                return
        if pending:
            raise FleetTimeoutError(sorted(pending), timeout or 0.0)

    # -- registry -------------------------------------------------------------------------------

    async def labs(self) -> list[LabInfo]:
        """The labs whose heartbeat is current (PPU_LABS), by id."""
        js = self._need()
        try:
            kv = await js.key_value(LABS_BUCKET)
        except nats.js.errors.NotFoundError:
            return []
        # The keys from the bucket stream's subjects (no consumer needed, so a planner's
        # permissions stay read-only: stream info and direct gets).
        info = await js.stream_info(f"KV_{LABS_BUCKET}", subjects_filter=f"$KV.{LABS_BUCKET}.>")
        prefix = f"$KV.{LABS_BUCKET}."
        keys = [s.removeprefix(prefix) for s in (info.state.subjects or {})]
        out = []
        for k in sorted(keys):
            try:
                entry = await kv.get(k)
            except nats.js.errors.NotFoundError:
                continue  # expired between the listing and the read
            if entry.value:
                out.append(LabInfo.from_json(k, entry.value))
        return out

    async def claim(self, msg_id: str) -> str | None:
        """The lab holding the claim of a work message (PPU_CLAIMS), or None."""
        js = self._need()
        try:
            kv = await js.key_value(CLAIMS_BUCKET)
            entry = await kv.get(msg_id)
        except nats.js.errors.NotFoundError:
            return None
        return entry.value.decode() if entry.value else None


# -- the synchronous client -----------------------------------------------------------------------


class FleetClient:
    """`AsyncFleetClient` for synchronous code: the same calls, run on a private event loop
    thread; the iterators (`events`, `refusals`, `results`) are plain generators. Use it as a
    context manager, or call `close()`."""

    def __init__(self, servers: str | Seq[str] = "nats://127.0.0.1:4222", **kwargs: Any):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ppu-fleet", daemon=True
        )
        self._thread.start()
        self._async = AsyncFleetClient(servers, **kwargs)
        try:
            self._run(self._async.connect())
        except BaseException:
            self._stop_loop()
            raise

    def __repr__(self) -> str:
        return f"FleetClient(servers={self._async._servers!r})"

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[_T]) -> Iterator[_T]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if self._loop.is_running():
                self._run(agen.aclose())  # type: ignore[attr-defined]

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def close(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self._async.close())
            finally:
                self._stop_loop()

    def __enter__(self) -> FleetClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit_batch(
        self,
        specs: Iterable[SpecLike],
        batch_id: str | None = None,
        *,
        capabilities: CapabilityOverride = None,
        msg_ids: Seq[str] | None = None,
    ) -> list[str]:
        """See `AsyncFleetClient.submit_batch`."""
        return self._run(
            self._async.submit_batch(specs, batch_id, capabilities=capabilities, msg_ids=msg_ids)
        )

    def events(self, durable: str, **kwargs: Any) -> Iterator[FleetEvent]:
        """See `AsyncFleetClient.events`."""
        return self._iterate(self._async.events(durable, **kwargs))

    def refusals(self, durable: str | None = None, **kwargs: Any) -> Iterator[Refusal]:
        """See `AsyncFleetClient.refusals`."""
        return self._iterate(self._async.refusals(durable, **kwargs))

    def results(self, msg_ids: Iterable[str], **kwargs: Any) -> Iterator[FleetResult]:
        """See `AsyncFleetClient.results`."""
        return self._iterate(self._async.results(msg_ids, **kwargs))

    def labs(self) -> list[LabInfo]:
        """See `AsyncFleetClient.labs`."""
        return self._run(self._async.labs())

    def claim(self, msg_id: str) -> str | None:
        """See `AsyncFleetClient.claim`."""
        return self._run(self._async.claim(msg_id))


__all__ = [
    "AsyncFleetClient",
    "FleetClient",
    "FleetError",
    "FleetEvent",
    "FleetResult",
    "FleetTimeoutError",
    "LabInfo",
    "Refusal",
    "SequenceGapError",
    "capabilities_of",
    "decode",
    "msg_id",
    "new_batch_id",
    "work_subject",
]
