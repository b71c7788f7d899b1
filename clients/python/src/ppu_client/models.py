"""Typed views of what the daemon returns: batches, experiments with their results, states and
capabilities. Each view keeps its protobuf message as `.proto` for everything it does not lift.

`TypedMessage` views any device family's message (a step result, an intermediate response) by
its schema: field names, values and units, for families the SDK has never heard of by name.
"""

from __future__ import annotations

import datetime as _dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from . import pb
from . import schema as _schema


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
class Field:
    """One field of a family message: its name, value and unit ("" when it has none).

    The value is a Python scalar (float, int, str, bool, bytes), None for an unset optional
    field, a `TypedMessage` for a message field, or a tuple of these for a repeated field."""

    name: str
    value: Any
    unit: str


class TypedMessage:
    """A device family's message with its schema: `fields()` gives every field with its value
    and unit (from the `(ppu.schema.v1.field).unit` option), ``view["flow_sccm"]`` one value,
    `unit("flow_sccm")` its unit. The decoded protobuf message is `.message`."""

    def __init__(self, message: Message) -> None:
        self.message = message

    @property
    def type_name(self) -> str:
        """Full name of the message, e.g. ``ppu.devices.mfc.v1.GasFlowResult``."""
        return self.message.DESCRIPTOR.full_name

    def _present(self) -> list[FieldDescriptor]:
        # Every field, except the members of a oneof that are not the one set.
        out = []
        for f in self.message.DESCRIPTOR.fields:
            oneof = f.containing_oneof
            if oneof is not None and not _is_synthetic(oneof):
                if self.message.WhichOneof(oneof.name) != f.name:
                    continue
            out.append(f)
        return out

    def fields(self) -> tuple[Field, ...]:
        """Every field in declaration order (of a oneof, only the member set)."""
        return tuple(Field(f.name, self._value(f), _schema.unit_of(f)) for f in self._present())

    def _field(self, name: str) -> FieldDescriptor:
        f = self.message.DESCRIPTOR.fields_by_name.get(name)
        if f is None:
            known = ", ".join(self.message.DESCRIPTOR.fields_by_name)
            raise KeyError(f"{self.type_name} has no field {name!r} (fields: {known})")
        return f

    def __getitem__(self, name: str) -> Any:
        return self._value(self._field(name))

    def __contains__(self, name: object) -> bool:
        return name in self.message.DESCRIPTOR.fields_by_name

    def unit(self, name: str) -> str:
        """The unit of field `name` ("" if it has none)."""
        return _schema.unit_of(self._field(name))

    def units(self) -> dict[str, str]:
        """Field name → unit, for the fields that have one."""
        return {f.name: u for f in self.message.DESCRIPTOR.fields if (u := _schema.unit_of(f))}

    def to_dict(self) -> dict[str, Any]:
        """The values as plain Python (nested messages as dicts, repeated fields as lists)."""
        return {f.name: _plain(f.value) for f in self.fields()}

    def _value(self, f: FieldDescriptor) -> Any:
        v = getattr(self.message, f.name)
        if _is_repeated(f):
            if _is_map(f):
                return {k: TypedMessage(x) if isinstance(x, Message) else x for k, x in v.items()}
            if f.message_type is not None:
                return tuple(TypedMessage(x) for x in v)
            return tuple(v)
        if f.has_presence and not self.message.HasField(f.name):
            return None
        if f.message_type is not None:
            return TypedMessage(v)
        return v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TypedMessage) and other.message == self.message

    def __repr__(self) -> str:
        inner = ", ".join(
            f"{f.name}={f.value!r}" + (f" {f.unit}" if f.unit else "") for f in self.fields()
        )
        return f"{type(self).__name__}<{self.type_name}>({inner})"


class TypedResult(TypedMessage):
    """A step's result as its family's result message (`TypedMessage`), whichever form the
    daemon returned it in (`StepResult.output`, or a typed ppu.v1 alias such as
    `StepResult.furnace`)."""

    def __init__(self, message: Message, proto: pb.StepResult) -> None:
        super().__init__(message)
        #: The `ppu.v1.StepResult` it came from (outcome, device, times).
        self.proto = proto

    @property
    def step_index(self) -> int:
        return self.proto.step_index

    @property
    def device_id(self) -> str:
        return self.proto.device_id

    @classmethod
    def of(cls, result: pb.StepResult, schema: _schema.Schema | None = None) -> TypedResult | None:
        """The typed view of a step result; None when the step returned nothing (it failed).
        Raises `KeyError` for a result of a family neither compiled in nor fetched with
        `Client.schema()`."""
        msg = (schema or _schema.current()).result_of(result)
        return None if msg is None else cls(msg, result)


class TypedIntermediate(TypedMessage):
    """An intermediate response of a running step (an isotherm point, a flow sample), from a
    `StepIntermediate` event or its typed alias (`isotherm_point_measured`)."""

    def __init__(self, message: Message, step_index: int, index: int, event: pb.Event) -> None:
        super().__init__(message)
        self.step_index = step_index
        #: Index of the response within the step (0, 1, ...).
        self.index = index
        #: The `ppu.v1.Event` it came from.
        self.proto = event

    @classmethod
    def of(cls, event: pb.Event, schema: _schema.Schema | None = None) -> TypedIntermediate | None:
        """The typed view of an event carrying an intermediate response; None for any other
        event."""
        got = (schema or _schema.current()).intermediate_of(event)
        if got is None:
            return None
        step_index, index, msg = got
        return cls(msg, step_index, index, event)


def _is_repeated(f: FieldDescriptor) -> bool:
    rep = getattr(f, "is_repeated", None)
    return rep if isinstance(rep, bool) else f.label == FieldDescriptor.LABEL_REPEATED


def _is_map(f: FieldDescriptor) -> bool:
    mt = f.message_type
    return mt is not None and mt.GetOptions().map_entry


def _is_synthetic(oneof: Any) -> bool:
    # proto3 `optional` fields sit in a synthetic oneof of their own.
    synthetic = getattr(oneof, "is_synthetic", None)
    if isinstance(synthetic, bool):
        return synthetic
    return len(oneof.fields) == 1 and oneof.name == "_" + oneof.fields[0].name


def _plain(value: Any) -> Any:
    if isinstance(value, TypedMessage):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


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

    def outputs(self, schema: _schema.Schema | None = None) -> list[TypedResult]:
        """Every finished step's result as its family's typed message with units
        (`TypedResult`), in step order, for every family (a step that returned nothing is
        left out). `schema` defaults to the compiled families plus those `Client.schema()`
        fetched."""
        views = (TypedResult.of(r, schema) for r in self.steps)
        return [v for v in views if v is not None]
