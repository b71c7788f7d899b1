"""A device family added as a plugin (mass-flow controllers), end to end from Python against a
real `ppud dev`: the SDK builds its step by name from the schema, the daemon refuses an
out-of-range flow naming the field, and the result comes back typed, with field names and
units, although no SDK code names the family."""

from __future__ import annotations

import pytest
from ppu_client import Client, Experiment, InvalidArgumentError, State, step

RESULT_TIMEOUT_S = 120.0


def test_a_gas_flow_runs_and_returns_a_typed_result_with_units(client: Client) -> None:
    # The daemon's schema names the command; the SDK builds the step from it.
    assert client.schema().command("gas_flow").capability == "gas_flow"

    flow = step("gas_flow", gas="CO2", flow_sccm=80.0, duration_s=300.0)
    assert flow.WhichOneof("kind") == "command"
    batch = client.submit_batch([Experiment("py-mfc", [flow], sample_id="S-mfc")])
    (r,) = list(client.results(batch, timeout=RESULT_TIMEOUT_S))
    assert r.state is State.SUCCEEDED, r.message

    (out,) = r.outputs()
    assert out.type_name == "ppu.devices.mfc.v1.GasFlowResult"
    assert out.device_id == "mfc-1"
    assert out["gas"] == "CO2"
    assert out["setpoint_sccm"] == pytest.approx(80.0)
    assert out.unit("settled_flow_sccm") == "sccm"
    assert abs(out["settled_flow_sccm"] - 80.0) < 0.02 * 500.0
    trace = out["trace"]
    assert len(trace) > 10
    assert trace[-1].unit("mass_flow_sccm") == "sccm"
    assert {f.name for f in out.fields()} >= {"gas", "mean_flow_sccm", "trace"}


def test_an_out_of_range_flow_is_refused_naming_the_field(client: Client) -> None:
    with pytest.raises(InvalidArgumentError) as e:
        client.submit_batch(
            [Experiment("py-mfc-over", [step("gas_flow", gas="CO2", flow_sccm=900.0, duration_s=60.0)])]
        )
    assert e.value.field_path == "experiments[0].steps[0].gas_flow.flow_sccm"
    assert "max_flow_sccm 500" in e.value.reason
