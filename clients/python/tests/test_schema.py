"""Schema-driven steps and typed results, with no daemon: the family schemas compiled in at
build time (with their units and command names), a family the SDK was not built with (its
descriptors made here, as the daemon's `GetSchema` would send them), and `Client.schema()`
against a small grpc-python server in the test."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from conftest import REPO
from google.protobuf import any_pb2, descriptor_pb2
from ppu_client import (
    AsyncClient,
    Client,
    Degas,
    Dispense,
    Experiment,
    Field,
    Isotherm,
    Refill,
    Schema,
    TypedIntermediate,
    TypedResult,
    Weigh,
    anneal,
    pb,
    step,
)
from ppu_client import schema as schema_mod
from ppu_client._generated import devices_pb2_grpc
from ppu_client._generated.families.ppu.schema.v1 import options_pb2
from ppu_client.models import ExperimentResult

# A family added after this SDK was built: only the daemon's descriptors know it.
LATE_FILE = "sdk_late_flow/sdk_late_flow.proto"
LATE_PKG = "ppu.devices.sdk_late_flow.v1"


@pytest.fixture(autouse=True)
def restore_schema() -> Iterator[None]:
    """`Client.schema()` and `schema.use` change the process-wide schema: put it back."""
    saved = schema_mod.current()
    yield
    schema_mod.use(saved)


def _field(
    msg: descriptor_pb2.DescriptorProto,
    name: str,
    number: int,
    ftype: int,
    unit: str = "",
    *,
    repeated: bool = False,
    type_name: str = "",
) -> None:
    f = msg.field.add(name=name, number=number, type=ftype, json_name=name)
    f.label = f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL
    if type_name:
        f.type_name = type_name
    if unit:
        f.options.Extensions[options_pb2.field].unit = unit


def late_family() -> descriptor_pb2.FileDescriptorProto:
    """A mass-flow-controller-like family, declared as a family's .proto would declare it."""
    d = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name=LATE_FILE,
        package=LATE_PKG,
        syntax="proto3",
        dependency=["ppu/schema/v1/options.proto"],
    )
    fam = fdp.options.Extensions[options_pb2.family]
    fam.name, fam.description, fam.safe_state = "sdk_late_flow", "Late MFC", "setpoint 0"
    cmd = fdp.message_type.add(name="LateGasFlow")
    c = cmd.options.Extensions[options_pb2.command]
    c.name, c.capability = "late_gas_flow", "late_gas_flow"
    c.result, c.intermediate, c.observable = (
        f"{LATE_PKG}.LateGasFlowResult",
        f"{LATE_PKG}.Sample",
        True,
    )
    _field(cmd, "gas", 1, d.TYPE_STRING)
    _field(cmd, "flow_sccm", 2, d.TYPE_DOUBLE, "sccm")
    _field(cmd, "duration_s", 3, d.TYPE_DOUBLE, "s")
    sample = fdp.message_type.add(name="Sample")
    _field(sample, "t_s", 1, d.TYPE_DOUBLE, "s")
    _field(sample, "mass_flow_sccm", 2, d.TYPE_DOUBLE, "sccm")
    res = fdp.message_type.add(name="LateGasFlowResult")
    _field(res, "gas", 1, d.TYPE_STRING)
    _field(res, "mean_flow_sccm", 2, d.TYPE_DOUBLE, "sccm")
    _field(res, "trace", 3, d.TYPE_MESSAGE, repeated=True, type_name=f".{LATE_PKG}.Sample")
    return fdp


def descriptor_set() -> bytes:
    """What ppud's `GetSchema` sends: every family file (the compiled ones included), the
    options they use and their imports."""
    files = []
    for fd in [
        descriptor_pb2.DESCRIPTOR,
        options_pb2.DESCRIPTOR,
        *schema_mod.Schema.builtin()._file_list,
    ]:
        p = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(p)
        files.append(p)
    # The new family last: the SDK must order files by their imports, not by the set's order.
    files.insert(0, late_family())
    return descriptor_pb2.FileDescriptorSet(file=files).SerializeToString()


# -- families compiled in at build time ----------------------------------------------------------


def test_every_family_schema_in_the_checkout_is_compiled_in() -> None:
    # The build globs drivers/src/**/*.proto: a family's folder is its registration.
    on_disk = {
        p.relative_to(REPO / "drivers" / "src").as_posix()
        for p in (REPO / "drivers" / "src").rglob("*.proto")
    }
    assert on_disk, "no family schema under drivers/src"
    schema = Schema.builtin()
    compiled = {fd.name for fd in schema._file_list}
    assert on_disk <= compiled
    # Each file declares a family with commands, found through the options alone.
    assert len(schema.families) == len(on_disk)
    assert all(f.commands for f in schema.families.values())


def test_command_names_capabilities_and_units_come_from_the_options() -> None:
    s = Schema.builtin()
    assert {"furnace", "dispense", "refill", "weigh", "degas", "isotherm"} <= set(s.commands)
    iso = s.command("isotherm")
    assert (iso.family, iso.capability, iso.observable) == ("analyser", "isotherm", True)
    assert iso.message.full_name == "ppu.devices.analyser.v1.Isotherm"
    assert iso.result == "ppu.devices.analyser.v1.IsothermResult"
    assert iso.intermediate == "ppu.devices.analyser.v1.IsothermPoint"
    params = dict(iso.parameters())
    assert params["pressure_bar"] == "bar"
    assert params["temperature_c"] == "°C"
    assert params["adsorptive"] == ""
    assert dict(s.command("dispense").parameters())["rate_ml_per_min"] == "mL/min"
    refill = s.command("refill")
    assert (refill.family, refill.capability) == ("dispenser", "dispense")


def test_step_by_name_is_byte_identical_to_the_typed_recipes() -> None:
    pairs = [
        (
            step("dispense", reagent="metal", volume_ml=1.5, rate_ml_per_min=2.0),
            Dispense("metal", 1.5, 2.0),
        ),
        (step("refill", device_id="pump-2", reagent="metal"), Refill("metal", device_id="pump-2")),
        (step("weigh", stability_timeout_s=5.0), Weigh(5.0)),
        (step("degas", temperature_c=150.0, duration_s=3600.0), Degas(150.0, 3600.0)),
        (
            step("isotherm", adsorptive="CO2", temperature_c=25.0, pressure_bar=[0.05, 1.0]),
            Isotherm("CO2", 25.0, [0.05, 1.0]),
        ),
        (
            step(
                "furnace",
                device_id="furnace-2",
                segments=[
                    {"ramp": {"temperature_c": 350.0, "rate_c_per_min": 5.0}},
                    {"hold": {"duration_s": 7200.0}},
                    {"step": {"temperature_c": 50.0}},
                ],
            ),
            anneal(350.0, 7200.0, rate_c_per_min=5.0, device_id="furnace-2"),
        ),
    ]
    for built, recipe in pairs:
        want = recipe.to_proto()
        assert built.WhichOneof("kind") == want.WhichOneof("kind")
        assert built.SerializeToString(deterministic=True) == want.SerializeToString(
            deterministic=True
        )


def test_step_as_any_carries_the_family_message_and_decodes_back() -> None:
    s = step(
        "isotherm", as_any=True, adsorptive="N2", temperature_c=-196.0, pressure_bar=[0.1, 0.2]
    )
    assert s.WhichOneof("kind") == "command"
    assert s.command.type_url == "type.googleapis.com/ppu.devices.analyser.v1.Isotherm"
    cmd, msg = schema_mod.current().command_of(s)
    assert cmd.name == "isotherm" and msg.adsorptive == "N2"
    assert list(msg.pressure_bar) == [0.1, 0.2]
    # The typed alias decodes to the same family message.
    alias = Isotherm("N2", -196.0, [0.1, 0.2]).to_proto()
    cmd2, msg2 = schema_mod.current().command_of(alias)
    assert cmd2 is cmd and msg2 == msg
    # A step no family declares (a transfer) has no command.
    assert schema_mod.current().command_of(pb.Step(transfer=pb.Transfer())) is None


def test_bad_parameters_name_the_field() -> None:
    with pytest.raises(KeyError, match="no device family declares a command 'gas_flw'"):
        step("gas_flw", flow_sccm=1.0)
    with pytest.raises(ValueError, match=r"^dispense\.volume: no such parameter") as ei:
        step("dispense", reagent="x", volume=1.0)
    assert "volume_ml [mL]" in str(ei.value)  # the parameters are listed with their units
    with pytest.raises(ValueError, match=r"^degas\.temperature_c: 'hot' is not a valid number"):
        step("degas", temperature_c="hot", duration_s=1.0)


def _experiment(*results: pb.StepResult) -> ExperimentResult:
    return ExperimentResult.from_proto(
        pb.Experiment(id="E1", state=pb.EXPERIMENT_STATE_SUCCEEDED, results=list(results))
    )


def test_typed_alias_results_read_as_family_messages_with_units() -> None:
    furnace = pb.FurnaceResult(
        max_overshoot_c=2.5,
        trace=[pb.FurnaceSample(t_s=10.0, pv_c=120.0, working_sp_c=121.0, output_pct=40.0)],
    )
    dispense = pb.DispenseResult(reagent="metal", requested_volume_ml=1.5, pump_volume_ml=1.5)
    exp = _experiment(
        pb.StepResult(step_index=0, device_id="pump-1", dispense=dispense),
        pb.StepResult(step_index=1, outcome=pb.STEP_OUTCOME_FAILED),  # returned nothing
        pb.StepResult(step_index=2, furnace=furnace),
    )
    # The existing typed accessors are unchanged...
    assert exp.furnace_results() == [furnace]
    assert exp.dispense_results() == [dispense]
    # ...and every result also reads generically, typed by its family's schema.
    d, f = exp.outputs()
    assert (d.step_index, d.device_id, f.step_index) == (0, "pump-1", 2)
    assert f.type_name == "ppu.devices.furnace.v1.FurnaceResult"
    assert f["max_overshoot_c"] == 2.5 and f.unit("max_overshoot_c") == "°C"
    sample = f["trace"][0]
    assert [(x.name, x.value, x.unit) for x in sample.fields()] == [
        ("t_s", 10.0, "s"),
        ("pv_c", 120.0, "°C"),
        ("working_sp_c", 121.0, "°C"),
        ("output_pct", 40.0, "%"),
    ]
    assert f.to_dict()["trace"] == [
        {"t_s": 10.0, "pv_c": 120.0, "working_sp_c": 121.0, "output_pct": 40.0}
    ]
    # proto3 `optional`: unset reads as None, not 0.
    assert d["measured_mass_g"] is None and d.unit("measured_mass_g") == "g"
    assert Field("reagent", "metal", "") in d.fields()
    with pytest.raises(KeyError, match="no field 'mass'"):
        d["mass"]


def test_oneof_fields_list_only_the_member_set() -> None:
    s = step("furnace", segments=[{"hold": {"duration_s": 60.0}}])
    _, msg = schema_mod.current().command_of(s)
    seg = TypedResult(msg, pb.StepResult())["segments"][0]
    assert [x.name for x in seg.fields()] == ["hold"]
    assert seg["hold"].fields() == (Field("duration_s", 60.0, "s"),)


def test_isotherm_point_events_read_as_the_family_intermediate() -> None:
    ev = pb.Event(
        sequence=7,
        isotherm_point_measured=pb.IsothermPointMeasured(
            step_index=3,
            point_index=1,
            point=pb.IsothermPoint(pressure_bar=0.15, amount_mmol_per_g=1.8),
        ),
    )
    p = TypedIntermediate.of(ev)
    assert (p.step_index, p.index) == (3, 1)
    assert p.type_name == "ppu.devices.analyser.v1.IsothermPoint"
    assert (p["amount_mmol_per_g"], p.unit("amount_mmol_per_g")) == (1.8, "mmol/g")
    assert TypedIntermediate.of(pb.Event(sequence=8)) is None


# -- a family the SDK was not built with ---------------------------------------------------------


def test_a_later_family_builds_and_decodes_from_the_daemons_descriptors() -> None:
    with pytest.raises(KeyError):
        step("late_gas_flow", gas="CO2")  # unknown until the daemon's schema is fetched
    s = Schema.from_descriptor_set(descriptor_set())
    assert set(Schema.builtin().commands) < set(s.commands)
    cmd = s.command("late_gas_flow")
    assert (cmd.family, cmd.capability) == ("sdk_late_flow", "late_gas_flow")
    assert cmd.parameters() == (("gas", ""), ("flow_sccm", "sccm"), ("duration_s", "s"))
    # The compiled families keep their generated classes.
    from ppu_client._generated.families.furnace import furnace_pb2

    assert s.message_class("ppu.devices.furnace.v1.FurnaceResult") is furnace_pb2.FurnaceResult

    schema_mod.use(s)
    st = step("late_gas_flow", device_id="mfc-1", gas="CO2", flow_sccm=50, duration_s=60)
    assert st.device_id == "mfc-1" and st.WhichOneof("kind") == "command"
    assert st.command.type_url == f"type.googleapis.com/{LATE_PKG}.LateGasFlow"
    _, params = s.command_of(st)
    assert (params.gas, params.flow_sccm, params.duration_s) == ("CO2", 50.0, 60.0)

    # The daemon's result, as it would send it: the family's result message in an Any.
    result_cls = s.message_class(f"{LATE_PKG}.LateGasFlowResult")
    sample_cls = s.message_class(f"{LATE_PKG}.Sample")
    out = any_pb2.Any()
    out.Pack(
        result_cls(gas="CO2", mean_flow_sccm=49.8, trace=[sample_cls(t_s=1.0, mass_flow_sccm=49.5)])
    )
    exp = _experiment(pb.StepResult(step_index=0, output=out))
    (r,) = exp.outputs()
    assert r.type_name == f"{LATE_PKG}.LateGasFlowResult"
    assert [(x.name, x.unit) for x in r.fields()] == [
        ("gas", ""),
        ("mean_flow_sccm", "sccm"),
        ("trace", ""),
    ]
    assert (r["mean_flow_sccm"], r.unit("mean_flow_sccm")) == (49.8, "sccm")
    assert r["trace"][0].fields() == (Field("t_s", 1.0, "s"), Field("mass_flow_sccm", 49.5, "sccm"))
    assert r.units() == {"mean_flow_sccm": "sccm"}

    # Its intermediate responses, as StepIntermediate events.
    value = any_pb2.Any()
    value.Pack(sample_cls(t_s=2.0, mass_flow_sccm=50.1))
    ev = pb.Event(step_intermediate=pb.StepIntermediate(step_index=0, index=4, value=value))
    p = TypedIntermediate.of(ev)
    assert (p.step_index, p.index, p["mass_flow_sccm"], p.unit("mass_flow_sccm")) == (
        0,
        4,
        50.1,
        "sccm",
    )

    # The new family's steps go into experiments like any other.
    spec = Experiment("flow", [st, anneal(400.0, 60.0)]).to_proto()
    assert [x.WhichOneof("kind") for x in spec.steps] == ["command", "furnace"]


def test_a_result_of_an_unknown_family_says_how_to_learn_it() -> None:
    out = any_pb2.Any(type_url="type.googleapis.com/ppu.devices.nowhere.v1.Result")
    with pytest.raises(KeyError, match=r"Client\.schema\(\)"):
        _experiment(pb.StepResult(output=out)).outputs()


# -- Client.schema() -----------------------------------------------------------------------------


class SchemaOnly(devices_pb2_grpc.DeviceServiceServicer):
    def GetSchema(self, request, context):  # noqa: N802
        return pb.DeviceSchema(file_descriptor_set=descriptor_set())


@pytest.fixture
def schema_server() -> Iterator[str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    devices_pb2_grpc.add_DeviceServiceServicer_to_server(SchemaOnly(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(grace=None).wait(30.0)


def test_client_schema_learns_the_daemons_families(schema_server: str) -> None:
    with Client(schema_server, timeout=30.0) as c:
        s = c.schema()
    assert "late_gas_flow" in s.commands
    assert schema_mod.current() is s  # step() and the result views now know the family
    assert step("late_gas_flow", flow_sccm=10.0).WhichOneof("kind") == "command"


def test_async_client_schema_learns_the_daemons_families(schema_server: str) -> None:
    async def go() -> Schema:
        async with AsyncClient(schema_server, timeout=30.0) as c:
            return await c.schema()

    s = asyncio.run(go())
    assert "late_gas_flow" in s.commands and schema_mod.current() is s


def test_message_parameters_are_taken_as_they_are() -> None:
    from ppu_client._generated.families.furnace import furnace_pb2

    seg = furnace_pb2.FurnaceSegment(ramp=furnace_pb2.Ramp(temperature_c=300.0, rate_c_per_min=2.0))
    s = step("furnace", segments=(seg, {"hold": {"duration_s": 5.0}}))
    assert [x.WhichOneof("kind") for x in s.furnace.segments] == ["ramp", "hold"]
    assert s.furnace.segments[0].ramp.temperature_c == 300.0
