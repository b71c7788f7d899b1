#!/usr/bin/env python3
"""A New Era NE-1000 syringe pump on a pty, basic RS-232 mode, written from the manual.

Written from the NE-1000 user manual (New Era publication 1200-01, §10.2 "RS-232 protocol":
basic mode syntax, common syntax of responses, command errors and alarms, §10.4 command set)
as summarised in /work/shared/reference/devices.md §1a, independently of ppu's own simulator
(`simulator/`).

The line: 9600 8N1. A command is `[<address 0-99>]<command>[<args>]` ended by CR; the pump
strips spaces and control characters and upper-cases it. It answers only when addressed:
`STX <address, 2 digits> <status> [<data>] ETX`, status I infusing, W withdrawing, S stopped,
P paused. Errors follow the status: `?` unknown command, `?NA` not applicable now, `?OOR` out of
range. Alarms replace the status: `A?R` after power-up, reported once in reply to the next
valid command, which is then not carried out (the manual: an alarm must be acknowledged
before data is changed or the pump started; the alarm reply acknowledges it). An empty command
is a status query; a command without arguments is a query, with arguments a set.

Commands: DIA (syringe inner diameter, mm; it selects the volume units, µL up to 14.0 mm, mL
above), RAT (rate and units UM/MM/UH/MH), VOL (volume to dispense; 0 = no limit), DIR
(INF/WDR/REV), RUN, STP (pauses a running pump; stops a paused one), DIS (`I<vol>W<vol><units>`),
CLD (INF/WDR), VER, ADR (network address), SAF (safe mode). Numbers have at most 4 digits and
a decimal point.

Safe mode (§10.2.3), entered with `SAF n` (n = 1–255 s, 0 leaves it): packets are
`STX <length> <command data> <CRC-16-CCITT, high byte first> ETX`, length counting the bytes
after STX; a bad CRC is answered `?COM`; a packet left incomplete for 0.5 s is discarded; no
valid packet for n real seconds stops the pump with alarm `A?T`, which the pump also sends
unasked (auto-alarm) without clearing it. The manual does not say in which framing the reply to
the mode-switching `SAF` itself comes: here every reply uses the framing of the packet it
answers, and basic-mode lines are not valid packets in safe mode.

Pumping moves liquid at the set rate over real time × `time_scale`; what is infused is added
(× density) to the vessel on the balance's pan when one is given.

Usage: ne1000.py [--baud 9600] [--address 0] [--time-scale 1]   (prints the pty path)
"""

import argparse
import math
import re
import threading
import time

from ptyline import PtyLine

STX, ETX = b"\x02", b"\x03"
VERSION = "NE1000V3.928"
RATE_UNITS = {"UM": 1e-3, "MM": 1.0, "UH": 1e-3 / 60, "MH": 1.0 / 60}  # -> mL/min
# Plunger speed limits: the manual's rate range, 0.73 µL/h (1 mL syringe, 4.78 mm) to
# 1699 mL/h (60 mL syringe, 26.59 mm), as travel per minute.
MIN_SPEED_MM_PER_MIN = (0.73e-3 / 60) / (math.pi * 0.478**2 / 4) * 10
MAX_SPEED_MM_PER_MIN = (1699.0 / 60) / (math.pi * 2.659**2 / 4) * 10
NUMBER = re.compile(r"^(\d{1,4}|\d{0,4}\.\d{0,3})$")


def parse_number(text):
    """A manual-conformant number (≤ 4 digits plus a point), or None."""
    if not NUMBER.match(text) or text == "." or len(text.replace(".", "")) > 4:
        return None
    return float(text)


def format_number(value):
    """≤ 4 significant digits and a decimal point, as the pump prints them."""
    for decimals in (3, 2, 1, 0):
        text = f"{value:.{decimals}f}"
        if len(text.replace(".", "")) <= 4:
            return text
    return f"{value:.0f}"


class Pump:
    def __init__(self, address=0, time_scale=1.0, pan=None, density_g_per_ml=1.0):
        self.lock = threading.Lock()
        self.address = address
        self.time_scale = time_scale
        self.pan = pan
        self.density = density_g_per_ml
        self.diameter_mm = 26.59
        self.rate_value, self.rate_units = 1.0, "MM"
        self.volume_value = 0.0  # in the volume units; 0 = no limit
        self.direction = "INF"
        self.state = "S"  # S stopped, I/W pumping, P paused
        self.phase_ml = 0.0  # pumped in the current run
        self.infused_ml = 0.0
        self.withdrawn_ml = 0.0
        self.alarm = "R"  # power-up
        self.last = time.monotonic()
        # Safe mode (SAF n): CRC-checked packets and a communications time-out of n real
        # seconds between valid packets, armed by the first valid packet.
        self.safe_timeout_s = 0
        self.last_valid = None
        self.auto_alarms = []  # alarm packets the pump sends unasked (safe mode only)

    # --- physics ---------------------------------------------------------------------------

    def volume_units(self):
        return "UL" if self.diameter_mm <= 14.0 else "ML"

    def to_ml(self, value):
        return value / 1000.0 if self.volume_units() == "UL" else value

    def from_ml(self, ml):
        return ml * 1000.0 if self.volume_units() == "UL" else ml

    def rate_ml_per_min(self):
        return self.rate_value * RATE_UNITS[self.rate_units]

    def advance(self):
        now = time.monotonic()
        if (self.safe_timeout_s and self.last_valid is not None
                and now - self.last_valid > self.safe_timeout_s):
            # Communications time-out: the pump stops and alarms; the timer waits for the
            # next valid packet.
            self.last_valid = None
            self.pump_motion(now)
            self.state = "S"
            self.raise_alarm("T")
        self.pump_motion(now)

    def raise_alarm(self, kind):
        self.alarm = kind
        if self.safe_timeout_s:
            self.auto_alarms.append("A?" + kind)  # reported, but not cleared, by this packet

    def pump_motion(self, now):
        dt_min = (now - self.last) * self.time_scale / 60.0
        self.last = now
        if self.state not in ("I", "W"):
            return
        moved = self.rate_ml_per_min() * dt_min
        target = self.to_ml(self.volume_value)
        if target > 0 and self.phase_ml + moved >= target:
            moved = target - self.phase_ml
            self.state = "S"  # the volume is dispensed: the program ends
        self.phase_ml += moved
        if self.direction == "INF":
            self.infused_ml += moved
            if self.pan is not None:
                self.pan.add(moved * self.density)
        else:
            self.withdrawn_ml += moved

    # --- commands --------------------------------------------------------------------------

    def handle(self, text):
        """(status, data-or-error) for one command already stripped of its address."""
        self.advance()
        # Every command is three letters; spaces are already gone ("DIR INF" is "DIRINF").
        cmd, arg = text[:3], text[3:]
        known = {"": None, "DIA": self.dia, "RAT": self.rat, "VOL": self.vol, "DIR": self.dir,
                 "RUN": self.run, "STP": self.stp, "DIS": self.dis, "CLD": self.cld,
                 "VER": self.ver, "ADR": self.adr, "SAF": self.saf}
        if cmd not in known:
            return self.state, "?"
        if self.alarm:  # reported once, instead of carrying out the command
            alarm, self.alarm = self.alarm, None
            return "A?" + alarm, ""
        if cmd == "":
            return self.state, ""
        return self.state_after(known[cmd](arg))

    def state_after(self, data):
        return self.state, data

    def pumping(self):
        return self.state in ("I", "W")

    def dia(self, arg):
        if not arg:
            return format_number(self.diameter_mm)
        if self.state != "S":
            return "?NA"
        value = parse_number(arg)
        if value is None or not 0.1 <= value <= 80.0:
            return "?OOR"
        self.diameter_mm = value
        return ""

    def rat(self, arg):
        if not arg:
            return format_number(self.rate_value) + self.rate_units
        m = re.match(r"^([0-9.]+)(UM|MM|UH|MH)?$", arg)
        if not m:
            return "?"
        value = parse_number(m.group(1))
        units = m.group(2) or self.rate_units
        if value is None:
            return "?OOR"
        area_mm2 = math.pi * self.diameter_mm**2 / 4
        speed = value * RATE_UNITS[units] * 1000.0 / area_mm2  # mm/min
        if not MIN_SPEED_MM_PER_MIN <= speed <= MAX_SPEED_MM_PER_MIN:
            return "?OOR"
        self.rate_value, self.rate_units = value, units
        return ""

    def vol(self, arg):
        if not arg:
            return format_number(self.volume_value) + self.volume_units()
        if arg in ("UL", "ML"):
            return "" if arg == self.volume_units() else "?NA"
        if self.pumping():
            return "?NA"
        value = parse_number(arg)
        if value is None:
            return "?OOR"
        self.volume_value = value
        return ""

    def dir(self, arg):
        if not arg:
            return self.direction
        if arg not in ("INF", "WDR", "REV"):
            return "?OOR"
        if self.pumping():
            return "?NA"
        if arg == "REV":
            arg = "WDR" if self.direction == "INF" else "INF"
        self.direction = arg
        return ""

    def run(self, arg):
        if arg:
            return "?NA"  # program phases are not emulated
        if self.pumping():
            return ""
        if self.state == "S":
            self.phase_ml = 0.0
        self.state = "I" if self.direction == "INF" else "W"
        return ""

    def stp(self, arg):
        if arg:
            return "?"
        if self.pumping():
            self.state = "P"
        elif self.state == "P":
            self.state = "S"
        return ""

    def dis(self, arg):
        if arg:
            return "?"
        return (f"I{format_number(self.from_ml(self.infused_ml))}"
                f"W{format_number(self.from_ml(self.withdrawn_ml))}{self.volume_units()}")

    def cld(self, arg):
        if arg == "INF":
            self.infused_ml = 0.0
        elif arg == "WDR":
            self.withdrawn_ml = 0.0
        else:
            return "?OOR" if arg else "?"
        return ""

    def ver(self, arg):
        return "?" if arg else VERSION

    def saf(self, arg):
        if not arg:
            return f"{self.safe_timeout_s}"
        value = parse_number(arg)
        if value is None or value != int(value) or not 0 <= value <= 255:
            return "?OOR"
        self.safe_timeout_s = int(value)
        self.last_valid = time.monotonic() if value else None
        return ""

    def adr(self, arg):
        if not arg:
            return f"{self.address}"
        value = parse_number(arg)
        if value is None or value != int(value) or not 0 <= value <= 99:
            return "?OOR"
        self.address = int(value)
        return ""


def frame(address, status, data):
    return STX + f"{address:02d}{status}{data}".encode("ascii") + ETX


def crc16_ccitt(data):
    """CRC-16-CCITT: polynomial 0x1021, initial value 0 (the manual: "SAF0" -> 0x5543)."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def safe_frame(payload):
    """STX, length (the bytes after STX: itself, payload, CRC, ETX), payload, CRC, ETX."""
    crc = crc16_ccitt(payload)
    return STX + bytes([len(payload) + 4]) + payload + bytes([crc >> 8, crc & 0xFF]) + ETX


def answer(pump, raw):
    """(address, status, data) for one command's <command data>, or None when not addressed."""
    text = bytes(b for b in raw if 0x20 < b < 0x7F).decode("ascii").upper()
    m = re.match(r"^(\d{1,2})?(.*)$", text)
    address = int(m.group(1)) if m.group(1) else 0
    if address != pump.address:
        return None  # another pump on the network
    status, data = pump.handle(m.group(2))
    return address, status, data


def serve(line, pump):
    """Basic mode: commands end in CR. Safe mode: STX-framed, CRC-checked packets; a packet
    left incomplete for 0.5 s is discarded; a bad CRC is answered with ?COM. A reply uses the
    framing of the packet it answers."""
    buf = b""
    last_byte = time.monotonic()
    while not line.closed.is_set():
        chunk = line.read(0.05)
        now = time.monotonic()
        with pump.lock:
            pump.advance()
            alarms, pump.auto_alarms = pump.auto_alarms, []
            safe = bool(pump.safe_timeout_s)
        for alarm in alarms:
            line.write(safe_frame(f"{pump.address:02d}{alarm}".encode("ascii")))
        if not chunk:
            if buf and safe and now - last_byte > 0.5:
                buf = b""  # the inter-byte time-out
            continue
        last_byte = now
        buf += chunk
        while buf:
            if safe:
                start = buf.find(STX)
                if start < 0:
                    buf = b""
                    break
                buf = buf[start:]
                if len(buf) < 2 or len(buf) < 1 + buf[1]:
                    break
                packet, buf = buf[1:1 + buf[1]], buf[1 + buf[1]:]
                payload, crc, end = packet[1:-3], packet[-3:-1], packet[-1:]
                with pump.lock:
                    if end != ETX or crc16_ccitt(payload) != int.from_bytes(crc, "big"):
                        got = (pump.address, pump.state, "?COM")
                    else:
                        pump.last_valid = time.monotonic()
                        got = answer(pump, payload)
                if got is not None:
                    address, status, data = got
                    line.write(safe_frame(f"{address:02d}{status}{data}".encode("ascii")))
            else:
                if b"\r" not in buf:
                    break
                raw, buf = buf.split(b"\r", 1)
                with pump.lock:
                    got = answer(pump, raw)
                if got is not None:
                    line.write(frame(*got))
            with pump.lock:
                safe = bool(pump.safe_timeout_s)


def start(pump, baud=9600):
    line = PtyLine(baud)
    thread = threading.Thread(target=serve, args=(line, pump), name="ne1000", daemon=True)
    thread.start()
    return line, thread


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baud", type=int, default=9600)
    ap.add_argument("--address", type=int, default=0)
    ap.add_argument("--time-scale", type=float, default=1.0)
    args = ap.parse_args()
    line, thread = start(Pump(args.address, args.time_scale), args.baud)
    print(line.path, flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        line.close()


if __name__ == "__main__":
    main()
