"""The In direction: a SiLA 2 instrument as a ppu device. `ppud dev` starts the simulated
shaker (`simulator/sila/shaker.py`, served by the third-party `sila2` package) as device
`shaker-1` and drives it with the `sila2` driver; a batch step calling its observable `Shake`
runs, its progress shows in `ppuctl watch`, and a parameter the instrument's FDL forbids is
refused at submission, naming it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

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
    # The human view of the same log: the shaker's progress lines, then the end.
    lines = lab.watch_text_until(lambda line: "SUCCEEDED" in line.upper(), "--experiment", exp_id)
    progress_lines = [x for x in lines if SHAKER in x and "step 1 " in x and "%" in x]
    assert progress_lines, "\n".join(lines)
    shown = lab.ppuctl_json("show", exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    out = json.dumps(shown)
    assert "ShakenFor" in out, out


def test_a_parameter_the_fdl_forbids_is_refused_naming_it(lab: Daemon) -> None:
    done = submit(lab, "sila-shake-too-fast", [shake(5000.0, 60.0)])
    assert done.returncode != 0, done.stdout
    assert "Speed" in done.stderr, done.stderr


def shaker_pid(d: Daemon) -> int:
    """The pid of the shaker process `ppud dev` started (a child of ppud)."""
    assert d.proc is not None
    children: list[int] = []
    for task in Path(f"/proc/{d.proc.pid}/task").iterdir():
        children += [int(p) for p in (task / "children").read_text().split()]
    for pid in children:
        try:
            if b"shaker.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no shaker.py among ppud's children {children}")


@pytest.fixture
def own_lab(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, ("--on-restart", "interrupt"))
    d.start()
    yield d
    d.stop()


def connected(d: Daemon) -> None:
    def check() -> bool:
        devices = d.ppuctl_json("devices")
        devices = devices.get("devices", []) if isinstance(devices, dict) else devices
        return any(
            x.get("id") == SHAKER and x.get("connection") == "CONNECTION_STATE_CONNECTED"
            for x in devices
        )

    wait_until(f"{SHAKER} to connect", check)


def test_an_instrument_outage_raises_an_alarm(own_lab: Daemon) -> None:
    connected(own_lab)
    done = submit(own_lab, "sila-shake-outage", [shake(700.0, 86400.0)])
    assert done.returncode == 0, done.stderr
    exp_id = json.loads(done.stdout)["batch"]["experiment_ids"][0]
    own_lab.watch_until(
        lambda e: e.get("device_id") == SHAKER and "step_progress" in e, "--experiment", exp_id
    )
    # The instrument dies mid-command: the link is lost while it runs a step.
    os.kill(shaker_pid(own_lab), signal.SIGKILL)
    alarm, _ = own_lab.watch_until(
        lambda e: e.get("device_id") == SHAKER and "alarm" in e and not e["alarm"].get("cleared")
    )
    assert alarm["alarm"]["code"] == "link_lost", alarm
    assert SHAKER in own_lab.ppuctl("alarms")
    # It does not come back: the step fails once the outage outlasts the driver's grace.
    ended, _ = own_lab.watch_until(
        lambda e: e.get("experiment_state_changed", {}).get("to")
        in ("EXPERIMENT_STATE_FAILED", "EXPERIMENT_STATE_SUCCEEDED"),
        "--experiment",
        exp_id,
    )
    assert ended["experiment_state_changed"]["to"] == "EXPERIMENT_STATE_FAILED", ended


def test_kill_9_of_ppud_mid_command_is_recovered_by_policy(own_lab: Daemon) -> None:
    connected(own_lab)
    # A day of shaking: about 43 s real at the tests' time scale, still running at the kill.
    done = submit(own_lab, "sila-shake-crash", [shake(800.0, 86400.0)])
    assert done.returncode == 0, done.stderr
    exp_id = json.loads(done.stdout)["batch"]["experiment_ids"][0]
    own_lab.watch_until(
        lambda e: e.get("device_id") == SHAKER and "step_progress" in e, "--experiment", exp_id
    )
    own_lab.restart(signal.SIGKILL)
    # Policy `interrupt`: the step is not run again (a SiLA command is not rerunnable), the
    # experiment is INTERRUPTED and the instrument driven to its safe state.
    event, _ = own_lab.watch_until(
        lambda e: e.get("experiment_state_changed", {}).get("to") == "EXPERIMENT_STATE_INTERRUPTED",
        "--experiment",
        exp_id,
    )
    shown = own_lab.ppuctl_json("show", exp_id)
    assert shown["state"] == "EXPERIMENT_STATE_INTERRUPTED", shown
    connected(own_lab)

    def safe() -> bool:
        devices = own_lab.ppuctl_json("devices")
        devices = devices.get("devices", []) if isinstance(devices, dict) else devices
        return any(x.get("id") == SHAKER and not x.get("unsafe") for x in devices)

    wait_until(f"{SHAKER} to be safe after recovery", safe)
