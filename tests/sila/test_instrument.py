"""The In direction: a SiLA 2 instrument as a ppu device. `ppud dev` starts the simulated
shaker (`simulator/sila/shaker.py`, served by the third-party `sila2` package) as device
`shaker-1` and drives it with the `sila2` driver; a batch step calling its observable `Shake`
runs, its progress shows in `ppuctl watch`, and a parameter the instrument's FDL forbids is
refused at submission, naming it."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import TIMEOUT_S, Daemon, binary, wait_until

SHAKER = "shaker-1"


def shake(speed: float, duration_s: float) -> dict:
    return {
        "device_id": SHAKER,
        "sila_call": {
            "feature": "ShakerController",
            "command": "Shake",
            "parameters": json.dumps({"Speed": speed, "Duration": duration_s}),
        },
    }


def submit(d: Daemon, name: str, steps: list[dict]) -> subprocess.CompletedProcess[str]:
    batch = {"experiments": [{"name": name, "sample_id": f"S-{name}", "steps": steps}]}
    return subprocess.run(
        [str(binary("PPUCTL_BIN", "ppuctl")), "--addr", f"http://{d.addr}", "--json", "submit", "-"],
        input=json.dumps(batch),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def lab(daemon: Daemon) -> Daemon:
    def connected() -> bool:
        listed = daemon.ppuctl_json("devices")
        devices = listed.get("devices", []) if isinstance(listed, dict) else listed
        shaker = next((x for x in devices if x.get("id") == SHAKER), None)
        if shaker is None:
            pytest.fail(
                f"ppud dev has no {SHAKER}: is PPU_SILA_PYTHON a Python with sila2? "
                f"devices: {[x.get('id') for x in devices]}; log:\n{daemon.log_tail()}",
                pytrace=False,
            )
        return shaker.get("connection") == "CONNECTION_STATE_CONNECTED"

    wait_until(f"{SHAKER} to connect", connected)
    return daemon


def test_a_shake_step_runs_with_progress_in_ppuctl_watch(lab: Daemon) -> None:
    done = submit(lab, "sila-shake", [shake(600.0, 7200.0)])
    assert done.returncode == 0, done.stderr
    exp_id = json.loads(done.stdout)["batch"]["experiment_ids"][0]
    event, seen = lab.watch_until(
        lambda e: e.get("experiment_state_changed", {}).get("to")
        in ("EXPERIMENT_STATE_SUCCEEDED", "EXPERIMENT_STATE_FAILED"),
        "--experiment",
        exp_id,
    )
    assert event["experiment_state_changed"]["to"] == "EXPERIMENT_STATE_SUCCEEDED", (
        event,
        lab.ppuctl("show", exp_id),
    )
    progress = [
        e["step_progress"] for e in seen if "step_progress" in e and e.get("device_id") == SHAKER
    ]
    fractions = [p.get("fraction", 0.0) for p in progress]
    assert len(fractions) >= 2, f"no progress from the instrument: {progress}"
    assert fractions == sorted(fractions), fractions
    assert 0.0 < fractions[-1] <= 1.0, fractions
    shown = lab.ppuctl_json("show", exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    out = json.dumps(shown)
    assert "ShakenFor" in out, out


def test_a_parameter_the_fdl_forbids_is_refused_naming_it(lab: Daemon) -> None:
    done = submit(lab, "sila-shake-too-fast", [shake(5000.0, 60.0)])
    assert done.returncode != 0, done.stdout
    assert "Speed" in done.stderr, done.stderr
