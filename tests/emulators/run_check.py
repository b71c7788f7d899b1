#!/usr/bin/env python3
"""ppud's real drivers against emulators written from the manuals, not from ppu's simulator.

Starts, in this process, a Eurotherm 2404 on Modbus TCP (eurotherm2404.py), an MT-SICS
balance on a pty (mtsics.py) and two NE-1000 pumps on ptys (ne1000.py; one in basic mode, one
in safe mode) that dispense into the vessel on that balance, and an Alicat MC mass-flow
controller on a pty (alicat.py). Writes a `ppud serve` config naming them, runs `ppud
check-config` and `ppud serve`, and with `ppuctl`:
1. `ppuctl devices` must show the devices connected and the balance's mass;
2. a furnace program (ramp + hold), then a weigh, then a dispense per pump must all succeed: the furnace
   reached its target (the emulator's PV), the weigh returned the emulator's mass, the dispense
   was weighed within the pump's tolerance; a `gas_flow` step must settle near its setpoint
   on the controller's gas, leave the controller's setpoint at 0 (the driver's safe end), and
   a flow above full scale must be refused naming `gas_flow.flow_sccm`;
3. chaos: the Modbus link is cut mid-hold for longer than the driver's grace (the server stops;
   the emulated 2404 keeps its setpoint and regulates on its own), so the step must fail naming
   the outage, the furnace must show unsafe with `link_lost` and `safe_state_pending` raised;
   when a new server serves the same controller on the same port, ppud must write the safe
   setpoint (the emulator's own register shows 25 °C) and clear both alarms.
Every check runs, and every failure is listed at the end with ppud's log tail; exit status 1
if any failed.

Usage: run_check.py PPUD PPUCTL   (paths of the built binaries)
"""

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

import alicat
import eurotherm2404
import mtsics
import ne1000

TIME_SCALE = 30.0
VESSEL_G = 12.3456
FURNACE_TARGET_C = 80.0
DISPENSE_ML = 2.0
MFC_FULL_SCALE_SCCM = 500.0
MFC_FLOW_SCCM = 50.0
ETHANOL_G_PER_ML = 0.789
# Real seconds each batch may take: the furnace program needs about 12, the dispense about 3.
DEADLINE_S = 40

TERMINAL = {"EXPERIMENT_STATE_SUCCEEDED", "EXPERIMENT_STATE_FAILED",
            "EXPERIMENT_STATE_CANCELLED", "EXPERIMENT_STATE_INTERRUPTED"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(data_dir, modbus_port, balance_path, pump_path, safe_pump_path, mfc_path):
    return f"""\
listen = "127.0.0.1:0"
data_dir = "{data_dir}"
time_scale = {TIME_SCALE}

[auth]
open = true

[poll]
interval_ms = 250

[[devices]]
driver = "eurotherm"
id = "furnace-1"
endpoint = "modbus-tcp://127.0.0.1:{modbus_port}"
unit_id = 1
timeout_ms = 1000
decimal_places = 1
safe_setpoint_c = 25.0
tolerance_c = 2.0
sample_interval_s = 10.0
settle_timeout_s = 1800.0

[devices.limits]
max_temperature_c = 1100.0
max_rate_c_per_min = 20.0

[[devices]]
driver = "mt_sics"
id = "balance-1"
port = "{balance_path}"
baud_rate = 9600
timeout_ms = 1000
stability_timeout_s = 10.0

[[devices]]
driver = "ne1000"
id = "pump-a"
port = "{pump_path}"
baud_rate = 9600
address = 0
timeout_ms = 500
reagent = "water"
density_g_per_ml = 1.0
syringe_inner_diameter_mm = 14.43
syringe_volume_ml = 10.0
fill_ml = 10.0
balance = "balance-1"
tolerance = 0.02
weigh_timeout_s = 10.0

[devices.limits]
max_rate_ml_per_min = 8.0
max_volume_ml = 10.0

# The second pump speaks safe mode: CRC-checked packets and a 5 s communications time-out.
[[devices]]
driver = "ne1000"
id = "pump-b"
port = "{safe_pump_path}"
reagent = "ethanol"
density_g_per_ml = {ETHANOL_G_PER_ML}
syringe_inner_diameter_mm = 14.43
syringe_volume_ml = 10.0
fill_ml = 10.0
balance = "balance-1"
tolerance = 0.02
safe_mode_watchdog_s = 5

[devices.limits]
max_rate_ml_per_min = 8.0
max_volume_ml = 10.0

[[devices]]
driver = "alicat"
id = "mfc-1"
port = "{mfc_path}"
baud_rate = 19200
unit_id = "A"
flow_unit = "SCCM"
full_scale_sccm = {MFC_FULL_SCALE_SCCM}
gases = ["CO2", "N2", "Ar"]
"""


def batch(key, experiments):
    return {"idempotency_key": key, "experiments": experiments}


class Check:
    def __init__(self, ppuctl):
        self.ppuctl = ppuctl
        self.base = None
        self.failures = []

    def fail(self, message):
        print(f"FAIL: {message}", flush=True)
        self.failures.append(message)

    def ok(self, message):
        print(f"ok: {message}", flush=True)

    def ctl(self, *args):
        out = subprocess.run(self.base + ["--json", *args], capture_output=True, text=True,
                             timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"ppuctl {' '.join(args)}: {out.stderr.strip()}")
        return json.loads(out.stdout)

    def devices(self):
        return {d["id"]: d for d in self.ctl("devices")}

    def submit(self, tmp, name, doc):
        path = os.path.join(tmp, name + ".json")
        with open(path, "w") as f:
            json.dump(doc, f)
        return self.ctl("submit", path)["batch"]["experiment_ids"]

    def wait(self, ids, within_s):
        """Each experiment as last shown: once all have ended, or after `within_s`."""
        deadline = time.monotonic() + within_s
        while True:
            shown = {i: self.ctl("show", i) for i in ids}
            if all(s.get("state") in TERMINAL for s in shown.values()):
                return shown
            if time.monotonic() >= deadline:
                for s in shown.values():
                    if s.get("state") not in TERMINAL:
                        s["message"] = (f"still {s.get('state')} after {within_s} s "
                                        f"{s.get('message') or ''}").strip()
                return shown
            time.sleep(0.25)


def step_of(shown, kind):
    """The experiment's step result of `kind`, or None."""
    for r in shown.get("results", []):
        if kind in r:
            return r
    return None


def expect_succeeded(check, what, shown, kind):
    state = shown.get("state")
    result = step_of(shown, kind)
    if state != "EXPERIMENT_STATE_SUCCEEDED" or result is None:
        reason = (result or {}).get("message") or shown.get("message")
        check.fail(f"{what}: experiment {state}: {reason}")
        return None
    check.ok(f"{what} succeeded")
    return result[kind]


class ModbusLink:
    """The emulated controller's Modbus TCP link, which can be cut: the server stops (its
    connections close) and later a new one serves the same Furnace on the same port, as when a
    cable or a gateway comes back. The Furnace runs on regardless."""

    def __init__(self, furnace, port):
        self.furnace = furnace
        self.port = port
        self.server = eurotherm2404.Server(furnace, port=port).start()

    def cut(self):
        self.server.stop()
        self.server = None

    def restore(self):
        self.server = eurotherm2404.Server(self.furnace, port=self.port).start()

    def stop(self):
        if self.server is not None:
            self.server.stop()


def setpoint(furnace):
    with furnace.lock:
        return furnace.sp[furnace.sp_select]


def wait_for(what, condition, within_s):
    """Polls `condition` until it returns a true value (returned) or `within_s` passes (None)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    print(f"timed out after {within_s} s waiting for {what}", flush=True)
    return None


def furnace_alarms(check):
    return {a["code"]: a for a in check.ctl("alarms", "--device", "furnace-1")}


def run_link_cut_mid_hold(check, tmp, furnace, link):
    """Issue 13's acceptance: a link cut mid-hold leaves the furnace unsafe (alarmed) until the
    first reconnect writes and reads back the safe setpoint."""
    target = FURNACE_TARGET_C
    (hold_id,) = check.submit(tmp, "link-cut", batch("emulators-link-cut", [
        {"name": "hold through a link cut", "steps": [{"device_id": "furnace-1", "furnace": {
            "segments": [{"ramp": {"temperature_c": target, "rate_c_per_min": 20.0}},
                         {"hold": {"duration_s": 4 * 3600.0}}]}}]}]))
    # Mid-hold: the driver saw PV at the target (its reading), and the controller holds it.
    holding = wait_for("the furnace holding", lambda: (
        check.ctl("show", hold_id).get("state") == "EXPERIMENT_STATE_RUNNING"
        and setpoint(furnace) == target
        and abs(((check.devices()["furnace-1"].get("latest") or {}).get("values", {})
                 .get("pv_c", 0.0)) - target) <= 1.0), DEADLINE_S)
    if not holding:
        check.fail(f"link cut: the furnace never held {target} °C before the cut")
        return
    link.cut()
    shown = check.wait([hold_id], DEADLINE_S)[hold_id]
    result = step_of(shown, "furnace") or {}
    why = result.get("message") or shown.get("message") or ""
    if (shown.get("state") != "EXPERIMENT_STATE_FAILED" or "unreachable for" not in why
            or "(hold)" not in why):
        check.fail(f"link cut: the step did not fail naming the outage: {shown.get('state')}: "
                   f"{why}")
    else:
        check.ok(f"link cut: the step failed: {why}")
    unsafe = wait_for("furnace-1 unsafe", lambda: check.devices()["furnace-1"].get("unsafe"),
                      DEADLINE_S)
    alarms = furnace_alarms(check)
    active = {c for c, a in alarms.items() if not a.get("cleared")}
    if not unsafe or not {"link_lost", "safe_state_pending"} <= active:
        check.fail(f"link cut: furnace-1 unsafe={unsafe}, active alarms {sorted(active)}")
    else:
        check.ok("link cut: furnace-1 unsafe, link_lost and safe_state_pending raised")
    if setpoint(furnace) != target:
        check.fail(f"link cut: the emulated controller lost its setpoint ({setpoint(furnace)})")
    else:
        check.ok(f"link cut: the controller keeps heating at {target} °C meanwhile")

    link.restore()
    safe = wait_for("furnace-1 confirmed safe", lambda: (
        not check.devices()["furnace-1"].get("unsafe") and setpoint(furnace) <= 25.0 + 1e-6),
        DEADLINE_S)
    alarms = furnace_alarms(check)
    still = sorted(c for c, a in alarms.items()
                   if c in ("link_lost", "safe_state_pending") and not a.get("cleared"))
    if not safe:
        check.fail(f"link restored: furnace-1 not confirmed safe; the controller's setpoint is "
                   f"{setpoint(furnace)} °C")
    elif still:
        check.fail(f"link restored: alarms still active: {still}")
    else:
        check.ok(f"link restored: the controller's setpoint is {setpoint(furnace)} °C, "
                 "furnace-1 safe, both alarms cleared")


def run_checks(check, tmp, furnace, pan, link, mfc):
    # 1. The balance is connected and shows the vessel's mass.
    deadline = time.monotonic() + 20
    devices = {}
    while time.monotonic() < deadline:
        devices = check.devices()
        values = (devices.get("balance-1", {}).get("latest") or {}).get("values", {})
        if (all(d.get("connection") == "CONNECTION_STATE_CONNECTED" for d in devices.values())
                and values.get("mass_g") is not None and values.get("stable") == 1.0):
            break
        time.sleep(0.25)
    for dev_id in ("furnace-1", "balance-1", "pump-a", "pump-b", "mfc-1"):
        d = devices.get(dev_id)
        if d is None:
            check.fail(f"ppuctl devices does not list {dev_id}")
        elif d.get("connection") != "CONNECTION_STATE_CONNECTED":
            check.fail(f"{dev_id} is {d.get('connection')}: {d.get('connection_error')}")
        else:
            check.ok(f"{dev_id} connected")
    mass = ((devices.get("balance-1") or {}).get("latest") or {}).get("values", {}).get("mass_g")
    if mass is None:
        check.fail("balance-1 shows no mass")
    elif abs(mass - VESSEL_G) > 0.001:
        check.fail(f"balance-1 shows {mass} g, the balance holds {VESSEL_G} g")
    else:
        check.ok(f"balance-1 shows {mass} g")

    # 2. A furnace program and a weighing, then a weighed dispense.
    furnace_id, weigh_id = check.submit(tmp, "furnace-weigh", batch("emulators-1", [
        {"name": "furnace ramp + hold", "steps": [{"device_id": "furnace-1", "furnace": {
            "segments": [{"ramp": {"temperature_c": FURNACE_TARGET_C, "rate_c_per_min": 20.0}},
                         {"hold": {"duration_s": 120.0}}]}}]},
        {"name": "weigh the vessel", "steps": [{"device_id": "balance-1", "weigh": {}}]},
    ]))
    shown = check.wait([furnace_id, weigh_id], DEADLINE_S)
    fr = expect_succeeded(check, "furnace program", shown[furnace_id], "furnace")
    if fr is not None:
        near = [s for s in fr.get("trace", []) if abs(s["pv_c"] - FURNACE_TARGET_C) <= 2.0]
        if not near:
            check.fail(f"furnace trace never within 2 °C of {FURNACE_TARGET_C} °C: {fr}")
        elif furnace.pv_max < FURNACE_TARGET_C - 2.0:
            check.fail(f"the controller's PV peaked at {furnace.pv_max:.1f} °C")
        else:
            check.ok(f"furnace reached {FURNACE_TARGET_C} °C (controller PV peak "
                     f"{furnace.pv_max:.1f} °C)")
        with furnace.lock:
            sp = furnace.sp[furnace.sp_select]
        if sp > 25.0 + 1e-6:
            check.fail(f"after the program the controller's setpoint is {sp} °C, not safe")
        else:
            check.ok(f"after the program the controller's setpoint is {sp} °C (safe)")
    wr = expect_succeeded(check, "weigh", shown[weigh_id], "weigh")
    if wr is not None:
        if abs(wr["mass_g"] - VESSEL_G) > 0.001 or not wr["stable"]:
            check.fail(f"weigh returned {wr}, the balance holds {VESSEL_G} g")
        else:
            check.ok(f"weigh returned {wr['mass_g']} g")

    # One weighed dispense per pump, one after the other (they share the balance).
    for reagent, density, mode in (("water", 1.0, "basic mode"),
                                   ("ethanol", ETHANOL_G_PER_ML, "safe mode")):
        what = f"dispense of {reagent} ({mode})"
        (dispense_id,) = check.submit(tmp, "dispense-" + reagent, batch(
            "emulators-" + reagent, [{"name": "dispense " + reagent, "steps": [{"dispense": {
                "reagent": reagent, "volume_ml": DISPENSE_ML, "rate_ml_per_min": 5.0}}]}]))
        before = pan.load_g
        shown = check.wait([dispense_id], DEADLINE_S)
        dr = expect_succeeded(check, what, shown[dispense_id], "dispense")
        delivered = pan.load_g - before
        if abs(delivered - DISPENSE_ML * density) > 0.02 * DISPENSE_ML * density:
            check.fail(f"{what}: {delivered:.4f} g landed in the vessel, not "
                       f"{DISPENSE_ML * density:.4f} g")
        if dr is not None:
            dev = dr.get("relative_deviation")
            if dr.get("measured_mass_g") is None or dev is None or abs(dev) > 0.02:
                check.fail(f"{what}: not weighed within 2 %: {dr}")
            else:
                check.ok(f"{what}: weighed {dr['measured_mass_g']} g for {DISPENSE_ML} mL "
                         f"(deviation {dev:+.4f})")

    run_gas_flow(check, tmp, mfc)

    # 3. Chaos: the link cut mid-hold.
    run_link_cut_mid_hold(check, tmp, furnace, link)


def setpoint_sent(command):
    """The setpoint of an `AS <value>` command line, or None."""
    if not command.upper().startswith("AS"):
        return None
    try:
        return float(command[2:])
    except ValueError:
        return None


def run_gas_flow(check, tmp, mfc):
    """A gas flow on the Alicat emulator: settled near the setpoint on the right gas, the
    controller left at setpoint 0; a flow above full scale refused before the wire."""
    (flow_id,) = check.submit(tmp, "gas-flow", batch("emulators-gas-flow", [
        {"name": "CO2 flow", "steps": [{"device_id": "mfc-1", "gas_flow": {
            "gas": "CO2", "flow_sccm": MFC_FLOW_SCCM, "duration_s": 60.0}}]}]))
    shown = check.wait([flow_id], DEADLINE_S)[flow_id]
    gr = expect_succeeded(check, "gas flow", shown, "gas_flow")
    if gr is not None:
        settled = gr.get("settled_flow_sccm")
        if settled is None or abs(settled - MFC_FLOW_SCCM) > 0.02 * MFC_FULL_SCALE_SCCM:
            check.fail(f"gas flow: settled flow {settled} sccm, not near {MFC_FLOW_SCCM}: {gr}")
        else:
            check.ok(f"gas flow: settled at {settled} sccm for {MFC_FLOW_SCCM} sccm")
    with mfc.lock:
        gas, setpoint = mfc.gas, mfc.setpoint
        sent = list(mfc.commands)
    if MFC_FLOW_SCCM not in [setpoint_sent(c) for c in sent]:
        check.fail(f"gas flow: the controller never received setpoint {MFC_FLOW_SCCM}: {sent}")
    if gas != "CO2":
        check.fail(f"gas flow: the controller flows {gas}, not CO2")
    if setpoint != 0.0:
        check.fail(f"gas flow: after the step the controller's setpoint is {setpoint}, not 0")
    else:
        writes = sorted({c for c in sent if c.upper() != "A"})
        check.ok(f"gas flow: after the step the controller's setpoint is 0 (safe), gas CO2; "
                 f"ppud sent {writes} besides polls")
    try:
        check.submit(tmp, "gas-flow-too-much", batch("emulators-gas-flow-too-much", [
            {"name": "too much", "steps": [{"device_id": "mfc-1", "gas_flow": {
                "gas": "CO2", "flow_sccm": 2 * MFC_FULL_SCALE_SCCM, "duration_s": 10.0}}]}]))
        check.fail("gas flow: a flow of twice full scale was accepted")
    except RuntimeError as e:
        if "gas_flow.flow_sccm" in str(e):
            check.ok(f"gas flow above full scale refused: {str(e).splitlines()[-1]}")
        else:
            check.fail(f"gas flow above full scale refused without naming the field: {e}")


def main():
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    ppud, ppuctl = sys.argv[1], sys.argv[2]
    furnace = eurotherm2404.Furnace(time_scale=TIME_SCALE)
    modbus_port = free_port()
    link = ModbusLink(furnace, modbus_port)
    pan = mtsics.Pan()
    _, balance_line, _ = mtsics.start(pan)
    pan.set_load(VESSEL_G)  # the vessel is put on the balance after its power-up zero
    pump = ne1000.Pump(time_scale=TIME_SCALE, pan=pan, density_g_per_ml=1.0)
    pump_line, _ = ne1000.start(pump)
    safe_pump = ne1000.Pump(time_scale=TIME_SCALE, pan=pan, density_g_per_ml=ETHANOL_G_PER_ML)
    safe_pump_line, _ = ne1000.start(safe_pump)
    # The furnace runs on its own, polled or not (its PV peak is checked).
    stop = threading.Event()

    mfc = alicat.Controller(full_scale=MFC_FULL_SCALE_SCCM, gas="N2", time_scale=TIME_SCALE,
                            tau_s=0.5, noise_fs=0.0005)
    mfc_line, _ = alicat.start(mfc)

    def run_furnace():
        while not stop.wait(0.05):
            with furnace.lock:
                furnace.advance()

    threading.Thread(target=run_furnace, daemon=True).start()

    check = Check(ppuctl)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "ppud.toml")
        with open(cfg, "w") as f:
            f.write(config_text(os.path.join(tmp, "data"), modbus_port, balance_line.path,
                                pump_line.path, safe_pump_line.path, mfc_line.path))
        out = subprocess.run([ppud, "check-config", cfg], capture_output=True, text=True)
        if out.returncode != 0:
            print(out.stdout + out.stderr, file=sys.stderr)
            print("FAIL: ppud check-config refused the config", file=sys.stderr)
            return 1
        log_path = os.path.join(tmp, "ppud.log")
        with open(log_path, "w") as log:
            daemon = subprocess.Popen([ppud, "serve", "--config", cfg], stdout=subprocess.PIPE,
                                      stderr=log, text=True)
        try:
            addr = None
            for line in daemon.stdout:  # ends when ppud exits
                if line.startswith("listening on "):
                    addr = "http://" + line.split()[-1]
                    break
            if addr is None:
                check.fail("ppud serve exited before it listened")
            else:
                threading.Thread(target=daemon.stdout.read, daemon=True).start()
                check.base = [ppuctl, "--addr", addr]
                try:
                    run_checks(check, tmp, furnace, pan, link, mfc)
                except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as e:
                    check.fail(f"check aborted: {e}")
        finally:
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
            stop.set()
            if check.failures:
                with open(log_path) as f:
                    tail = f.readlines()[-40:]
                print("--- ppud log (last 40 lines) ---", file=sys.stderr)
                sys.stderr.writelines(tail)
    link.stop()
    balance_line.close()
    pump_line.close()
    safe_pump_line.close()
    mfc_line.close()
    if check.failures:
        print(f"{len(check.failures)} check(s) failed against the manual-based emulators:",
              file=sys.stderr)
        for f in check.failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("ppud passed every check against the manual-based emulators")
    return 0


if __name__ == "__main__":
    sys.exit(main())
