"""Request building and retry policy shared by the synchronous and the asyncio client, so the
two cannot drift: idempotency keys, request messages, which failures a stream survives, and the
reconnect backoff."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import grpc

from . import pb
from .errors import InvalidArgumentError
from .models import Batch, State
from .recipes import ExperimentLike, experiment_to_proto

#: Prefix of the keys `submit_batch` derives from the batch content.
AUTO_KEY_PREFIX = "auto-sha256:"

#: Channel options: reconnect quickly after a daemon restart (gRPC's defaults back off to 2 min),
#: and ping an idle stream so a dead link is noticed and the stream resumed.
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
)

#: Status codes after which an event stream reconnects and resumes: the link or the daemon went
#: away (UNAVAILABLE), or the transport reset the stream under us (the daemon itself never ends
#: a stream with these). Anything else is the daemon refusing the request and is raised.
STREAM_RECONNECT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)

#: Status codes after which a submission is retried with the same idempotency key: the request
#: may or may not have reached the daemon, and the key makes a second delivery harmless.
SUBMIT_RETRY_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def backoff_s(failures: int) -> float:
    """Pause before reconnect attempt number `failures` (0-based): 50 ms doubling to 2 s."""
    return min(0.05 * (2**failures), 2.0)


def content_key(experiments: Iterable[pb.ExperimentSpec]) -> str:
    """An idempotency key derived from the batch content: the SHA-256 of its deterministic
    serialisation. The same experiments give the same key, so a retried call never enqueues
    twice; submitting identical content again on purpose needs an explicit key."""
    req = pb.SubmitBatchRequest(experiments=list(experiments))
    return AUTO_KEY_PREFIX + hashlib.sha256(req.SerializeToString(deterministic=True)).hexdigest()


def submit_request(experiments: Iterable[ExperimentLike], key: str | None) -> pb.SubmitBatchRequest:
    """The SubmitBatch request, with `key` or a content-derived one."""
    specs = [experiment_to_proto(e) for e in experiments]
    if not specs:
        raise InvalidArgumentError(
            grpc.StatusCode.INVALID_ARGUMENT,
            "experiments: at least one experiment is required",
            field_path="experiments",
            reason="at least one experiment is required",
        )
    return pb.SubmitBatchRequest(
        idempotency_key=key if key is not None else content_key(specs), experiments=specs
    )


def list_request(
    state: State | None,
    batch_id: str,
    labels: Mapping[str, str] | None,
    page_size: int,
    page_token: str,
) -> pb.ListExperimentsRequest:
    return pb.ListExperimentsRequest(
        state=pb.ExperimentState.Name(state.value) if state is not None else None,
        batch_id=batch_id,
        labels=dict(labels or {}),
        page_size=page_size,
        page_token=page_token,
    )


def batch_id_of(batch: Batch | str) -> str:
    return batch.id if isinstance(batch, Batch) else batch


def finished_experiment(ev: pb.Event) -> str | None:
    """The id of the experiment an event shows entering a terminal state, else None."""
    if ev.WhichOneof("kind") != "experiment_state_changed":
        return None
    try:
        to = State(ev.experiment_state_changed.to)
    except ValueError:
        return None
    return ev.experiment_id if to.terminal else None
