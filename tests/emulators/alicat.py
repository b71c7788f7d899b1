#!/usr/bin/env python3
"""An Alicat MC-series mass-flow controller on a pty, serial ASCII, written from Alicat's manuals.

Written from Alicat's documentation only, independently of ppu's own simulator (`simulator/`)
and driver (`drivers/`):
- [MC] MC-Series Mass Flow Controller Operating Manual, "RS-232 / RS-485 Output and Input":
  "Polling Mode" (a unit answers `(unit ID)<CR>` with one data frame; ids A–Z, up to 26 on a
  port; commands are case-insensitive, `a<CR>` is `A<CR>`), "MC-Series Mass Flow Controller
  Data Format" (the example `A +014.70 +025.00 +02.004 +02.004 2.004 Air`: unit id, pressure,
  temperature, volumetric flow, mass flow, setpoint, gas; "additional columns, including
  status codes, may be present to the right of the gas selection column"), "Changing the gas
  selection" (`(unit ID)G(gas number)<CR>`, e.g. `AG7<CR>` helium), "Sending a Setpoint"
  (method 1 `AS4.54<CR>` in device units; method 2 `A<integer><CR>`, 0–64000 linear to 0–100 %
  of full scale; "once a setpoint is accepted, the data frame will be returned with the
  setpoint column changed accordingly"), "Quick Serial Command Guide" (`ahp`/`ahc` hold the
  valve(s) at position / closed, `ac` cancels the hold, `av` tares flow), "Using Gas Select
  and COMPOSER Serially" (`ag8<CR>` nitrogen; the mix examples give 2 CH4, 4 CO2, 5 C2H6,
  7 He, 8 N2, 10 Ne, 11 O2, 12 C3H8).
- [Primer] Alicat Serial Communications Primer (Rev. 2, Feb. 2023): "Command Description
  Format" (the unit id first, a space between command and argument, `<CR>` last; every
  reply is one line ending in `<CR>`), "The Alicat Data Frame", "Status/Error Codes" (ADC,
  EXH, HLD, LCK, MOV, OPL, OVR, POV, TMF, TOV, VOV; the EtherNet/IP manual's status word
  names the same conditions), and `?` for a command the instrument does not understand.
- /work/shared/reference/devices.md §5 (line settings, 19200 8N1 default, status codes).

Behaviour:
- A line is the bytes up to CR (a LF is ignored). Its first character is the unit id; a line
  for another unit is not answered. Commands and the id are case-insensitive.
- `A` → the data frame `A +PPP.PP +TTT.TT +VVV.VV +MMM.MM +SSS.SS GAS [STATUS…]`: PSIA, °C,
  volumetric and mass flow and setpoint in device units with five significant digits (the
  decimals follow the full scale: 500 → `+050.00`, 10 → `+02.004` as in [MC]'s example).
- `AS <v>` / `AS<v>` (method 1) or `A<n>` (method 2, n = 0–64000) → the data frame with the
  new setpoint; a setpoint below 0 or above full scale, or not a number, is answered `A ?`
  (a choice: the manual calls only 0–64000 acceptable for method 2 and says nothing of
  method 1's range). A bare `AS` answers the data frame (the setpoint column shows it).
- `AG<n>` / `AG <n>` → the data frame with the new gas; a number not in the gas table leaves
  the gas unchanged (as Alicat's register 2100 does for "a gas that is not in the instrument").
- `AHC` holds the valve closed (the flow decays to 0), `AHP` at its position (the flow stays),
  `AC` cancels; `HLD` is shown while held. `AV` (tare) answers the data frame.
- Anything else → `A ?`.
- Status words, alphabetical: `HLD` while held, `MOV` (and `VOV`) when the mass (volumetric)
  flow exceeds full scale, `OPL` above the over-pressure limit; others (e.g. `ADC`) can be
  switched on by a test (`Controller.faults`).
- Flow: first order toward the setpoint (time constant `tau_s` of physical time, physical
  time = real time × `time_scale`), optional seeded Gaussian reading noise (a fraction of full
  scale). Volumetric flow = mass flow at line conditions against Alicat's standard conditions
  (25 °C, 14.696 PSIA).
- The manual's example prints the setpoint column without a sign (`2.004`); every number here
  carries one, as the other columns do (the manual's own frame mixes both).

Usage: alicat.py [--baud 19200] [--unit-id A] [--full-scale 500] [--gas CO2]
                 [--time-scale 1] [--tau-s 0.5]   (prints the pty path)
"""

import argparse
import math
import random
import threading
import time

from ptyline import PtyLine

# Gas numbers as printed in [MC] (the gas lists and the COMPOSER examples): 0 Air, 1 Ar, 2 CH4,
# 3 CO, 4 CO2, 5 C2H6, 6 H2, 7 He, 8 N2, 9 N2O, 10 Ne, 11 O2, 12 C3H8.
GASES = {0: "Air", 1: "Ar", 2: "CH4", 3: "CO", 4: "CO2", 5: "C2H6", 6: "H2", 7: "He", 8: "N2",
         9: "N2O", 10: "Ne", 11: "O2", 12: "C3H8"}
STD_PSIA, STD_C = 14.696, 25.0
SETPOINT_COUNTS = 64000  # method 2: 0–64000 is 0–100 % of full scale


def number_field(value, integer_digits, decimals):
    """A signed fixed-width number: `+014.70`, `+050.00`, `+02.004`."""
    width = 1 + integer_digits + (1 + decimals if decimals else 0)
    return f"{value:+0{width}.{decimals}f}"


class Controller:
    """One MC-series controller's state and command interpreter; thread-safe."""

    def __init__(self, unit_id="A", full_scale=500.0, gas="CO2", time_scale=1.0, tau_s=0.5,
                 pressure_psia=14.70, temperature_c=25.0, noise_fs=0.0, seed=1,
                 over_pressure_psia=150.0):
        by_name = {name.upper(): n for n, name in GASES.items()}
        if gas.upper() not in by_name:
            raise ValueError(f"gas {gas!r} is not in the gas table {sorted(GASES.values())}")
        self.lock = threading.Lock()
        self.unit_id = unit_id.upper()
        self.full_scale = float(full_scale)
        self.gas_number = by_name[gas.upper()]
        self.time_scale = time_scale
        self.tau_s = tau_s
        self.pressure_psia = pressure_psia
        self.temperature_c = temperature_c
        self.over_pressure_psia = over_pressure_psia
        self.noise_fs = noise_fs
        self.random = random.Random(seed)
        self.setpoint = 0.0
        self.mass_flow = 0.0
        self.hold = None  # None, "closed" or "position"
        self.faults = set()  # extra status words a test switches on, e.g. {"ADC"}
        self.last = time.monotonic()
        self.commands = []  # every line received, for the checks
        # Five significant digits; at least two before the point ([MC]'s `+02.004`).
        self.integer_digits = max(2, len(str(int(self.full_scale))))
        self.decimals = max(0, 5 - self.integer_digits)

    @property
    def gas(self):
        return GASES[self.gas_number]

    # --- physics ---------------------------------------------------------------------------

    def advance(self, now=None):
        now = time.monotonic() if now is None else now
        dt = (now - self.last) * self.time_scale
        self.last = now
        if self.hold == "position":
            return
        target = 0.0 if self.hold == "closed" else self.setpoint
        self.mass_flow = target + (self.mass_flow - target) * math.exp(-dt / self.tau_s)

    def volumetric(self, mass):
        return (mass * (STD_PSIA / self.pressure_psia)
                * ((self.temperature_c + 273.15) / (STD_C + 273.15)))

    # --- wire ------------------------------------------------------------------------------

    def frame(self):
        mass = self.mass_flow
        if self.noise_fs:
            mass += self.random.gauss(0.0, self.noise_fs * self.full_scale)
        vol = self.volumetric(mass)
        status = set(self.faults)
        if self.hold:
            status.add("HLD")
        if abs(mass) > self.full_scale:
            status.add("MOV")
        if abs(vol) > self.full_scale:
            status.add("VOV")
        if self.pressure_psia > self.over_pressure_psia:
            status.add("OPL")
        flow = lambda v: number_field(v, self.integer_digits, self.decimals)  # noqa: E731
        fields = [self.unit_id, number_field(self.pressure_psia, 3, 2),
                  number_field(self.temperature_c, 3, 2), flow(vol), flow(mass),
                  flow(self.setpoint), self.gas] + sorted(status)
        return " ".join(fields)

    def refuse(self):
        return f"{self.unit_id} ?"

    def handle(self, line):
        """The reply (without CR) to one command line (without CR), or None when the line is
        for another unit (or empty)."""
        text = line.replace("\n", "").strip()
        if not text or text[0].upper() != self.unit_id:
            return None
        with self.lock:
            self.commands.append(text)
            self.advance()
            return self._command(text[1:].strip().upper())

    def _command(self, cmd):
        if cmd == "":
            return self.frame()
        if cmd.isdigit():  # method 2: a fraction of full scale in 1/64000
            counts = int(cmd)
            if counts > SETPOINT_COUNTS:
                return self.refuse()
            return self._set(counts / SETPOINT_COUNTS * self.full_scale)
        if cmd.startswith("S"):
            arg = cmd[1:].strip()
            if not arg:
                return self.frame()
            try:
                value = float(arg)
            except ValueError:
                return self.refuse()
            if not math.isfinite(value) or not 0.0 <= value <= self.full_scale:
                return self.refuse()
            return self._set(value)
        if cmd.startswith("G") and cmd[1:].strip().isdigit():
            number = int(cmd[1:].strip())
            if number in GASES:  # another number leaves the gas unchanged
                self.gas_number = number
            return self.frame()
        if cmd == "HC":
            self.hold = "closed"
            return self.frame()
        if cmd == "HP":
            self.hold = "position"
            return self.frame()
        if cmd == "C":
            self.hold = None
            return self.frame()
        if cmd == "V":
            return self.frame()
        return self.refuse()

    def _set(self, value):
        self.setpoint = value
        return self.frame()


def serve(line, controller):
    """Answers command lines on `line` until it is closed."""
    buf = b""
    while not line.closed.is_set():
        chunk = line.read(0.05)
        if not chunk:
            continue
        buf += chunk
        while b"\r" in buf:
            raw, buf = buf.split(b"\r", 1)
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError:
                text = "\x00"  # a corrupt line: not addressed to anyone
            reply = controller.handle(text)
            if reply is not None:
                line.write(reply.encode("ascii") + b"\r")


def start(controller, baud=19200):
    """Starts `controller` on a new pty; returns (line, thread)."""
    line = PtyLine(baud)
    thread = threading.Thread(target=serve, args=(line, controller), name="alicat",
                              daemon=True)
    thread.start()
    return line, thread


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baud", type=int, default=19200)
    ap.add_argument("--unit-id", default="A")
    ap.add_argument("--full-scale", type=float, default=500.0, help="device units (SCCM)")
    ap.add_argument("--gas", default="CO2")
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--tau-s", type=float, default=0.5, help="flow time constant, physical s")
    ap.add_argument("--noise-fs", type=float, default=0.0, help="reading noise, × full scale")
    args = ap.parse_args()
    controller = Controller(args.unit_id, args.full_scale, args.gas, args.time_scale,
                            args.tau_s, noise_fs=args.noise_fs)
    line, thread = start(controller, args.baud)
    print(line.path, flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        line.close()


if __name__ == "__main__":
    main()
