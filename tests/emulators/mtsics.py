#!/usr/bin/env python3
"""A Mettler Toledo balance speaking MT-SICS on a pty, written from the manuals.

Written from the MT-SICS reference manuals (Mettler Toledo "MT-SICS Interface Commands",
chapter 2 "Command formats": response formats with and without a weight value, error
messages; chapter 3: the commands @, I0–I5, S, SI, T, TA, TAC, Z, ZI) as summarised in
/work/shared/reference/devices.md §1b, independently of ppu's own simulator (`simulator/`).

The line: 9600 8N1; commands are upper-case ASCII ended by CR LF, replies end in CR LF.
- `S`  → `S S <weight> g` once stable; `S I` when not stable within the balance's own timeout;
  `S +` overload, `S -` underload.
- `SI` → `S S <weight> g` (stable) or `S D <weight> g` (dynamic). The reply id to SI is `S`.
- `Z`  → `Z A` (zeroed once stable) / `Z I` / `Z +` / `Z -`;  `ZI` → `ZI S` or `ZI D`.
- `T`  → `T S <tare> g` (tared once stable) / `T I` / `T +` / `T -`.
- `TA` → `TA A <tare> g`; `TA <value> g` presets the tare;  `TAC` → `TAC A`.
- `@`  → `I4 A "<serial>"` (reset: tare cleared, pending commands cancelled).
- `I0` → the command list (`I0 B <level> "<cmd>"` lines, the last `I0 A …`); `I1`–`I5`:
  level and versions, balance data, software version, serial number, software id.
- Errors: `ES` syntax error (unknown command, lower case, a line not ended by CR LF),
  `ET` transmission error (a non-ASCII byte), `EL` logical error (bad parameter).

Weight values: a 10-character right-aligned field, 4 decimals (0.1 mg readability), unit g.
The pan's load is shared state: the NE-1000 emulator dispenses into the vessel on it.

Usage: mtsics.py [--baud 9600] [--load-g 12.3456]   (prints the pty path)
"""

import argparse
import random
import threading
import time

from ptyline import PtyLine

CAPACITY_G = 220.0
ZERO_RANGE_G = 0.02 * CAPACITY_G  # ±2 % of capacity around the power-up zero
SERIAL = "1128281963"
COMMANDS = [(0, "I0"), (0, "I1"), (0, "I2"), (0, "I3"), (0, "I4"), (0, "I5"), (0, "S"),
            (0, "SI"), (0, "Z"), (0, "ZI"), (0, "@"), (1, "T"), (1, "TA"), (1, "TAC")]


class Pan:
    """What lies on the weighing pan, in grams; thread-safe."""

    # The reading is dynamic while the load changed faster than this in the last window.
    SETTLE_S = 0.4
    STABLE_BAND_G = 0.0002

    def __init__(self, load_g=0.0):
        self.lock = threading.Lock()
        self.load_g = load_g
        self.history = [(time.monotonic(), load_g)]

    def set_load(self, grams):
        with self.lock:
            self.load_g = grams
            self._note()

    def add(self, grams):
        with self.lock:
            self.load_g += grams
            self._note()

    def _note(self):
        now = time.monotonic()
        self.history.append((now, self.load_g))
        self.history = [(t, m) for t, m in self.history if now - t <= 5 * self.SETTLE_S]

    def reading(self):
        """(gross load, stable) now."""
        with self.lock:
            now = time.monotonic()
            recent = [m for t, m in self.history if now - t <= self.SETTLE_S] + [self.load_g]
            before = [m for t, m in self.history if now - t > self.SETTLE_S]
            if before:
                recent.append(before[-1])
            stable = max(recent) - min(recent) <= self.STABLE_BAND_G
            return self.load_g, stable


def weight_field(grams):
    return f"{grams:>10.4f} g"


class Balance:
    """The balance's command interpreter; `handle` maps one command line to reply lines."""

    def __init__(self, pan, stability_timeout_s=2.0):
        self.pan = pan
        self.stability_timeout_s = stability_timeout_s
        self.zero_g = 0.0  # the power-up zero: whatever was on the pan is the zero point
        self.tare_g = 0.0

    def gross(self):
        load, stable = self.pan.reading()
        noise = 0.0 if stable else random.uniform(-0.002, 0.002)
        return load - self.zero_g + noise, stable

    def net(self):
        gross, stable = self.gross()
        return gross - self.tare_g, stable

    def range_error(self, gross):
        if gross > CAPACITY_G + 0.009:
            return "+"
        if gross < -ZERO_RANGE_G:
            return "-"
        return None

    def wait_stable(self):
        """(gross, stable) as soon as stable, or the last reading at the balance's timeout."""
        deadline = time.monotonic() + self.stability_timeout_s
        while True:
            gross, stable = self.gross()
            if stable or time.monotonic() >= deadline:
                return gross, stable
            time.sleep(0.02)

    def handle(self, line):
        parts = line.split(" ")
        cmd, args = parts[0], [p for p in parts[1:] if p]
        if cmd != cmd.upper() or not cmd:
            return ["ES"]
        handler = getattr(self, "cmd_" + {"@": "reset"}.get(cmd, cmd), None)
        if handler is None:
            return ["ES"]
        return handler(args)

    # --- level 0 ---------------------------------------------------------------------------

    def cmd_reset(self, args):
        self.tare_g = 0.0
        return [f'I4 A "{SERIAL}"']

    def cmd_I0(self, args):
        lines = [f'I0 B {level} "{name}"' for level, name in COMMANDS]
        lines[-1] = "I0 A" + lines[-1][4:]
        return lines

    def cmd_I1(self, args):
        return ['I1 A "01" "2.20" "2.20" "" ""']

    def cmd_I2(self, args):
        return [f'I2 A "XS205DU Excellence {CAPACITY_G:.4f} g"']

    def cmd_I3(self, args):
        return ['I3 A "4.10 1.03"']

    def cmd_I4(self, args):
        return [f'I4 A "{SERIAL}"']

    def cmd_I5(self, args):
        return ['I5 A "11671158C"']

    def cmd_S(self, args):
        if args:
            return ["EL"]
        gross, stable = self.wait_stable()
        if err := self.range_error(gross):
            return [f"S {err}"]
        if not stable:
            return ["S I"]
        return ["S S " + weight_field(gross - self.tare_g)]

    def cmd_SI(self, args):
        if args:
            return ["EL"]
        gross, stable = self.gross()
        if err := self.range_error(gross):
            return [f"S {err}"]
        return [f"S {'S' if stable else 'D'} " + weight_field(gross - self.tare_g)]

    def cmd_Z(self, args):
        if args:
            return ["EL"]
        gross, stable = self.wait_stable()
        if not stable:
            return ["Z I"]
        return self._zero(gross, "Z", "A")

    def cmd_ZI(self, args):
        if args:
            return ["EL"]
        gross, stable = self.gross()
        return self._zero(gross, "ZI", "S" if stable else "D")

    def _zero(self, gross, cmd, status):
        new_zero = self.zero_g + gross
        if new_zero > ZERO_RANGE_G:
            return [f"{cmd} +"]
        if new_zero < -ZERO_RANGE_G:
            return [f"{cmd} -"]
        self.zero_g = new_zero
        self.tare_g = 0.0
        return [f"{cmd} {status}"]

    # --- level 1 ---------------------------------------------------------------------------

    def cmd_T(self, args):
        if args:
            return ["EL"]
        gross, stable = self.wait_stable()
        if not stable:
            return ["T I"]
        if gross > CAPACITY_G:
            return ["T +"]
        if gross < 0:
            return ["T -"]
        self.tare_g = gross
        return ["T S " + weight_field(self.tare_g)]

    def cmd_TA(self, args):
        if not args:
            return ["TA A " + weight_field(self.tare_g)]
        if len(args) != 2 or args[1] != "g":
            return ["EL"]
        try:
            value = float(args[0])
        except ValueError:
            return ["EL"]
        if not 0 <= value <= CAPACITY_G:
            return ["EL"]
        self.tare_g = value
        return ["TA A " + weight_field(self.tare_g)]

    def cmd_TAC(self, args):
        if args:
            return ["EL"]
        self.tare_g = 0.0
        return ["TAC A"]


def serve(line, balance):
    """Answers commands on `line` until it is closed."""
    buf = b""
    while not line.closed.is_set():
        chunk = line.read()
        if not chunk:
            continue
        buf += chunk
        while b"\n" in buf:
            raw, buf = buf.split(b"\n", 1)
            if any(b > 0x7E or (b < 0x20 and b != 0x0D) for b in raw):
                replies = ["ET"]
            elif not raw.endswith(b"\r"):
                replies = ["ES"]  # a command is ended by CR LF, not LF alone
            else:
                replies = balance.handle(raw[:-1].decode("ascii"))
            for reply in replies:
                line.write(reply.encode("ascii") + b"\r\n")


def start(pan, baud=9600, stability_timeout_s=2.0):
    """Starts a balance on a new pty; returns (balance, line, thread)."""
    balance = Balance(pan, stability_timeout_s)
    line = PtyLine(baud)
    thread = threading.Thread(target=serve, args=(line, balance), name="mtsics", daemon=True)
    thread.start()
    return balance, line, thread


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--load-g", type=float, default=0.0, help="load placed after power-up")
    args = ap.parse_args()
    pan = Pan()
    _, line, thread = start(pan, args.baud)
    pan.set_load(args.load_g)
    print(line.path, flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        line.close()


if __name__ == "__main__":
    main()
