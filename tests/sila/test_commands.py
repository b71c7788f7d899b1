"""Device commands through the generated family features: a furnace program and an isotherm
run as observable commands, their ExecutionInfo is followed to the end, their typed responses
(and the isotherm's intermediate responses) read; the same work is an experiment in ppu's
queue, visible in `ppuctl list/show` and the event log. A bad value is a SiLA
ValidationError naming the parameter."""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import pytest
from conftest import TIMEOUT_S, Daemon, wait_until
from sila2.client import SilaClient
from sila2.framework import ValidationError
from sila_follow import follow, uuid_to_ulid

FURNACE = "ppu/devices/Furnace/v1"
ANALYSER = "ppu/devices/Analyser/v1"


def struct(**fields: Any) -> Any:
    """A SiLA Structure value for the sila2 client: a namedtuple of its elements (a dict is
    taken as the single value of a one-element structure, e.g. `Hold`)."""
    return namedtuple("Structure", list(fields))(**fields)


def ramp(temperature_c: float, rate_c_per_min: float) -> Any:
    return segment("Ramp", struct(TemperatureC=temperature_c, RateCPerMin=rate_c_per_min))


def hold(duration_s: float) -> Any:
    return segment("Hold", struct(DurationS=duration_s))


def step_to(temperature_c: float) -> Any:
    return segment("Step", struct(TemperatureC=temperature_c))


def segment(kind: str, value: Any) -> Any:
    """A `FurnaceSegment`: its oneof is a Structure with one element per variant, each a List
    of at most one item; exactly one holds the chosen variant."""
    return struct(**{k: ([value] if k == kind else []) for k in ("Ramp", "Hold", "Step")})


def parameter_of(error: ValidationError) -> str:
    """The fully qualified parameter identifier a server-side ValidationError names (the sila2
    client resolves it to the feature's Parameter node; None for its own client-side checks)."""
    node = error.parameter_fully_qualified_identifier
    assert node is not None, f"not the server's ValidationError: {error}"
    return str(getattr(node, "fully_qualified_identifier", node))


def experiment_ids(d: Daemon, token: str | None = None) -> list[str]:
    return [e["id"] for e in d.ppuctl_json("list", "--all", token=token).get("experiments", [])]


def experiment_state(d: Daemon, exp_id: str) -> dict[str, Any]:
    return d.ppuctl_json("show", exp_id)


def test_furnace_program_is_an_observable_command_and_an_experiment(
    daemon: Daemon, client: SilaClient
) -> None:
    segments = [ramp(120.0, 20.0), hold(600.0), ramp(60.0, 20.0)]
    run = client.Furnace.FurnaceProgram(Device="", Segments=segments)
    infos = follow(client, "Furnace", "FurnaceProgram", run.execution_uuid, TIMEOUT_S)
    assert infos[-1].status == "finishedSuccessfully", infos
    progress = [i.progress for i in infos if i.progress is not None]
    assert progress, f"no progress in {infos}"
    assert all(0.0 <= p <= 1.0 for p in progress), progress
    assert progress == sorted(progress), f"progress went backwards: {progress}"
    assert progress[-1] == pytest.approx(1.0), progress
    assert any(i.remaining_s is not None for i in infos), infos

    responses = run.get_responses()
    exp_id = responses.ExperimentId
    # The CommandExecutionUUID is the experiment's ULID written as a UUID.
    assert uuid_to_ulid(run.execution_uuid) == exp_id
    # Typed responses: the family's FurnaceResult, field by field.
    assert len(responses.Targets) == 2, responses.Targets
    assert responses.Targets[0].TemperatureC == pytest.approx(120.0)
    assert responses.Trace, "an empty trace"
    assert responses.MaxOvershootC >= 0.0

    # The same work in ppuctl: listed, shown as a succeeded furnace step on a furnace.
    assert exp_id in experiment_ids(daemon)
    shown = experiment_state(daemon, exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    text = daemon.ppuctl("show", exp_id)
    assert "furnace" in text and "120" in text, text

    # And in the durable event log: the experiment's succeeded transition.
    event, seen = daemon.watch_until(
        lambda e: e.get("experiment_id") == exp_id
        and e.get("experiment_state_changed", {}).get("to") == "EXPERIMENT_STATE_SUCCEEDED",
        "--experiment",
        exp_id,
    )
    kinds = {k for e in seen for k in e if k.startswith("step_")}
    assert {"step_started", "step_finished"} <= kinds, kinds


def test_isotherm_streams_its_points_as_intermediate_responses(
    daemon: Daemon, client: SilaClient
) -> None:
    pressures = [0.05, 0.1, 0.5, 1.0]
    # Queued behind a paused queue, so the subscription below is open before the first point
    # (intermediate responses are "from now on", as SiLA has them).
    daemon.ppuctl("queue", "pause", "--reason", "subscribe before the isotherm starts")
    try:
        run, points, infos = _isotherm_with_points(daemon, client, pressures)
    finally:
        daemon.ppuctl("queue", "resume")
    assert infos[-1].status == "finishedSuccessfully", infos
    assert len(points) == len(pressures), points
    for p, target in zip(points, pressures):
        assert p.PressureBar == pytest.approx(target, rel=0.2), p
        assert p.AmountMmolPerG > 0.0, p

    responses = run.get_responses()
    assert responses.Adsorptive == "CO2"
    assert len(responses.Points) == len(pressures)
    assert [p.AmountMmolPerG for p in responses.Points] == pytest.approx(
        [p.AmountMmolPerG for p in points]
    )
    uptake = [p.AmountMmolPerG for p in responses.Points]
    assert uptake == sorted(uptake), f"an adsorption isotherm rises: {uptake}"

    shown = experiment_state(daemon, responses.ExperimentId)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown


def _isotherm_with_points(daemon: Daemon, client: SilaClient, pressures: list[float]) -> Any:
    run = client.Analyser.Isotherm(
        Device="analyser-1",
        Adsorptive="CO2",
        TemperatureC=25.0,
        PressureBar=pressures,
        EquilibrationIntervalS=0.0,
        MaxEquilibrationS=0.0,
        SampleMassG=0.1,
    )
    # Held by the paused queue: its ExecutionInfo says waiting.
    status = wait_until("the isotherm's first ExecutionInfo", lambda: run.status)
    assert status.name == "waiting", status
    points = []
    with run.subscribe_to_intermediate_responses() as sub:
        # The subscription's call is made: let the queue go and follow the run to its end.
        daemon.ppuctl("queue", "resume")
        infos = follow(client, "Analyser", "Isotherm", run.execution_uuid, TIMEOUT_S)
        for point in sub:
            points.append(point)
            if len(points) == len(pressures):
                break
    return run, points, infos


def test_an_unobservable_command_answers_when_its_experiment_has_run(
    daemon: Daemon, client: SilaClient
) -> None:
    # Balance.Weigh is not observable in the schema: one call, answered with the typed
    # responses once the experiment it became has succeeded.
    got = client.Balance.Weigh(Device="balance-1", StabilityTimeoutS=0.0)
    assert got.MassG > 0.0, got
    assert got.Stable is True, got
    shown = experiment_state(daemon, got.ExperimentId)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    assert shown["results"][0]["device_id"] == "balance-1", shown


def test_out_of_range_parameter_is_a_validation_error_naming_it(
    daemon: Daemon, client: SilaClient, no_client_checks: None
) -> None:
    before = experiment_ids(daemon)
    # 5000 °C is above every furnace's max_temperature_c: refused before anything runs.
    with pytest.raises(ValidationError) as err:
        client.Furnace.FurnaceProgram(Device="", Segments=[ramp(5000.0, 20.0)])
    assert parameter_of(err.value) == f"{FURNACE}/Command/FurnaceProgram/Parameter/Segments", (
        err.value
    )
    assert "temperature_c" in err.value.message, err.value.message
    # A static bound (rate > 0) and a check FDL cannot express (increasing pressures) are
    # the server's too.
    with pytest.raises(ValidationError) as err:
        client.Analyser.Isotherm(
            Device="",
            Adsorptive="CO2",
            TemperatureC=25.0,
            PressureBar=[0.5, 0.1],
            EquilibrationIntervalS=0.0,
            MaxEquilibrationS=0.0,
            SampleMassG=0.1,
        )
    assert parameter_of(err.value) == f"{ANALYSER}/Command/Isotherm/Parameter/PressureBar", (
        err.value
    )
    assert "pressure_bar" in err.value.message, err.value.message
    # Nothing was queued.
    assert experiment_ids(daemon) == before


def test_client_side_constraints_come_from_the_schema(client: SilaClient) -> None:
    # The sila2 client checks the FDL constraints itself: a negative ramp rate breaks the
    # schema's static bound (min 0, exclusive) before anything is sent.
    with pytest.raises(ValidationError):
        client.Furnace.FurnaceProgram(Device="", Segments=[ramp(100.0, -5.0)])
