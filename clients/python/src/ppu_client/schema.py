"""Device families from their schemas: build any family's step by its command name and decode
any family's messages, with no family known to the SDK by name.

Each family declares its commands, results and intermediate responses in a `.proto` it owns
(`ppu.devices.<family>.v1`), annotated with the `ppu.schema.v1` options: the command's step name
and capability, each field's unit and bounds. The families present when the SDK was built are
compiled into it (`ppu_client._generated.families`); `Client.schema()` adds those the daemon
knows from its `DeviceService.GetSchema`, so a family added after the SDK was built still
builds and decodes::

    from ppu_client import Client, Experiment, step

    with Client() as lab:
        lab.schema()  # learn the daemon's families (needed only for families added later)
        lab.submit_batch([Experiment("flow", [step("gas_flow", gas="CO2", flow_sccm=50)])])

Typed views of the decoded messages (field names, values, units) are in `ppu_client.models`.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from google.protobuf.message import Message

from . import pb
from ._generated import families as _families
from ._generated.families.ppu.schema.v1 import options_pb2

#: The `Any` type URL prefix ppud uses (and protobuf's `Any.Pack`).
TYPE_URL_PREFIX = "type.googleapis.com/"


@dataclass(frozen=True)
class Command:
    """A command a step can run, as its family's schema declares it."""

    #: Step name: the key in a batch file and the head of a refusal's field path (`gas_flow`).
    name: str
    #: The family declaring it (`mfc`).
    family: str
    #: The capability a device needs to run it (`gas_flow`).
    capability: str
    #: Its parameter message.
    message: Descriptor
    #: Full names of its result and intermediate response messages ("" if none).
    result: str
    intermediate: str
    observable: bool
    #: Field numbers of its typed ppu.v1 aliases (0 for commands added after v1).
    v1_step_field: int
    v1_result_field: int
    v1_intermediate_event: int

    def parameters(self) -> tuple[tuple[str, str], ...]:
        """Its parameters as (name, unit) pairs, in declaration order."""
        return tuple((f.name, unit_of(f)) for f in self.message.fields)


@dataclass(frozen=True)
class Family:
    """A device family and its commands."""

    name: str
    description: str
    safe_state: str
    commands: tuple[Command, ...]


def unit_of(field: FieldDescriptor) -> str:
    """The field's unit from its `(ppu.schema.v1.field).unit` option; "" if it has none."""
    opts = field.GetOptions()
    if not opts.HasExtension(options_pb2.field):
        return ""
    return opts.Extensions[options_pb2.field].unit


def _file_proto(fd: FileDescriptor) -> descriptor_pb2.FileDescriptorProto:
    p = descriptor_pb2.FileDescriptorProto()
    fd.CopyToProto(p)
    return p


def _messages(container: Iterable[Descriptor]) -> Iterator[Descriptor]:
    for d in container:
        yield d
        yield from _messages(d.nested_types)


class Schema:
    """Every family known: the compiled ones and, once `Client.schema()` ran, the daemon's.

    Messages of the compiled families are the generated classes (so ``isinstance`` with
    `ppu_client._generated.families.<family>.<family>_pb2` holds); a family the SDK was not
    built with gets classes made at run time from the daemon's descriptors. Where both know a
    family, the compiled one is used.
    """

    def __init__(self, files: Iterable[FileDescriptor], pool: descriptor_pool.DescriptorPool):
        files = list(files)
        self._pool = pool
        self._file_list = files
        families: dict[str, Family] = {}
        commands: dict[str, Command] = {}
        for fd in files:
            fopts = fd.GetOptions()
            if not fopts.HasExtension(options_pb2.family):
                continue
            fam = fopts.Extensions[options_pb2.family]
            cmds = []
            for md in _messages(fd.message_types_by_name.values()):
                mopts = md.GetOptions()
                if not mopts.HasExtension(options_pb2.command):
                    continue
                c = mopts.Extensions[options_pb2.command]
                cmd = Command(
                    name=c.name,
                    family=fam.name,
                    capability=c.capability,
                    message=md,
                    result=c.result,
                    intermediate=c.intermediate,
                    observable=c.observable,
                    v1_step_field=c.v1_step_field,
                    v1_result_field=c.v1_result_field,
                    v1_intermediate_event=c.v1_intermediate_event,
                )
                cmds.append(cmd)
                commands.setdefault(cmd.name, cmd)
            families.setdefault(
                fam.name, Family(fam.name, fam.description, fam.safe_state, tuple(cmds))
            )
        self.families: Mapping[str, Family] = families
        self.commands: Mapping[str, Command] = commands
        self._by_step_field = {c.v1_step_field: c for c in commands.values() if c.v1_step_field}
        self._by_result_field = {
            c.v1_result_field: c for c in commands.values() if c.v1_result_field
        }
        self._by_event_field = {
            c.v1_intermediate_event: c for c in commands.values() if c.v1_intermediate_event
        }

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def builtin(cls) -> Schema:
        """The families compiled into the SDK when it was built (every `*_pb2` module under
        `ppu_client._generated.families`)."""
        files = []
        for mod in pkgutil.walk_packages(_families.__path__, _families.__name__ + "."):
            if mod.name.endswith("_pb2"):
                files.append(importlib.import_module(mod.name).DESCRIPTOR)
        return cls(files, descriptor_pool.Default())

    @classmethod
    def from_descriptor_set(cls, data: bytes) -> Schema:
        """The compiled families plus those of an encoded `FileDescriptorSet` (the daemon's
        `DeviceSchema.file_descriptor_set`)."""
        fds = descriptor_pb2.FileDescriptorSet.FromString(data)
        default = descriptor_pool.Default()
        by_name = {f.name: f for f in fds.file}
        pool = descriptor_pool.DescriptorPool()
        added: set[str] = set()

        def add(name: str, chain: tuple[str, ...] = ()) -> None:
            if name in added:
                return
            if name in chain:
                raise ValueError(f"schema: import cycle through {name}")
            proto = by_name.get(name)
            if proto is None:  # an import the set leaves out: a well-known or compiled file
                try:
                    proto = _file_proto(default.FindFileByName(name))
                except KeyError:
                    raise ValueError(f"schema: {chain[-1]} imports unknown {name}") from None
            for dep in proto.dependency:
                add(dep, (*chain, name))
            pool.Add(proto)
            added.add(name)

        for name in by_name:
            add(name)
        compiled = {fd.name: fd for fd in cls.builtin()._file_list}
        files = [compiled.get(n) or pool.FindFileByName(n) for n in by_name]
        files += [fd for n, fd in compiled.items() if n not in by_name]
        return cls(files, pool)

    # -- lookup ---------------------------------------------------------------------------------

    def command(self, name: str) -> Command:
        """The command with this step name; `KeyError` listing the known ones otherwise."""
        try:
            return self.commands[name]
        except KeyError:
            known = ", ".join(sorted(self.commands)) or "none"
            raise KeyError(
                f"no device family declares a command {name!r} (known: {known}); a family "
                "added after this SDK was built is learnt with Client.schema()"
            ) from None

    def message_class(self, full_name: str) -> type[Message]:
        """The message class of a full name (`ppu.devices.mfc.v1.GasFlowResult`)."""
        for pool in (descriptor_pool.Default(), self._pool):
            try:
                return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
            except KeyError:
                continue
        raise KeyError(
            f"unknown message type {full_name!r}: not in the SDK's families nor in the daemon's "
            "schema (call Client.schema() to fetch it)"
        )

    def unpack(self, value: any_pb2.Any) -> Message:
        """The message an `Any` carries, as its family's class."""
        name = value.type_url.rsplit("/", 1)[-1]
        return self.message_class(name).FromString(value.value)

    def _retype(self, msg: Message, full_name: str) -> Message:
        """A typed-v1 alias message as its family message (the same bytes)."""
        if not full_name or msg.DESCRIPTOR.full_name == full_name:
            return msg
        return self.message_class(full_name).FromString(msg.SerializeToString())

    # -- steps ----------------------------------------------------------------------------------

    def step(
        self, name: str, *, device_id: str = "", as_any: bool = False, **params: Any
    ) -> pb.Step:
        """A step running the command `name` with `params` as its parameters.

        Parameters are the command message's fields by name; nested messages as dicts (or
        messages), repeated fields as lists, e.g. a furnace program's
        ``segments=[{"ramp": {"temperature_c": 450, "rate_c_per_min": 10}}]``. A command
        with a typed ppu.v1 alias (furnace, dispense, ...) is sent as that alias, which any
        ppud accepts; others, or any command with ``as_any=True``, as `Step.command`.

        Raises `KeyError` for an unknown command and `ValueError` naming the parameter for
        one the command does not have or a value of the wrong type.
        """
        cmd = self.command(name)
        msg = self.build(cmd, params)
        s = pb.Step(device_id=device_id)
        alias = pb.Step.DESCRIPTOR.fields_by_number.get(cmd.v1_step_field)
        if alias is not None and not as_any:
            getattr(s, alias.name).MergeFromString(msg.SerializeToString())
        else:
            s.command.Pack(msg)
        return s

    def build(self, cmd: Command | str, params: Mapping[str, Any]) -> Message:
        """The command message of `cmd` with `params` (see `step`)."""
        if isinstance(cmd, str):
            cmd = self.command(cmd)
        cls = message_factory.GetMessageClass(cmd.message)
        fields = cmd.message.fields_by_name
        for key in params:
            if key not in fields:
                known = ", ".join(f"{n} [{u}]" if u else n for n, u in cmd.parameters())
                raise ValueError(f"{cmd.name}.{key}: no such parameter (parameters: {known})")
        values = {k: _plain(v) for k, v in params.items()}
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            # protobuf's message does not always name the field: find the one refused.
            for k, v in values.items():
                try:
                    cls(**{k: v})
                except (TypeError, ValueError) as fe:
                    f = fields[k]
                    want = (
                        f.message_type.full_name
                        if f.message_type
                        else _TYPE_NAMES.get(f.type, "value")
                    )
                    raise ValueError(
                        f"{cmd.name}.{k}: {v!r} is not a valid {want} ({fe})"
                    ) from None
            raise ValueError(f"{cmd.name}: {e}") from None

    def command_of(self, step: pb.Step) -> tuple[Command, Message] | None:
        """The command a step runs and its parameters as the family message, whichever form
        the step takes (typed alias or `Step.command`); None for a step no family declares
        (a transfer)."""
        kind = step.WhichOneof("kind")
        if kind is None:
            return None
        if kind == "command":
            msg = self.unpack(step.command)
            for c in self.commands.values():
                if c.message.full_name == msg.DESCRIPTOR.full_name:
                    return c, msg
            return None
        cmd = self._by_step_field.get(pb.Step.DESCRIPTOR.fields_by_name[kind].number)
        if cmd is None:
            return None
        return cmd, self._retype(getattr(step, kind), cmd.message.full_name)

    # -- results and intermediate responses -----------------------------------------------------

    def result_of(self, result: pb.StepResult) -> Message | None:
        """A step result's message as its family's result message, whichever form it takes
        (`StepResult.output`, or a typed alias); a result no family declares (a transfer) as
        its ppu.v1 message; None when the step returned nothing (it failed)."""
        kind = result.WhichOneof("result")
        if kind is None:
            return None
        if kind == "output":
            return self.unpack(result.output)
        cmd = self._by_result_field.get(pb.StepResult.DESCRIPTOR.fields_by_name[kind].number)
        msg = getattr(result, kind)
        return self._retype(msg, cmd.result) if cmd is not None else msg

    def intermediate_of(self, event: pb.Event) -> tuple[int, int, Message] | None:
        """An event carrying an intermediate response of a running step, as (step index,
        response index, the family's intermediate message); None for other events.

        Both forms decode: `StepIntermediate` and the typed aliases (`isotherm_point_measured`),
        which share its layout (step index, index, value as fields 1, 2, 3)."""
        kind = event.WhichOneof("kind")
        if kind is None:
            return None
        if kind == "step_intermediate":
            si = event.step_intermediate
            return si.step_index, si.index, self.unpack(si.value)
        cmd = self._by_event_field.get(pb.Event.DESCRIPTOR.fields_by_name[kind].number)
        if cmd is None:
            return None
        alias = getattr(event, kind)
        by_number = alias.DESCRIPTOR.fields_by_number
        if not {1, 2, 3} <= set(by_number):
            return None
        value = getattr(alias, by_number[3].name)
        return (
            getattr(alias, by_number[1].name),
            getattr(alias, by_number[2].name),
            self._retype(value, cmd.intermediate),
        )


def _plain(value: Any) -> Any:
    """A parameter value the message constructor takes: messages become dicts of their set
    fields (so a message of the compiled or the run-time class fits either)."""
    if isinstance(value, Message):
        return {f.name: _plain(v) for f, v in value.ListFields()}
    if isinstance(value, Mapping) or (hasattr(value, "items") and hasattr(value, "keys")):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (str, bytes)):
        return value
    if isinstance(value, Iterable):
        return [_plain(v) for v in value]
    return value


_TYPE_NAMES = {
    FieldDescriptor.TYPE_DOUBLE: "number",
    FieldDescriptor.TYPE_FLOAT: "number",
    FieldDescriptor.TYPE_INT32: "integer",
    FieldDescriptor.TYPE_INT64: "integer",
    FieldDescriptor.TYPE_UINT32: "non-negative integer",
    FieldDescriptor.TYPE_UINT64: "non-negative integer",
    FieldDescriptor.TYPE_SINT32: "integer",
    FieldDescriptor.TYPE_SINT64: "integer",
    FieldDescriptor.TYPE_FIXED32: "non-negative integer",
    FieldDescriptor.TYPE_FIXED64: "non-negative integer",
    FieldDescriptor.TYPE_SFIXED32: "integer",
    FieldDescriptor.TYPE_SFIXED64: "integer",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "string",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_ENUM: "enum value",
}

_lock = threading.Lock()
_current: Schema | None = None


def current() -> Schema:
    """The schema `step()` and the typed result views use: the compiled families, plus the
    daemon's once `Client.schema()` has run."""
    global _current
    with _lock:
        if _current is None:
            _current = Schema.builtin()
        return _current


def use(schema: Schema) -> Schema:
    """Makes `schema` the one `step()` and the result views use; returns it."""
    global _current
    with _lock:
        _current = schema
    return schema


def step(name: str, *, device_id: str = "", as_any: bool = False, **params: Any) -> pb.Step:
    """A step of any family's command by its step name, e.g.
    ``step("gas_flow", device_id="mfc-1", gas="CO2", flow_sccm=50, duration_s=60)``.
    See `Schema.step`."""
    return current().step(name, device_id=device_id, as_any=as_any, **params)
