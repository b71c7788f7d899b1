"""A serial line on a pseudo-terminal: the instrument's end of an RS-232 cable.

The instrument holds the pty's master; the program under test opens the slave path, as it
would open /dev/ttyUSB0. The line is raw (no echo, no CR/LF translation) and paced at the
configured baud rate (10 bit times per character: 8N1), so replies take as long as on a wire.
"""

import os
import select
import termios
import threading
import time
import tty

BAUD = {1200: termios.B1200, 2400: termios.B2400, 4800: termios.B4800, 9600: termios.B9600,
        19200: termios.B19200, 38400: termios.B38400}


class PtyLine:
    def __init__(self, baud=9600):
        self.baud = baud
        self.master, self.slave = os.openpty()
        # Raw 8N1 on the slave; the master sees exactly the bytes the program writes.
        tty.setraw(self.slave)
        attrs = termios.tcgetattr(self.slave)
        attrs[4] = attrs[5] = BAUD[baud]
        termios.tcsetattr(self.slave, termios.TCSANOW, attrs)
        self.path = os.ttyname(self.slave)
        self.closed = threading.Event()

    def read(self, timeout=0.1):
        """Bytes the program sent, b"" when nothing arrived within `timeout`."""
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return b""
        try:
            return os.read(self.master, 4096)
        except OSError:  # EIO while no program has the slave open
            time.sleep(timeout)
            return b""

    def write(self, data):
        time.sleep(len(data) * 10 / self.baud)  # the reply's time on the wire
        os.write(self.master, data)

    def close(self):
        self.closed.set()
        for fd in (self.master, self.slave):
            try:
                os.close(fd)
            except OSError:
                pass
