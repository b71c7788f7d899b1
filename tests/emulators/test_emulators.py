#!/usr/bin/env python3
"""The emulators held to the manuals' own examples and rules, before ppud meets them.

Run: python -m unittest discover -s tests/emulators   (needs pymodbus)
"""

import os
import select
import socket
import struct
import time
import unittest

from pymodbus.client import ModbusTcpClient

import alicat
import eurotherm2404
import mtsics
import ne1000


class Unsettled(mtsics.Pan):
    """A pan whose load never settles (a draught on the balance)."""

    def reading(self):
        return self.load_g, False


def exchange(line_path, request, terminator, timeout=3.0):
    """Writes `request` to the instrument's pty and reads up to `terminator`."""
    fd = os.open(line_path, os.O_RDWR | os.O_NOCTTY)
    try:
        os.write(fd, request)
        out = b""
        deadline = time.monotonic() + timeout
        while not out.endswith(terminator) and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                out += os.read(fd, 256)
        return out
    finally:
        os.close(fd)


class MtSicsTest(unittest.TestCase):
    """MT-SICS reference manual, ch. 2 (formats, errors) and ch. 3 (commands)."""

    def balance(self, load_g=12.3456, pan=None):
        pan = pan or mtsics.Pan()
        balance = mtsics.Balance(pan, stability_timeout_s=0.3)
        pan.set_load(load_g)
        time.sleep(pan.SETTLE_S + 0.05)  # the load has settled
        return balance, pan

    def test_s_answers_a_stable_weight_in_a_ten_character_field(self):
        balance, _ = self.balance()
        (reply,) = balance.handle("S")
        self.assertEqual(reply, "S S    12.3456 g")
        self.assertEqual(len(reply[4:-2]), 10)

    def test_si_is_answered_with_reply_id_s_stable_or_dynamic(self):
        balance, pan = self.balance()
        self.assertEqual(balance.handle("SI"), ["S S    12.3456 g"])
        pan.add(0.5)
        (reply,) = balance.handle("SI")
        self.assertTrue(reply.startswith("S D "), reply)
        self.assertFalse(reply.startswith("SI"), reply)

    def test_s_times_out_with_s_i_when_never_stable(self):
        balance, _ = self.balance(pan=Unsettled())
        self.assertEqual(balance.handle("S"), ["S I"])
        self.assertEqual(balance.handle("T"), ["T I"])
        self.assertEqual(balance.handle("Z"), ["Z I"])

    def test_overload_and_underload(self):
        balance, pan = self.balance(load_g=300.0)
        self.assertEqual(balance.handle("S"), ["S +"])
        self.assertEqual(balance.handle("SI"), ["S +"])
        pan.set_load(-10.0)
        time.sleep(pan.SETTLE_S + 0.05)
        self.assertEqual(balance.handle("SI"), ["S -"])

    def test_tare_zero_and_reset(self):
        balance, _ = self.balance()
        self.assertEqual(balance.handle("T"), ["T S    12.3456 g"])
        self.assertEqual(balance.handle("S"), ["S S     0.0000 g"])
        self.assertEqual(balance.handle("TA"), ["TA A    12.3456 g"])
        self.assertEqual(balance.handle("TAC"), ["TAC A"])
        self.assertEqual(balance.handle("TA 1.5 g"), ["TA A     1.5000 g"])
        self.assertEqual(balance.handle("@"), ['I4 A "1128281963"'])
        self.assertEqual(balance.handle("TA"), ["TA A     0.0000 g"])
        self.assertEqual(balance.handle("ZI"), ["ZI +"])  # 12 g is outside the zero range
        small, _ = self.balance(load_g=1.0)
        self.assertEqual(small.handle("Z"), ["Z A"])
        self.assertEqual(small.handle("S"), ["S S     0.0000 g"])

    def test_identification(self):
        balance, _ = self.balance()
        lines = balance.handle("I0")
        self.assertTrue(all(line.startswith("I0 B ") for line in lines[:-1]), lines)
        self.assertTrue(lines[-1].startswith("I0 A "), lines)
        self.assertIn('I0 B 0 "SI"', lines)
        self.assertEqual(balance.handle("I4"), ['I4 A "1128281963"'])

    def test_errors(self):
        balance, _ = self.balance()
        self.assertEqual(balance.handle("XYZ"), ["ES"])
        self.assertEqual(balance.handle("si"), ["ES"])  # commands are upper case only
        self.assertEqual(balance.handle("S 1"), ["EL"])
        self.assertEqual(balance.handle("TA 1.5 kg"), ["EL"])

    def test_line_discipline_on_the_pty(self):
        pan = mtsics.Pan(12.3456)
        _, line, _ = mtsics.start(pan)
        try:
            self.assertEqual(exchange(line.path, b"SI\r\n", b"\r\n"), b"S S    12.3456 g\r\n")
            self.assertEqual(exchange(line.path, b"SI\n", b"\r\n"), b"ES\r\n")
            self.assertEqual(exchange(line.path, b"S\xe9\r\n", b"\r\n"), b"ET\r\n")
        finally:
            line.close()


def frame(text):
    return b"\x02" + text.encode() + b"\x03"


class Ne1000Test(unittest.TestCase):
    """NE-1000 user manual §10.2 (syntax, errors, alarms) and §10.4 (commands)."""

    def pump(self, **kw):
        pump = ne1000.Pump(**kw)
        self.assertEqual(pump.handle("VER"), ("A?R", ""))  # the power-up alarm, once
        return pump

    def test_power_up_alarm_is_reported_once_and_the_command_not_carried_out(self):
        pump = ne1000.Pump()
        self.assertEqual(pump.handle("DIA14.43"), ("A?R", ""))
        self.assertEqual(pump.handle("DIA"), ("S", "26.59"))
        self.assertEqual(pump.handle("VER"), ("S", "NE1000V3.928"))

    def test_queries_sets_and_errors(self):
        pump = self.pump()
        self.assertEqual(pump.handle("DIA14.43"), ("S", ""))
        self.assertEqual(pump.handle("DIA"), ("S", "14.43"))
        self.assertEqual(pump.handle("VOL"), ("S", "0.000ML"))  # mL above 14.0 mm
        self.assertEqual(pump.handle("DIA4.78"), ("S", ""))
        self.assertEqual(pump.handle("VOL"), ("S", "0.000UL"))
        self.assertEqual(pump.handle("DIA81"), ("S", "?OOR"))
        self.assertEqual(pump.handle("DIA12.345"), ("S", "?OOR"))  # five digits
        self.assertEqual(pump.handle("RAT100MM"), ("S", "?OOR"))  # beyond the plunger speed
        self.assertEqual(pump.handle("RAT1.5MM"), ("S", "?OOR"))  # too fast for 4.78 mm
        self.assertEqual(pump.handle("RAT0.5MM"), ("S", ""))
        self.assertEqual(pump.handle("RAT"), ("S", "0.500MM"))
        self.assertEqual(pump.handle("FOO"), ("S", "?"))
        self.assertEqual(pump.handle("DIRREV"), ("S", ""))
        self.assertEqual(pump.handle("DIR"), ("S", "WDR"))
        self.assertEqual(pump.handle(""), ("S", ""))

    def test_dispenses_its_volume_into_the_vessel_then_stops(self):
        pan = mtsics.Pan(10.0)
        pump = self.pump(time_scale=600.0, pan=pan, density_g_per_ml=0.789)
        for cmd in ("DIA14.43", "RAT5MM", "VOL1.5", "DIRINF", "CLDINF"):
            self.assertEqual(pump.handle(cmd), ("S", ""), cmd)
        self.assertEqual(pump.handle("RUN"), ("I", ""))
        self.assertEqual(pump.handle("DIA10"), ("I", "?NA"))  # not while pumping
        deadline = time.monotonic() + 5
        while pump.handle("")[0] != "S" and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertEqual(pump.handle("DIS"), ("S", "I1.500W0.000ML"))
        self.assertAlmostEqual(pan.load_g, 10.0 + 1.5 * 0.789, places=6)

    def test_stop_pauses_then_stops(self):
        pump = self.pump()
        self.assertEqual(pump.handle("RUN"), ("I", ""))
        self.assertEqual(pump.handle("STP"), ("P", ""))
        self.assertEqual(pump.handle("STP"), ("S", ""))

    def test_framing_spaces_case_and_address_on_the_pty(self):
        pump = ne1000.Pump(address=3)
        line, _ = ne1000.start(pump)
        try:
            self.assertEqual(exchange(line.path, b"3ver\r", b"\x03"), frame("03A?R"))
            self.assertEqual(exchange(line.path, b"3 d i a 2 0\r", b"\x03"), frame("03S"))
            self.assertEqual(exchange(line.path, b"03DIA\r", b"\x03"), frame("03S20.00"))
            # Another address: the pump stays silent.
            self.assertEqual(exchange(line.path, b"4VER\r", b"\x03", timeout=0.5), b"")
        finally:
            line.close()


class Ne1000SafeModeTest(unittest.TestCase):
    """NE-1000 user manual §10.2.3 "RS-232 protocol: safe mode"."""

    def test_crc_of_the_manuals_example(self):
        # The manual's packet back to basic mode: (0x2) (0x8) SAF0 (0x55) (0x43) (0x3).
        self.assertEqual(ne1000.safe_frame(b"SAF0"), b"\x02\x08SAF0\x55\x43\x03")

    def test_packets_crc_watchdog_and_auto_alarm(self):
        pump = ne1000.Pump()
        line, _ = ne1000.start(pump)
        safe = ne1000.safe_frame
        try:
            self.assertEqual(exchange(line.path, b"VER\r", b"\x03"), frame("00A?R"))
            self.assertEqual(exchange(line.path, b"SAF2\r", b"\x03"), frame("00S"))
            self.assertEqual(exchange(line.path, safe(b"VER"), b"\x03"),
                             safe(b"00SNE1000V3.928"))
            corrupted = bytearray(safe(b"VER"))
            corrupted[-2] ^= 0xFF
            self.assertEqual(exchange(line.path, bytes(corrupted), b"\x03"), safe(b"00S?COM"))
            # A basic-mode command is not a valid packet in safe mode.
            self.assertEqual(exchange(line.path, b"VER\r", b"\x03", timeout=0.5), b"")
            self.assertEqual(exchange(line.path, safe(b"RUN"), b"\x03"), safe(b"00I"))
            # No valid packet for the 2 s time-out: the pump stops and says so unasked.
            self.assertEqual(exchange(line.path, b"", b"\x03", timeout=4.0), safe(b"00A?T"))
            self.assertEqual(pump.state, "S")
            # The auto-alarm does not clear the alarm: the next command gets it, not carried out.
            back = b"\x02\x08SAF0\x55\x43\x03"
            self.assertEqual(exchange(line.path, back, b"\x03"), safe(b"00A?T"))
            self.assertEqual(exchange(line.path, back, b"\x03"), safe(b"00S"))
            self.assertEqual(exchange(line.path, b"VER\r", b"\x03"), frame("00SNE1000V3.928"))
        finally:
            line.close()


class AlicatTest(unittest.TestCase):
    """Alicat MC-Series operating manual, "RS-232 / RS-485 Output and Input", and the Serial
    Communications Primer (command format, data frame, status codes)."""

    def mfc(self, **kw):
        kw.setdefault("time_scale", 1.0)
        return alicat.Controller(**kw)

    def test_the_manuals_data_frame_example(self):
        # [MC] Data Format: `A +014.70 +025.00 +02.004 +02.004 2.004 Air` (the setpoint column
        # is printed there without its sign; here every column carries one).
        mfc = self.mfc(full_scale=10.0, gas="Air", pressure_psia=14.70)
        mfc.setpoint = mfc.mass_flow = 2.004
        mfc.temperature_c = 25.0
        mfc.last = time.monotonic()
        reply = mfc.handle("A")
        self.assertRegex(reply, r"^A \+014\.70 \+025\.00 \+02\.00\d \+02\.004 \+02\.004 Air$")

    def test_poll_fields_at_power_up(self):
        mfc = self.mfc()
        self.assertEqual(mfc.handle("A"), "A +014.70 +025.00 +000.00 +000.00 +000.00 CO2")
        self.assertEqual(mfc.handle("a"), mfc.handle("A"))  # case-insensitive

    def test_setpoint_methods_and_range(self):
        mfc = self.mfc()
        self.assertTrue(mfc.handle("AS 50.0").endswith(" +050.00 CO2"))
        self.assertTrue(mfc.handle("AS4.54").endswith(" +004.54 CO2"))  # [MC] method 1
        self.assertTrue(mfc.handle("A32000").endswith(" +250.00 CO2"))  # method 2: half scale
        self.assertEqual(mfc.handle("A64001"), "A ?")
        self.assertEqual(mfc.handle("AS 600"), "A ?")  # beyond full scale
        self.assertEqual(mfc.handle("AS -1"), "A ?")
        self.assertEqual(mfc.handle("AS fifty"), "A ?")
        self.assertEqual(mfc.setpoint, 250.0)  # refused setpoints change nothing
        self.assertTrue(mfc.handle("AS 0").endswith(" +000.00 CO2"))  # the safe state

    def test_gas_select(self):
        mfc = self.mfc()
        self.assertTrue(mfc.handle("AG7").endswith(" He"))  # [MC]: AG7 selects helium
        self.assertTrue(mfc.handle("ag8").endswith(" N2"))  # [MC]: ag8 nitrogen
        self.assertTrue(mfc.handle("AG 4").endswith(" CO2"))
        self.assertTrue(mfc.handle("AG200").endswith(" CO2"))  # not in the table: unchanged
        self.assertEqual(mfc.handle("AG"), "A ?")

    def test_unknown_commands_and_other_units(self):
        mfc = self.mfc()
        self.assertEqual(mfc.handle("AX"), "A ?")
        self.assertEqual(mfc.handle("A??Q"), "A ?")
        self.assertIsNone(mfc.handle("B"))  # another unit on the line: silence
        self.assertIsNone(mfc.handle(""))

    def test_first_order_flow_volumetric_flow_and_hold(self):
        mfc = self.mfc(time_scale=100.0, tau_s=0.5)
        mfc.handle("AS 50")
        deadline = time.monotonic() + 5
        while abs(mfc.mass_flow - 50.0) > 0.005 and time.monotonic() < deadline:
            time.sleep(0.02)
            mfc.handle("A")
        fields = mfc.handle("A").split()
        self.assertEqual(fields[4], "+050.00")
        self.assertEqual(fields[3], "+049.99")  # 50 SCCM at 14.70 PSIA, 25 °C
        held = mfc.handle("AHC").split()
        self.assertEqual(held[-1], "HLD")
        while mfc.mass_flow > 0.005 and time.monotonic() < deadline:
            time.sleep(0.02)
            mfc.handle("A")
        self.assertEqual(mfc.handle("A").split()[4], "+000.00")
        self.assertEqual(mfc.handle("AC").split()[-1], "CO2")  # hold cancelled

    def test_status_words(self):
        mfc = self.mfc()
        mfc.faults.add("ADC")
        self.assertTrue(mfc.handle("A").endswith(" CO2 ADC"))
        mfc.faults.clear()
        mfc.pressure_psia = 160.0
        self.assertTrue(mfc.handle("A").endswith(" CO2 OPL"))
        mfc.pressure_psia = 14.70
        mfc.mass_flow = 560.0
        mfc.last = time.monotonic()
        mfc.tau_s = 1e9
        self.assertTrue(mfc.handle("A").endswith(" CO2 MOV VOV"))

    def test_cr_line_ends_on_the_pty(self):
        mfc = self.mfc()
        line, _ = alicat.start(mfc)
        try:
            self.assertEqual(exchange(line.path, b"A\r", b"\r"),
                             b"A +014.70 +025.00 +000.00 +000.00 +000.00 CO2\r")
            self.assertEqual(exchange(line.path, b"AS 50.0\r", b"\r"),
                             b"A +014.70 +025.00 +000.00 +000.00 +050.00 CO2\r")
            self.assertEqual(exchange(line.path, b"AX\r", b"\r"), b"A ?\r")
            self.assertEqual(exchange(line.path, b"B\r", b"\r", timeout=0.5), b"")
        finally:
            line.close()


class EurothermTest(unittest.TestCase):
    """Eurotherm 2000 series communications handbook HA026230, ch. 3 and 5."""

    @classmethod
    def setUpClass(cls):
        cls.furnace = eurotherm2404.Furnace(time_scale=1.0)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cls.server = eurotherm2404.Server(cls.furnace, port=port).start()
        cls.client = ModbusTcpClient("127.0.0.1", port=port)
        deadline = time.monotonic() + 5
        while not cls.client.connect() and time.monotonic() < deadline:
            time.sleep(0.05)

    @classmethod
    def tearDownClass(cls):
        cls.client.close()
        cls.server.stop()

    def read(self, address, count=1):
        return self.client.read_holding_registers(address, count=count, device_id=1)

    def test_scaled_integers_ident_and_float_region(self):
        self.assertEqual(self.client.write_register(2, 1505, device_id=1).isError(), False)
        self.assertEqual(self.read(2).registers, [1505])  # 150.5 °C with one decimal
        self.assertEqual(self.read(24).registers, [1505])  # SP1 is the active setpoint
        hi_lo = self.read(0x8000 + 2 * 2, 2).registers
        self.assertAlmostEqual(struct.unpack(">f", struct.pack(">HH", *hi_lo))[0], 150.5, 4)
        self.assertEqual(self.read(122).registers, [0x2440])
        self.assertEqual(len(self.read(1, 5).registers), 5)
        self.client.write_register(2, 250, device_id=1)

    def test_negative_values_are_twos_complement(self):
        self.client.write_register(26, (-125) & 0xFFFF, device_id=1)
        self.assertEqual(self.read(26).registers, [0xFF83])
        self.assertEqual(self.furnace.remote_sp, -12.5)

    def test_unknown_and_read_only_registers_answer_exception_02(self):
        for address in (0, 7, 121, 300):
            reply = self.read(address)
            self.assertTrue(reply.isError(), address)
            self.assertEqual(reply.exception_code, 2, address)
        reply = self.client.write_register(5, 100, device_id=1)  # working SP is read-only
        self.assertEqual(reply.exception_code, 2)
        reply = self.client.write_register(3, 500, device_id=1)  # output: manual mode only
        self.assertEqual(reply.exception_code, 3)

    def test_working_setpoint_follows_the_rate_limit(self):
        f = eurotherm2404.Furnace()
        f.rate_limit = 10.0  # °C/min
        f.write(2, 100.0)
        for _ in range(240):  # 60 s of physical time
            f._step(0.25)
        self.assertAlmostEqual(f.working_sp, 35.0, places=6)
        self.assertTrue(f.status_word() & eurotherm2404.STATUS_RAMP_RUNNING)
        for _ in range(4 * 60 * 20):
            f._step(0.25)
        self.assertEqual(f.working_sp, 100.0)
        self.assertFalse(f.status_word() & eurotherm2404.STATUS_RAMP_RUNNING)
        self.assertLess(abs(f.pv - 100.0), 2.0)


if __name__ == "__main__":
    unittest.main()
