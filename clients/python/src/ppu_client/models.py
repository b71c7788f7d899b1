"""Typed views of what the daemon returns: batches, experiments with their results, states and
capabilities. Each view keeps its protobuf message as `.proto` for everything it does not lift.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf.timestamp_pb2 import Timestamp

from . import pb


class State(enum.IntEnum):
    """Lifecycle of an experiment (values match `ppu.v1.ExperimentState`)."""

    UNSPECIFIED = 0
    QUEUED = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    CANCELLED = 5
    INTERRUPTED = 6

    @property
    def terminal(self) -> bool:
        """No transition leaves this state."""
        return self in _TERMINAL


_TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.INTERRUPTED})


class Capability(enum.IntEnum):
    """A kind of step a device can run (values match `ppu.v1.Capability`)."""

    UNSPECIFIED = 0
    DISPENSE = 1
    WEIGH = 2
    FURNACE_PROGRAM = 3
    DEGAS = 4
    ISOTHERM = 5


def _time(ts: Timestamp) -> _dt.datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=_dt.timezone.utc)


@dataclass(frozen=True)
class Batch:
    """A stored batch: what `submit_batch` returns."""

    id: str
    idempotency_key: str
    #: Server-assigned experiment ids, in submission order.
    experiment_ids: tuple[str, ...]
    created_at: _dt.datetime | None
    #: True if the key had been accepted before and nothing new was enqueued.
    duplicate: bool
    proto: pb.Batch = field(repr=False)

    @classmethod
    def from_proto(cls, b: pb.Batch, duplicate: bool = False) -> Batch:
        return cls(
            id=b.id,
            idempotency_key=b.idempotency_key,
            experiment_ids=tuple(b.experiment_ids),
            created_at=_time(b.created_at),
            duplicate=duplicate,
            proto=b,
        )


@dataclass(frozen=True)
class ExperimentResult:
    """An experiment with its state and the typed results of its finished steps."""

    id: str
    batch_id: str
    name: str
    sample_id: str
    labels: Mapping[str, str]
    state: State
    #: Why it failed, was cancelled or was interrupted; empty otherwise.
    message: str
    #: Results of the finished steps, in step order (`ppu.v1.StepResult`).
    steps: tuple[pb.StepResult, ...] = field(repr=False)
    proto: pb.Experiment = field(repr=False)

    @classmethod
    def from_proto(cls, e: pb.Experiment) -> ExperimentResult:
        return cls(
            id=e.id,
            batch_id=e.batch_id,
            name=e.spec.name,
            sample_id=e.spec.sample_id,
            labels=dict(e.spec.labels),
            state=State(e.state),
            message=e.message,
            steps=tuple(e.results),
            proto=e,
        )

    @property
    def succeeded(self) -> bool:
        return self.state is State.SUCCEEDED

    @property
    def done(self) -> bool:
        """True once the experiment is in a terminal state."""
        return self.state.terminal

    def _of_kind(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.steps if r.WhichOneof("result") == kind]

    def isotherms(self) -> list[pb.IsothermResult]:
        """Every isotherm measured, in step order."""
        return self._of_kind("isotherm")

    def isotherm(self) -> pb.IsothermResult | None:
        """The last isotherm measured, or None."""
        found = self.isotherms()
        return found[-1] if found else None

    def furnace_results(self) -> list[pb.FurnaceResult]:
        """Every furnace program's result (trace, overshoot, targets), in step order."""
        return self._of_kind("furnace")

    def dispense_results(self) -> list[pb.DispenseResult]:
        """Every dispense's result, in step order."""
        return self._of_kind("dispense")
