"""Parts of the client that need no daemon: error decoding, derived keys, recipes, enums and
the isotherm converters."""

from __future__ import annotations

import datetime as dt
import importlib.util
import sys

import grpc
import pytest
from ppu_client import (
    Capability,
    Degas,
    Dispense,
    Experiment,
    InvalidArgumentError,
    Isotherm,
    NotFoundError,
    PpuError,
    State,
    amount_at,
    anneal,
    isotherm_to_aif,
    isotherm_to_pygaps,
    pb,
)
from ppu_client._requests import content_key, submit_request
from ppu_client.errors import error_from_status
from ppu_client.models import ExperimentResult

PATH = "experiments[0].steps[1].furnace.segments[0].ramp.temperature_c"


def test_error_keeps_code_and_field_path_from_metadata_and_message() -> None:
    e = error_from_status(
        grpc.StatusCode.INVALID_ARGUMENT,
        f"{PATH}: 1500 exceeds max_temperature_c 1100",
        (("ppu-field-path", PATH),),
    )
    assert isinstance(e, InvalidArgumentError) and isinstance(e, PpuError)
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT
    assert e.field_path == PATH
    assert e.reason == "1500 exceeds max_temperature_c 1100"
    # Message prefix only (no metadata), as for NOT_FOUND on an id.
    e = error_from_status(grpc.StatusCode.NOT_FOUND, 'id: no experiment "x"')
    assert isinstance(e, NotFoundError) and e.field_path == "id"
    # No field at all.
    e = error_from_status(grpc.StatusCode.INTERNAL, "store failed: disk full")
    assert type(e) is PpuError and e.field_path is None
    assert e.reason == "store failed: disk full"


def test_derived_key_depends_on_content_only() -> None:
    a = [Experiment("x", [anneal(400.0, 3600.0)], labels={"b": "2", "a": "1"})]
    b = [Experiment("x", [anneal(400.0, 3600.0)], labels={"a": "1", "b": "2"})]
    c = [Experiment("x", [anneal(401.0, 3600.0)])]
    ka = submit_request(a, None).idempotency_key
    assert ka == submit_request(b, None).idempotency_key
    assert ka != submit_request(c, None).idempotency_key
    assert len(ka) <= 128
    assert submit_request(a, "mine").idempotency_key == "mine"
    assert content_key([e.to_proto() for e in a]) == ka
    with pytest.raises(InvalidArgumentError) as ei:
        submit_request([], None)
    assert ei.value.field_path == "experiments"


def test_recipes_build_the_documented_messages() -> None:
    spec = Experiment(
        "full",
        [
            Dispense("metal", 1.5, 2.0),
            anneal(350.0, 7200.0, rate_c_per_min=5.0, device_id="furnace-2"),
            Degas(150.0, 3600.0),
            Isotherm("CO2", 25.0, [0.05, 0.15, 1.0]),
        ],
        sample_id="S-1",
        priority=3,
    ).to_proto()
    assert [s.WhichOneof("kind") for s in spec.steps] == [
        "dispense",
        "furnace",
        "degas",
        "isotherm",
    ]
    assert spec.steps[0].dispense.rate_ml_per_min == 2.0
    f = spec.steps[1]
    assert f.device_id == "furnace-2"
    assert [s.WhichOneof("kind") for s in f.furnace.segments] == ["ramp", "hold", "step"]
    assert f.furnace.segments[0].ramp.rate_c_per_min == 5.0
    assert list(spec.steps[3].isotherm.pressure_bar) == [0.05, 0.15, 1.0]
    assert spec.priority == 3 and spec.sample_id == "S-1"


def test_enums_match_the_proto() -> None:
    for s in State:
        assert pb.ExperimentState.Name(s.value) == f"EXPERIMENT_STATE_{s.name}"
    assert len(State) == len(pb.ExperimentState.keys())
    for c in Capability:
        assert pb.Capability.Name(c.value) == f"CAPABILITY_{c.name}"
    assert len(Capability) == len(pb.Capability.keys())


def _isotherm_experiment() -> ExperimentResult:
    iso = pb.IsothermResult(
        adsorptive="CO2",
        temperature_c=25.0,
        sample_mass_g=0.1,
        degas_temperature_c=150.0,
        degas_duration_s=3600.0,
        instrument="sim analyser 'A'",
        points=[
            pb.IsothermPoint(pressure_bar=0.05, amount_mmol_per_g=0.8),
            pb.IsothermPoint(pressure_bar=0.1, amount_mmol_per_g=1.4),
            pb.IsothermPoint(pressure_bar=0.2, amount_mmol_per_g=2.2),
            pb.IsothermPoint(pressure_bar=1.0, amount_mmol_per_g=4.0),
        ],
    )
    step = pb.StepResult(step_index=3, outcome=pb.STEP_OUTCOME_SUCCEEDED, isotherm=iso)
    step.finished_at.FromDatetime(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc))
    exp = pb.Experiment(
        id="E1",
        spec=pb.ExperimentSpec(name="MgAl 450 C", sample_id="S-7"),
        state=pb.EXPERIMENT_STATE_SUCCEEDED,
        results=[step],
    )
    return ExperimentResult.from_proto(exp)


def test_amount_at_interpolates_within_the_measured_range() -> None:
    r = _isotherm_experiment()
    assert amount_at(r, 0.1) == pytest.approx(1.4)
    assert amount_at(r, 0.15) == pytest.approx(1.8)
    assert amount_at(r, 0.025) == pytest.approx(0.4)  # towards the origin
    with pytest.raises(ValueError):
        amount_at(r, 0.025, through_origin=False)
    with pytest.raises(ValueError):
        amount_at(r, 2.0)


def test_isotherm_to_aif() -> None:
    text = isotherm_to_aif(_isotherm_experiment(), operator="planner")
    lines = text.splitlines()
    fields = dict(line.split(None, 1) for line in lines if line.startswith("_") and " " in line)
    assert lines[0] == "data_S-7"
    assert fields["_exptl_adsorptive"] == "'CO2'"
    assert fields["_exptl_temperature"] == "298.15"
    assert fields["_exptl_operator"] == "'planner'"
    assert fields["_exptl_date"].startswith("'2026-01-02T03:04:05")
    assert fields["_adsnt_material_id"] == "'S-7'"
    assert fields["_adsnt_sample_mass"] == "0.1"
    assert fields["_adsnt_degas_temperature"] == "423.15"
    assert fields["_adsnt_degas_time"] == "1.0"
    assert fields["_units_loading"] == "'mmol/g'"
    # A value with a single quote is double-quoted, not broken.
    assert fields["_exptl_instrument"] == "\"sim analyser 'A'\""
    loop = lines[lines.index("loop_") + 1 :]
    assert loop[:3] == ["_adsorp_pressure", "_adsorp_p0", "_adsorp_amount"]
    assert [tuple(map(float, row.split())) for row in loop[3:]] == [
        (0.05, 0.0, 0.8),
        (0.1, 0.0, 1.4),
        (0.2, 0.0, 2.2),
        (1.0, 0.0, 4.0),
    ]


def test_isotherm_to_pygaps_without_pygaps_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "pygaps", None)  # as if it were not installed
    with pytest.raises(ImportError, match="ppu-client\\[pygaps\\]"):
        isotherm_to_pygaps(_isotherm_experiment())


@pytest.mark.skipif(importlib.util.find_spec("pygaps") is None, reason="pyGAPS not installed")
def test_isotherm_to_pygaps() -> None:
    iso = isotherm_to_pygaps(_isotherm_experiment())
    assert iso.adsorbate.name.lower() in ("co2", "carbon dioxide")
    assert iso.material.name == "S-7"
    assert iso.temperature == pytest.approx(298.15)
    assert (iso.pressure_unit, iso.loading_unit, iso.material_unit) == ("bar", "mmol", "g")
    assert list(iso.pressure()) == pytest.approx([0.05, 0.1, 0.2, 1.0])
    assert list(iso.loading()) == pytest.approx([0.8, 1.4, 2.2, 4.0])


@pytest.mark.skipif(
    importlib.util.find_spec("gemmi") is None, reason="gemmi (CIF parser) not installed"
)
def test_aif_parses_as_cif() -> None:
    # gemmi is the CIF reader pyGAPS uses for AIF files.
    from gemmi import cif

    block = cif.read_string(isotherm_to_aif(_isotherm_experiment())).sole_block()
    assert block.name == "S-7"
    assert cif.as_string(block.find_value("_exptl_adsorptive")) == "CO2"
    assert cif.as_string(block.find_value("_exptl_instrument")) == "sim analyser 'A'"
    assert float(block.find_value("_exptl_temperature")) == pytest.approx(298.15)
    assert cif.as_string(block.find_value("_units_loading")) == "mmol/g"
    table = block.find("_adsorp_", ["pressure", "amount"])
    assert [(float(r[0]), float(r[1])) for r in table] == [
        (0.05, 0.8),
        (0.1, 1.4),
        (0.2, 2.2),
        (1.0, 4.0),
    ]


@pytest.mark.skipif(importlib.util.find_spec("pygaps") is None, reason="pyGAPS not installed")
def test_aif_reads_back_in_pygaps(tmp_path) -> None:
    import pygaps.parsing as pgp

    path = tmp_path / "iso.aif"  # pyGAPS takes a long string for a path: give it a file
    path.write_text(isotherm_to_aif(_isotherm_experiment()))
    iso = pgp.isotherm_from_aif(str(path))
    assert iso.adsorbate.name.lower() in ("co2", "carbon dioxide")
    assert str(iso.material) == "S-7"
    assert iso.temperature == pytest.approx(298.15)
    assert (iso.pressure_unit, iso.loading_unit, iso.material_unit) == ("bar", "mmol", "g")
    assert list(iso.pressure()) == pytest.approx([0.05, 0.1, 0.2, 1.0])
    assert list(iso.loading()) == pytest.approx([0.8, 1.4, 2.2, 4.0])
