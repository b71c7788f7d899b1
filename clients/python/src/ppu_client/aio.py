"""The asyncio client (grpc.aio): the same API as `ppu_client.Client`, with coroutines and async
iterators.

    async with AsyncClient("127.0.0.1:50051") as c:
        batch = await c.submit_batch([Experiment("anneal", [anneal(450, 3600)])])
        async for r in c.results(batch):
            print(r.name, r.state.name)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from . import pb
from ._connect import (
    DEFAULT_CONNECT_TIMEOUT_S,
    DIAGNOSIS_TIMEOUT_S,
    UNREACHABLE_CODES,
    PemSource,
    probe,
    resolve,
    state_reason,
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
from .client import _budget, _deadline, _unavailable
from .errors import UnavailableError, error_from_rpc
from .models import Batch, Capability, ExperimentResult, State
from .recipes import ExperimentLike
from .schema import Schema
from .schema import use as use_schema


class AsyncClient:
    """A grpc.aio connection to one ppud. Arguments as for `ppu_client.Client` (target forms,
    ``$PPU_ADDR``, ``token`` / ``$PPU_TOKEN``, TLS, `connect_timeout`); create it inside a
    running event loop."""

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
        channel: grpc.aio.Channel | None = None,
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
            channel = conn.open_channel(grpc.aio, CHANNEL_OPTIONS, options)
        self._channel = channel
        self._experiments = experiment_pb2_grpc.ExperimentServiceStub(self._channel)
        self._events = events_pb2_grpc.EventServiceStub(self._channel)
        self._devices = devices_pb2_grpc.DeviceServiceStub(self._channel)

    async def close(self) -> None:
        """Closes the channel (if this client opened it); open streams end."""
        self._closed = True
        if self._own_channel:
            await self._channel.close(grace=None)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _connect(self) -> None:
        """Returns once the channel is connected; UnavailableError naming the address when it
        is not within `connect_timeout` (else the call's `timeout`); see `Client`."""
        if self._channel.get_state() == grpc.ChannelConnectivity.READY:
            return
        limit = self.connect_timeout if self.connect_timeout is not None else self.timeout
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout=limit)
        except asyncio.TimeoutError:
            state = self._channel.get_state()
            try:
                await probe(self._channel, self._metadata, DIAGNOSIS_TIMEOUT_S, wait=False)
            except grpc.aio.AioRpcError as e:
                if e.code() in UNREACHABLE_CODES:
                    raise unreachable(self.target, limit, e, state_reason(state)) from None
            # Any reply at all means the daemon answered after all: make the call.

    async def _unary(self, method: Any, request: Any, **kw: Any) -> Any:
        await self._connect()
        try:
            return await method(request, timeout=self.timeout, metadata=self._metadata, **kw)
        except grpc.aio.AioRpcError as e:
            raise error_from_rpc(e, self.target) from None

    # -- experiments ----------------------------------------------------------------------------

    async def submit_batch(
        self,
        experiments: Iterable[ExperimentLike],
        key: str | None = None,
        *,
        attempts: int = 3,
    ) -> Batch:
        """Submits a batch; see `Client.submit_batch`."""
        req = submit_request(experiments, key)
        for attempt in range(max(attempts, 1)):
            await self._connect()
            try:
                resp = await self._experiments.SubmitBatch(
                    req, timeout=self.timeout, metadata=self._metadata, wait_for_ready=True
                )
                return Batch.from_proto(resp.batch, resp.duplicate)
            except grpc.aio.AioRpcError as e:
                if e.code() not in SUBMIT_RETRY_CODES or attempt + 1 >= max(attempts, 1):
                    raise error_from_rpc(e, self.target) from None
                await asyncio.sleep(backoff_s(attempt))
        raise AssertionError("unreachable")

    async def get(self, experiment_id: str) -> ExperimentResult:
        """One experiment with its state and step results. NotFoundError if unknown."""
        return ExperimentResult.from_proto(
            await self._unary(
                self._experiments.GetExperiment, pb.GetExperimentRequest(id=experiment_id)
            )
        )

    async def get_batch(self, batch_id: str) -> Batch:
        """One batch with its experiment ids. NotFoundError if unknown."""
        return Batch.from_proto(
            await self._unary(self._experiments.GetBatch, pb.GetBatchRequest(id=batch_id))
        )

    async def list(
        self,
        *,
        state: State | None = None,
        batch: Batch | str = "",
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
    ) -> AsyncIterator[ExperimentResult]:
        """Experiments in submission order, filtered; fetches further pages as it goes."""
        token = ""
        while True:
            resp = await self._unary(
                self._experiments.ListExperiments,
                list_request(state, batch_id_of(batch), labels, page_size, token),
            )
            for e in resp.experiments:
                yield ExperimentResult.from_proto(e)
            token = resp.next_page_token
            if not token:
                return

    async def cancel(
        self, experiment_id: str, reason: str = "", *, after_current_step: bool = False
    ) -> ExperimentResult:
        """Cancels an experiment; see `Client.cancel`."""
        return ExperimentResult.from_proto(
            await self._unary(
                self._experiments.CancelExperiment,
                pb.CancelExperimentRequest(
                    id=experiment_id, reason=reason, after_current_step=after_current_step
                ),
            )
        )

    # -- devices --------------------------------------------------------------------------------

    async def devices(self) -> tuple[pb.Device, ...]:
        """Every configured device with its capabilities, limits and link state."""
        resp = await self._unary(self._devices.ListDevices, pb.ListDevicesRequest())
        return tuple(resp.devices)

    async def schema(self) -> Schema:
        """Every device family the daemon knows (`DeviceService.GetSchema`), with the families
        compiled into the SDK: from then on `ppu_client.step()` builds, and the typed result
        views (`ExperimentResult.outputs()`, `TypedIntermediate.of`) decode, the commands and
        results of families added after this SDK was built. Returns the schema."""
        resp = await self._unary(self._devices.GetSchema, pb.GetSchemaRequest())
        return use_schema(Schema.from_descriptor_set(resp.file_descriptor_set))

    async def capabilities(self) -> frozenset[Capability]:
        """The step kinds at least one configured device can run."""
        return frozenset(
            Capability(c)
            for d in await self.devices()
            for c in d.capabilities
            if c in Capability._value2member_map_
        )

    # -- streams --------------------------------------------------------------------------------

    async def events(
        self,
        from_seq: int = 0,
        *,
        batch_id: str = "",
        experiment_id: str = "",
        reconnect_timeout: float | None = 60.0,
        timeout: float | None = None,
    ) -> AsyncGenerator[pb.Event, None]:
        """Every event after `from_seq`, resuming by itself after a disconnect with no gap and
        no duplicate; see `Client.events`."""
        last = from_seq
        end = None if timeout is None else time.monotonic() + timeout
        down_since: float | None = None
        failures = 0
        await self._connect()
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
                await call.initial_metadata()
                if not call.done():  # the daemon answered and the stream is open: link up
                    down_since = None
                async for ev in call:
                    failures = 0
                    if ev.sequence <= last:
                        continue  # never yield an event twice, whatever the transport does
                    last = ev.sequence
                    yield ev
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and end is not None:
                    raise _deadline(timeout, last) from None
                if code not in STREAM_RECONNECT_CODES or self._closed:
                    raise error_from_rpc(e, self.target) from None
            finally:
                call.cancel()
            if self._closed:
                raise UnavailableError(grpc.StatusCode.UNAVAILABLE, "the client was closed")
            now = time.monotonic()
            down_since = now if down_since is None else down_since
            budget = _budget(now, down_since, reconnect_timeout, end)
            pause = backoff_s(failures)
            failures += 1
            if end is not None and end - now <= pause:
                raise _deadline(timeout, last)
            if budget is not None and budget <= pause:
                raise _unavailable(self.target, reconnect_timeout, last)
            await asyncio.sleep(pause)
            try:
                await asyncio.wait_for(
                    self._channel.channel_ready(),
                    timeout=None if budget is None else budget - pause,
                )
            except asyncio.TimeoutError:
                if end is not None and time.monotonic() >= end:
                    raise _deadline(timeout, last) from None
                raise _unavailable(self.target, reconnect_timeout, last) from None

    async def results(
        self, batch: Batch | str, *, timeout: float | None = None
    ) -> AsyncGenerator[ExperimentResult, None]:
        """Yields each experiment of the batch as it finishes, then stops; see
        `Client.results`."""
        if not isinstance(batch, Batch):
            batch = await self.get_batch(batch)
        pending = set(batch.experiment_ids)
        if not pending:
            return
        stream = self.events(0, batch_id=batch.id, timeout=timeout)
        try:
            async for ev in stream:
                done = finished_experiment(ev)
                if done in pending:
                    pending.discard(done)
                    yield await self.get(done)
                    if not pending:
                        return
        finally:
            await stream.aclose()

    async def wait(
        self, batch: Batch | str, *, timeout: float | None = None
    ) -> tuple[ExperimentResult, ...]:
        """Every experiment of the batch once all have finished, in submission order."""
        if not isinstance(batch, Batch):
            batch = await self.get_batch(batch)
        got = {r.id: r async for r in self.results(batch, timeout=timeout)}
        return tuple(got[i] for i in batch.experiment_ids)
