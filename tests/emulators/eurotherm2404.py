#!/usr/bin/env python3
"""A Eurotherm 2404 temperature controller on Modbus TCP, written from the manuals.

Written from the Eurotherm 2000 series communications handbook (HA026230: chapter 3 Modbus,
chapter 5 parameter tables and status words) as summarised in
/work/shared/reference/devices.md §2, independently of ppu's own simulator (`simulator/`).

What it holds:
- integer region: each parameter n at holding register n, a signed 16-bit scaled integer with
  the configured decimal places (dp, default 1: 123.4 °C is 1234);
- float region: parameter n also at 0x8000 + 2n as an IEEE-754 float, high word first;
- any other address answers Modbus exception 02 (illegal data address), a write to a read-only
  parameter too; an out-of-range value answers exception 03 (illegal data value).

Parameters: 1 PV, 2 target SP, 3 output %, 4 working output (writable in manual), 5 working SP
(read-only, follows the rate limit), 6/8/9 Xp/Ti/Td, 15 SP select, 24/25 SP1/SP2, 26 remote SP,
35 SP rate limit (units/min, 0 = off), 39 error PV − SP, 74 fast status, 75 status word
(bit 13 ramp running), 107 firmware version, 122 instrument ident, 202 input mV,
273 auto (0) / manual (1), 274 acknowledge alarms (write).

The process is a lumped thermal mass with heater power, losses to ambient and a PI loop on the
working setpoint; physical time runs at real time × `time_scale`.

Usage: eurotherm2404.py [--port N] [--unit 1] [--time-scale S]   (needs pymodbus 3.16+)
"""

import argparse
import asyncio
import math
import struct
import threading
import time

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

# Instrument ident of a 2404 PID controller. HA026230 gives the ident's format as >ABCD
# (A = 2: series 2000; B: range, 4 for the 2400s; C: size, 4 for 1/4 DIN; D: 0 for PID).
# "2BCD" in devices.md is that format, not a value. --ident sets another model's.
IDENT_2404 = 0x2440
FLOAT_BASE = 0x8000

# Parameter -> writable. Every parameter of the map also appears in the float region.
PARAMS = {
    1: False, 2: True, 3: True, 4: True, 5: False, 6: True, 8: True, 9: True, 15: True,
    24: True, 25: True, 26: True, 35: True, 39: False, 74: False, 75: False, 107: False,
    122: False, 202: False, 273: True, 274: True,
}

STATUS_RAMP_RUNNING = 1 << 13


class Furnace:
    """The controller and its furnace; every access holds the lock."""

    def __init__(self, time_scale=1.0, ambient_c=25.0, dp=1, ident=IDENT_2404):
        self.lock = threading.Lock()
        self.time_scale = time_scale
        self.dp = dp
        self.ident = ident
        self.ambient_c = ambient_c
        self.pv = ambient_c
        self.pv_max = ambient_c  # the hottest the furnace has been, for checks
        self.sp = [ambient_c, ambient_c]  # SP1, SP2
        self.sp_select = 0
        self.remote_sp = 0.0
        self.working_sp = ambient_c
        self.rate_limit = 0.0  # units/min, 0 = off
        self.manual = False
        self.output = 0.0  # %
        self.manual_output = 0.0
        self.xp, self.ti, self.td = 3.0, 300.0, 0.0  # Xp in % of span, Ti/Td in s (as tuned)
        self.integral = 0.0
        self.alarm_acks = 0
        # Plant: C dT/dt = u·P − (T − T_amb)/R. P·R = 1175 K above ambient at full power.
        self.p_max_w = 2000.0
        self.r_k_per_w = 0.5875
        self.c_j_per_k = 600.0 / self.r_k_per_w  # R·C = 10 min
        self.span_c = 1200.0
        self.last = time.monotonic()

    # --- physics ---------------------------------------------------------------------------

    def advance(self):
        now = time.monotonic()
        dt = (now - self.last) * self.time_scale
        self.last = now
        steps = max(1, math.ceil(dt / 0.25))
        h = dt / steps
        for _ in range(steps):
            self._step(h)

    def _step(self, h):
        target = self.sp[self.sp_select]
        if self.rate_limit > 0:
            delta = self.rate_limit / 60.0 * h
            if abs(target - self.working_sp) <= delta:
                self.working_sp = target
            else:
                self.working_sp += math.copysign(delta, target - self.working_sp)
        else:
            self.working_sp = target
        if self.manual:
            u = self.manual_output / 100.0
        else:
            err = self.working_sp - self.pv
            kp = 100.0 / (self.xp / 100.0 * self.span_c) / 100.0  # fraction of output per K
            ki = kp / self.ti if self.ti > 0 else 0.0
            u_unclamped = kp * err + self.integral + ki * err * h
            if 0.0 < u_unclamped < 1.0:  # anti-windup: integrate only off the limits
                self.integral += ki * err * h
            u = min(1.0, max(0.0, kp * err + self.integral))
        self.output = u * 100.0
        loss = (self.pv - self.ambient_c) / self.r_k_per_w
        self.pv += (u * self.p_max_w - loss) / self.c_j_per_k * h
        self.pv_max = max(self.pv_max, self.pv)

    # --- parameters ------------------------------------------------------------------------

    def status_word(self):
        ramping = self.rate_limit > 0 and abs(self.working_sp - self.sp[self.sp_select]) > 1e-9
        return STATUS_RAMP_RUNNING if ramping else 0

    def read(self, n):
        """Parameter n in engineering units (or a raw word for words and codes)."""
        return {
            1: self.pv, 2: self.sp[self.sp_select], 3: self.output,
            4: self.manual_output if self.manual else self.output, 5: self.working_sp,
            6: self.xp, 8: self.ti, 9: self.td, 15: self.sp_select, 24: self.sp[0],
            25: self.sp[1], 26: self.remote_sp, 35: self.rate_limit,
            39: self.pv - self.working_sp, 74: 0, 75: self.status_word(), 107: 0x0410,
            122: self.ident, 202: (self.pv - self.ambient_c) * 0.041, 273: int(self.manual),
            274: 0,
        }[n]

    def write(self, n, value):
        """Returns an exception code, or None when the value was taken."""
        if n in (2, 24, 25, 26, 35) and not -999.9 <= value <= 9999.9:
            return ExcCodes.ILLEGAL_VALUE
        if n == 2:
            self.sp[self.sp_select] = value
        elif n in (24, 25):
            self.sp[n - 24] = value
        elif n == 26:
            self.remote_sp = value
        elif n == 35:
            if value < 0:
                return ExcCodes.ILLEGAL_VALUE
            self.rate_limit = value
        elif n in (3, 4):
            if not self.manual:
                return ExcCodes.ILLEGAL_VALUE  # output is writable in manual only
            if not 0.0 <= value <= 100.0:
                return ExcCodes.ILLEGAL_VALUE
            self.manual_output = value
        elif n == 15:
            if value not in (0, 1):
                return ExcCodes.ILLEGAL_VALUE
            self.sp_select = int(value)
        elif n == 273:
            if value not in (0, 1):
                return ExcCodes.ILLEGAL_VALUE
            if value == 1 and not self.manual:
                self.manual_output = self.output  # bumpless transfer
            if value == 0 and self.manual:
                self.integral = self.manual_output / 100.0
            self.manual = value == 1
        elif n == 274:
            self.alarm_acks += 1
        elif n in (6, 8, 9):
            if value < 0:
                return ExcCodes.ILLEGAL_VALUE
            setattr(self, {6: "xp", 8: "ti", 9: "td"}[n], value)
        return None

    # Codes, words and counts are plain integers; everything else is scaled by 10^dp.
    UNSCALED = {15, 74, 75, 107, 122, 273, 274}

    def to_word(self, n, value):
        if n in self.UNSCALED:
            return int(value) & 0xFFFF
        raw = int(round(value * 10**self.dp))
        raw = max(-32768, min(32767, raw))
        return raw & 0xFFFF

    def from_word(self, n, word):
        if n in self.UNSCALED:
            return word
        signed = word - 0x10000 if word & 0x8000 else word
        return signed / 10**self.dp


def float_words(value):
    hi, lo = struct.unpack(">HH", struct.pack(">f", float(value)))
    return [hi, lo]


def make_device(furnace, unit):
    """A pymodbus SimDevice whose registers are refreshed from (and written to) `furnace`."""

    async def action(func_code, start, address, count, registers, set_values):
        with furnace.lock:
            furnace.advance()
            if set_values is None:  # read: refresh the requested words
                for a in range(address, address + count):
                    registers[a - start] = word_at(a)
                return None
            return write_words(address, list(set_values))

    def word_at(a):
        if a >= FLOAT_BASE:
            n, half = divmod(a - FLOAT_BASE, 2)
            return float_words(furnace.read(n))[half]
        return furnace.to_word(a, furnace.read(a))

    def write_words(address, values):
        if address >= FLOAT_BASE:
            # A float is written whole: both words of one parameter, at its first word.
            if (address - FLOAT_BASE) % 2 or len(values) % 2:
                return ExcCodes.ILLEGAL_ADDRESS
            for i in range(0, len(values), 2):
                n = (address - FLOAT_BASE) // 2 + i // 2
                if not PARAMS.get(n):
                    return ExcCodes.ILLEGAL_ADDRESS
                value = struct.unpack(">f", struct.pack(">HH", values[i], values[i + 1]))[0]
                if (code := furnace.write(n, value)) is not None:
                    return code
            return None
        for i, word in enumerate(values):
            n = address + i
            if not PARAMS.get(n):
                return ExcCodes.ILLEGAL_ADDRESS
            if (code := furnace.write(n, furnace.from_word(n, word))) is not None:
                return code
        return None

    simdata = []
    for n, writable in PARAMS.items():
        simdata.append(SimData(n, values=0, datatype=DataType.REGISTERS, readonly=not writable))
        simdata.append(SimData(FLOAT_BASE + 2 * n, count=2, values=0,
                               datatype=DataType.REGISTERS, readonly=not writable))
    return SimDevice(unit, simdata=simdata, action=action)


class Server:
    """The Modbus TCP server on its own thread and event loop."""

    def __init__(self, furnace, host="127.0.0.1", port=5020, unit=1):
        self.furnace = furnace
        self.address = (host, port)
        self.device = make_device(furnace, unit)
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="eurotherm2404", daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._serve())

    async def _serve(self):
        # pymodbus binds its transport to the running loop: build the server inside it.
        self.server = ModbusTcpServer(self.device, address=self.address)
        self.loop.call_soon(self.ready.set)
        await self.server.serve_forever()

    def start(self, timeout=10.0):
        self.thread.start()
        if not self.ready.wait(timeout):
            raise RuntimeError("eurotherm2404: server did not start")
        return self

    def stop(self):
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(10)
        self.thread.join(10)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5020)
    ap.add_argument("--unit", type=int, default=1)
    ap.add_argument("--time-scale", type=float, default=1.0)
    ap.add_argument("--ident", type=lambda s: int(s, 0), default=IDENT_2404)
    args = ap.parse_args()
    furnace = Furnace(time_scale=args.time_scale, ident=args.ident)
    server = Server(furnace, args.host, args.port, args.unit).start()
    print(f"eurotherm 2404 on modbus-tcp://{args.host}:{args.port} unit {args.unit}", flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
