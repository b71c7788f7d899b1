"""The synchronous client: submit batches, follow results and events, inspect and cancel.

Every failed call raises a `PpuError` subclass carrying the gRPC status code and the field path
the daemon named. Event streams survive disconnects: they reconnect and resume from the last
sequence seen, so a consumer sees every event exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Iterable, Iterator, Mapping, Sequence
from typing import Any, Callable, TypeVar

import grpc

from . import pb
from ._connect import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DIAGNOSIS_TIMEOUT_S,
    UNREACHABLE_CODES,
    PemSource,
    probe,
    resolve,
    target_or_default,
    unreachable,
)
from ._generated import devices_pb2_grpc, events_pb2_grpc, experiment_pb2_grpc
from ._requests import (
    CHANNEL_OPTIONS,
    STREAM_RECONNECT_CODES,
    SUBMIT_RETRY_CODES,
    backoff_s,
    batch_id_of,
    finished_experiment,
    list_request,
    submit_request,
)
from .errors import DeadlineExceededError, PpuError, UnavailableError, error_from_rpc
from .models import Batch, Capability, ExperimentResult, State
from .recipes import ExperimentLike
from .schema import Schema
from .schema import use as use_schema

_R = TypeVar("_R")


class Client:
    """A connection to one ppud.

    Args:
        target: the daemon's address: ``host:port`` or ``http://host:port`` (plain text),
            ``https://host:port`` (TLS), or ``unix:/path/to/ppud.sock`` (its local socket).
            None reads ``$PPU_ADDR`` (as ppuctl does), else ``127.0.0.1:50051``.
        token: the bearer token, sent as ``authorization: Bearer <token>`` metadata on every
            call (streams included). None reads ``$PPU_TOKEN``; with neither, no token is sent
            (ppud running open, or its local socket granting a role to the caller's uid).
        root_certificates: PEM of the CA(s) that signed ppud's certificate, as bytes or a file
            path. Implies TLS. None with ``https://`` uses gRPC's default roots.
        certificate_chain, private_key: this client's certificate and key (PEM bytes or file
            paths), for a daemon that requires client certificates (mTLS).
        tls_domain: the name to verify in ppud's certificate instead of the target's host.
        timeout: deadline in seconds for each unary call (None: no deadline).
        connect_timeout: seconds a call waits for a connection to the daemon before it fails
            with `UnavailableError` naming the address (default 3 s, so a wrong or dead
            address says so at once). None waits as long as the call's `timeout` allows
            (gRPC's wait-for-ready), e.g. for a planner started before the daemon.
        channel: an existing `grpc.Channel` to use instead of opening one (not closed by
            `close()`); the token is still sent on every call.
        options: extra gRPC channel options.

    Raises ValueError for a malformed token or contradictory TLS arguments (never echoing the
    token), OSError for a PEM file that cannot be read.

    Use it as a context manager, or call `close()`::

        with Client("127.0.0.1:50051") as c:
            batch = c.submit_batch([Experiment("anneal", [anneal(450, 3600)])])
            for r in c.results(batch):
                print(r.name, r.state.name)
    """

    def __init__(
        self,
        target: str | None = None,
        *,
        token: str | None = None,
        root_certificates: PemSource | None = None,
        certificate_chain: PemSource | None = None,
        private_key: PemSource | None = None,
        tls_domain: str | None = None,
        timeout: float | None = 30.0,
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        target = target_or_default(target)
        conn = resolve(
            target,
            token=token,
            root_certificates=root_certificates,
            certificate_chain=certificate_chain,
            private_key=private_key,
            tls_domain=tls_domain,
            own_channel=channel is None,
        )
        self.target = target
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._own_channel = channel is None
        self._closed = False
        self._metadata = conn.metadata
        if channel is None:
            channel = conn.open_channel(grpc, CHANNEL_OPTIONS, options)
        self._channel = channel
        # Whether the daemon answered since the last UNAVAILABLE: until it has, a call first
        # checks that it is there (`_connect`). (Not a gRPC connectivity subscription: its
        # polling thread fails noisily when the channel closes under it.)
        self._reached = False
        self._experiments = experiment_pb2_grpc.ExperimentServiceStub(self._channel)
        self._events = events_pb2_grpc.EventServiceStub(self._channel)
        self._devices = devices_pb2_grpc.DeviceServiceStub(self._channel)

    # -- lifecycle ------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel (if this client opened it); open streams end."""
        self._closed = True
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect(self) -> None:
        """Returns once the daemon has answered; UnavailableError naming the address when it
        does not within `connect_timeout` (else the call's `timeout`). Free once it has."""
        if self._reached:
            return
        limit = self.connect_timeout if self.connect_timeout is not None else self.timeout
        try:
            probe(self._channel, self._metadata, limit, wait=True)
        except grpc.RpcError as e:
            if e.code() in UNREACHABLE_CODES:
                raise unreachable(self.target, limit, self._why()) from None
        # Any status but those is the daemon's (e.g. UNAUTHENTICATED): it is there.
        self._reached = True

    def _why(self) -> grpc.RpcError | None:
        """gRPC's reason for not reaching the daemon (a call that does not wait fails at once
        with it), or None if it has none (the connection attempt is still pending)."""
        try:
            probe(self._channel, self._metadata, DIAGNOSIS_TIMEOUT_S, wait=False)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAVAILABLE:
                return e
        return None

    def _failed(self, e: grpc.RpcError) -> PpuError:
        """The error for a failed call; after UNAVAILABLE the next call checks the link."""
        if e.code() == grpc.StatusCode.UNAVAILABLE:
            self._reached = False
        return error_from_rpc(e, self.target)

    def _unary(self, method: Callable[..., _R], request: Any, **kw: Any) -> _R:
        self._connect()
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata, **kw)
        except grpc.RpcError as e:
            raise self._failed(e) from None

    # -- experiments ----------------------------------------------------------------------------

    def submit_batch(
        self,
        experiments: Iterable[ExperimentLike],
        key: str | None = None,
        *,
        attempts: int = 3,
    ) -> Batch:
        """Submits a batch; returns it once the daemon has stored it durably.

        Args:
            experiments: `Experiment` dataclasses or `pb.ExperimentSpec` messages.
            key: the idempotency key. None derives one from the content (SHA-256), so calling
                again with the same experiments returns the stored batch (``duplicate=True``)
                instead of enqueueing twice. Pass an explicit key to submit identical content
                as a new batch.
            attempts: tries when the link drops or the reply is lost; the retries reuse the
                key, so they cannot enqueue twice. Each waits at most `connect_timeout` for a
                connection.

        Raises:
            InvalidArgumentError: a recipe is malformed or breaks a device limit;
                `field_path` names the field, e.g.
                ``experiments[0].steps[0].furnace.segments[0].ramp.temperature_c``.
            FailedPreconditionError: no configured device can run a step.
            AlreadyExistsError: the key was used before with different content.
        """
        req = submit_request(experiments, key)
        for attempt in range(max(attempts, 1)):
            self._connect()
            try:
                resp = self._experiments.SubmitBatch(
                    req, timeout=self.timeout, metadata=self._metadata, wait_for_ready=True
                )
                return Batch.from_proto(resp.batch, resp.duplicate)
            except grpc.RpcError as e:
                if e.code() not in SUBMIT_RETRY_CODES or attempt + 1 >= max(attempts, 1):
                    raise self._failed(e) from None
                self._failed(e)
                time.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    def get(self, experiment_id: str) -> ExperimentResult:
        """One experiment with its state and step results. NotFoundError if unknown."""
        return ExperimentResult.from_proto(
            self._unary(self._experiments.GetExperiment, pb.GetExperimentRequest(id=experiment_id))
        )

    def get_batch(self, batch_id: str) -> Batch:
        """One batch with its experiment ids. NotFoundError if unknown."""
        return Batch.from_proto(
            self._unary(self._experiments.GetBatch, pb.GetBatchRequest(id=batch_id))
        )

    def list(
        self,
        *,
        state: State | None = None,
        batch: Batch | str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> Iterator[ExperimentResult]:
        """Experiments in submission order, filtered; fetches further pages as it goes."""
        token = ""
        while True:
            resp = self._unary(
                self._experiments.ListExperiments,
                list_request(state, batch_id_of(batch), labels, page_size, token),
            )
            for e in resp.experiments:
                yield ExperimentResult.from_proto(e)
            token = resp.next_page_token
            if not token:
                return

    def cancel(
        self, experiment_id: str, reason: str = "", *, after_current_step: bool = False
    ) -> ExperimentResult:
        """Cancels an experiment: a QUEUED one at once, a RUNNING one by aborting its step (or,
        with `after_current_step`, before its next step). FailedPreconditionError if it has
        already finished."""
        return ExperimentResult.from_proto(
            self._unary(
                self._experiments.CancelExperiment,
                pb.CancelExperimentRequest(
                    id=experiment_id, reason=reason, after_current_step=after_current_step
                ),
            )
        )

    # -- devices --------------------------------------------------------------------------------

    def devices(self) -> tuple[pb.Device, ...]:
        """Every configured device with its capabilities, limits and link state."""
        return tuple(self._unary(self._devices.ListDevices, pb.ListDevicesRequest()).devices)

    def schema(self) -> Schema:
        """Every device family the daemon knows (`DeviceService.GetSchema`), with the families
        compiled into the SDK: from then on `ppu_client.step()` builds, and the typed result
        views (`ExperimentResult.outputs()`, `TypedIntermediate.of`) decode, the commands and
        results of families added after this SDK was built. Returns the schema."""
        resp = self._unary(self._devices.GetSchema, pb.GetSchemaRequest())
        return use_schema(Schema.from_descriptor_set(resp.file_descriptor_set))

    def capabilities(self) -> frozenset[Capability]:
        """The step kinds at least one configured device can run."""
        return frozenset(
            Capability(c)
            for d in self.devices()
            for c in d.capabilities
            if c in Capability._value2member_map_
        )

    # -- streams --------------------------------------------------------------------------------

    def events(
        self,
        from_seq: int = 0,
        *,
        batch_id: str = "",
        experiment_id: str = "",
        reconnect_timeout: float | None = 60.0,
        timeout: float | None = None,
    ) -> Generator[pb.Event, None, None]:
        """Every event after sequence `from_seq`, oldest first, then the live tail, forever.

        When the connection drops or the daemon restarts, the stream reconnects by itself and
        resumes after the last sequence it yielded: no gap, no duplicate. Close the generator
        (or stop iterating) to end it.

        The first connection waits at most `connect_timeout` (UnavailableError naming the
        address); once the stream has been up, an outage is bounded by `reconnect_timeout`.

        Args:
            from_seq: sequence of the last event already seen; 0 for the whole log.
            batch_id, experiment_id: only events of this batch / experiment.
            reconnect_timeout: give up with UnavailableError when the daemon stays unreachable
                this long (seconds); None retries forever.
            timeout: end the whole iteration with DeadlineExceededError after this long.
        """
        last = from_seq
        end = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        failures = 0
        self._connect()
        while True:
            remaining = None if end is None else end - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise _deadline(timeout, last)
            call = self._events.StreamEvents(
                pb.StreamEventsRequest(
                    from_sequence=last, batch_id=batch_id, experiment_id=experiment_id
                ),
                timeout=remaining,
                metadata=self._metadata,
            )
            try:
                call.initial_metadata()
                if not call.done():  # the daemon answered and the stream is open: link up
                    down_since = None
                for ev in call:
                    failures = 0
                    if ev.sequence <= last:
                        continue  # never yield an event twice, whatever the transport does
                    last = ev.sequence
                    yield ev
            except grpc.RpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and end is not None:
                    raise _deadline(timeout, last) from None
                if code not in STREAM_RECONNECT_CODES or self._closed:
                    raise self._failed(e) from None
            finally:
                call.cancel()
            if self._closed:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the client was closed")
            # The stream ended (the daemon shut down) or the link broke: resume after `last`.
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            budget = _budget(now, down_since, reconnect_timeout, end)
            pause = backoff_s(failures)
            failures += 1
            if end is not None and end - now <= pause:
                raise _deadline(timeout, last)
            if budget is not None and budget <= pause:
                raise _unavailable(self.target, reconnect_timeout, last)
            time.sleep(pause)
            try:
                grpc.channel_ready_future(self._channel).result(
                    timeout=None if budget is None else budget - pause
                )
            except grpc.FutureTimeoutError:
                if end is not None and time.monotonic() >= end:
                    raise _deadline(timeout, last) from None
                raise _unavailable(self.target, reconnect_timeout, last) from None

    def results(
        self, batch: Batch | str, *, timeout: float | None = None
    ) -> Generator[ExperimentResult, None, None]:
        """Yields each experiment of the batch once it has finished (succeeded, failed,
        cancelled or interrupted), in the order they finish, then stops.

        Survives disconnects like `events`. `timeout` bounds the whole wait
        (DeadlineExceededError)."""
        if not isinstance(batch, Batch):
            batch = self.get_batch(batch)
        pending = set(batch.experiment_ids)
        if not pending:
            return
        stream = self.events(0, batch_id=batch.id, timeout=timeout)
        try:
            for ev in stream:
                done = finished_experiment(ev)
                if done in pending:
                    pending.discard(done)
                    yield self.get(done)
                    if not pending:
                        return
        finally:
            stream.close()

    def wait(
        self, batch: Batch | str, *, timeout: float | None = None
    ) -> tuple[ExperimentResult, ...]:
        """Every experiment of the batch once all have finished, in submission order."""
        if not isinstance(batch, Batch):
            batch = self.get_batch(batch)
        got = {r.id: r for r in self.results(batch, timeout=timeout)}
        return tuple(got[i] for i in batch.experiment_ids)


def _budget(
    now: float, down_since: float, reconnect_timeout: float | None, end: float | None
) -> float | None:
    """Seconds left to re-establish a stream, or None for no limit."""
    limits = []
    if reconnect_timeout is not None:
        limits.append(down_since + reconnect_timeout - now)
    if end is not None:
        limits.append(end - now)
    return min(limits) if limits else None


def _unavailable(target: str, reconnect_timeout: float | None, last: int) -> UnavailableError:
    msg = (
        f"event stream to {target} lost and not re-established within {reconnect_timeout} s "
        f"(last sequence seen: {last})"
    )
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, msg)


def _deadline(timeout: float | None, last: int) -> DeadlineExceededError:
    msg = f"event stream timeout of {timeout} s reached (last sequence seen: {last})"
    return DeadlineExceededError(grpc.StatusCode.DEADLINE_EXCEEDED, msg)
