"""A simulated orbital shaker served as a SiLA 2 server by the third-party `sila2` package.

The instrument for ppu's `sila2` driver family in the dev lab and the tests. The feature is
`ShakerController.sila.xml` beside this file; the server is built from it at run time with the
package's dynamic `Feature` (no generated code). Everything protocol-level (Part B messages,
ExecutionInfo, SiLA errors, constraint validation) is the `sila2` package's implementation, not
ppu's: the driver meets an independent reading of the standard.

Physics: the speed follows its setpoint with a first-order lag (time constant `TAU_S` of
physical time); the platform warms slightly with speed. Physical time runs `--time-scale`
times faster than real time.

Run: python shaker.py [--port 50053] [--time-scale 1] [--name Shaker] [--no-cancel-controller]
     [--exit-with-stdin]
"""

from __future__ import annotations

import argparse
import logging
import math
import signal
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from queue import Queue

from sila2.framework import Feature
from sila2.framework.errors.defined_execution_error import DefinedExecutionError
from sila2.server import FeatureImplementationBase, SilaServer

FDL = Path(__file__).with_name("ShakerController.sila.xml")
CANCEL_FDL = Path(__file__).with_name("CancelController.sila.xml")
TAU_S = 2.0
AMBIENT_C = 25.0
MAX_RPM = 1500.0
PROPERTY_PERIOD_S = 0.05  # real seconds between property updates


class _QuietDefinedErrors(logging.Filter):
    """A defined execution error (Stopped) is the feature working, not a server fault: the
    package logs it with a traceback; leave it out. Likewise the loopback plaintext warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, DefinedExecutionError):
            return False
        # Plaintext is refused off loopback (main), so the package's warning about it says
        # nothing a technician can act on; it would be the one line of noise at `ppud dev`.
        return "without encryption" not in record.getMessage()


class Physics:
    """Speed and temperature in physical time, thread-safe."""

    def __init__(self, time_scale: float) -> None:
        self.time_scale = time_scale
        self.lock = threading.Lock()
        self.t_real = time.monotonic()
        self.speed = 0.0
        self.setpoint = 0.0
        self.temperature = AMBIENT_C

    def now_s(self) -> float:
        """Physical seconds since start."""
        return time.monotonic() * self.time_scale

    def advance(self) -> None:
        with self.lock:
            now = time.monotonic()
            dt = (now - self.t_real) * self.time_scale
            self.t_real = now
            k = 1.0 - math.exp(-dt / TAU_S)
            self.speed += (self.setpoint - self.speed) * k
            if abs(self.speed - self.setpoint) < 0.05:
                self.speed = self.setpoint
            target_t = AMBIENT_C + 5.0 * self.speed / MAX_RPM
            self.temperature += (target_t - self.temperature) * (1.0 - math.exp(-dt / 60.0))

    def set(self, rpm: float) -> None:
        self.advance()
        with self.lock:
            self.setpoint = rpm

    def read(self) -> tuple[float, float]:
        self.advance()
        with self.lock:
            return self.speed, self.temperature

    def sleep_physical(self, seconds: float, stop: threading.Event) -> bool:
        """Waits `seconds` of physical time; False if `stop` was set first."""
        return not stop.wait(seconds / self.time_scale)


class ShakerController(FeatureImplementationBase):
    def __init__(self, server: SilaServer, feature: Feature, physics: Physics) -> None:
        super().__init__(parent_server=server)
        self.feature = feature
        self.physics = physics
        self._CurrentSpeed_producer_queue = Queue()
        self._Temperature_producer_queue = Queue()
        self.Shake_default_lifetime_of_execution = None
        self.stop_event = threading.Event()
        self.run_lock = threading.Lock()
        self.running_uuid = None  # the execution of the Shake that runs now
        self.run_periodically(self._publish, PROPERTY_PERIOD_S)

    def _publish(self) -> None:
        speed, temperature = self.physics.read()
        self._CurrentSpeed_producer_queue.put(round(speed, 3))
        self._Temperature_producer_queue.put(round(temperature, 3))

    def CurrentSpeed_on_subscription(self, *, metadata):
        return None

    def Temperature_on_subscription(self, *, metadata):
        return None

    def _stopped(self, message: str) -> DefinedExecutionError:
        return DefinedExecutionError(self.feature.defined_execution_errors["Stopped"], message)

    def Shake(self, Speed: float, Duration: float, *, metadata, instance):
        # One run at a time: a second Shake waits (status "waiting") until the first ends.
        with self.run_lock:
            self.stop_event.clear()
            self.running_uuid = str(instance.execution_uuid)
            instance.begin_execution()
            self.physics.set(Speed)
            t0 = self.physics.now_s()
            speeds = []
            step = max(Duration / 50.0, 0.05 * self.physics.time_scale)
            while True:
                elapsed = self.physics.now_s() - t0
                remaining = max(Duration - elapsed, 0.0)
                speed, _ = self.physics.read()
                speeds.append(speed)
                instance.progress = min(elapsed / Duration, 1.0)
                instance.estimated_remaining_time = timedelta(seconds=remaining)
                instance.send_intermediate_response(round(speed, 3))
                if remaining <= 0.0:
                    break
                if not self.physics.sleep_physical(min(step, remaining), self.stop_event):
                    self.physics.set(0.0)
                    self.running_uuid = None
                    elapsed = self.physics.now_s() - t0
                    raise self._stopped(f"stopped after {elapsed:.1f} s of {Duration:g} s")
            self.physics.set(0.0)
            self.running_uuid = None
            mean = sum(speeds) / len(speeds)
            return (min(self.physics.now_s() - t0, Duration), round(mean, 3))

    def Stop(self, *, metadata):
        self.stop_event.set()
        self.physics.set(0.0)
        return ()


class CancelController(FeatureImplementationBase):
    """The standard's CancelController over the shaker's one running Shake."""

    def __init__(self, server: SilaServer, feature: Feature, shaker: ShakerController) -> None:
        super().__init__(parent_server=server)
        self.feature = feature
        self.shaker = shaker

    def CancelCommand(self, CommandExecutionUUID: str, *, metadata):
        if CommandExecutionUUID != self.shaker.running_uuid:
            raise DefinedExecutionError(
                self.feature.defined_execution_errors["InvalidCommandExecutionUUID"],
                f"no running execution {CommandExecutionUUID}",
            )
        self.shaker.Stop(metadata=metadata)
        return ()

    def CancelAll(self, *, metadata):
        self.shaker.Stop(metadata=metadata)
        return ()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=50053)
    parser.add_argument("--address", default="127.0.0.1")
    parser.add_argument("--time-scale", type=float, default=1.0)
    parser.add_argument("--name", default="Shaker")
    parser.add_argument("--uuid", default=None, help="server UUID (default: random)")
    parser.add_argument(
        "--no-cancel-controller",
        action="store_true",
        help="serve only ShakerController (an instrument whose commands cannot be cancelled)",
    )
    parser.add_argument(
        "--exit-with-stdin", action="store_true", help="exit when stdin closes (the parent died)"
    )
    args = parser.parse_args()
    if not args.time_scale > 0:
        parser.error("--time-scale must be positive")
    if args.address not in ("127.0.0.1", "localhost", "::1"):
        parser.error("plaintext is for loopback only: --address must be a loopback address")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietDefinedErrors())

    feature = Feature(FDL.read_text(encoding="utf-8"))
    server = SilaServer(
        server_name=args.name,
        server_type="Shaker",
        server_description="Simulated orbital shaker (ppu dev lab)",
        server_version="0.1",
        server_vendor_url="https://example.org/ppu",
        server_uuid=args.uuid,
    )
    physics = Physics(args.time_scale)
    shaker = ShakerController(server, feature, physics)
    server.set_feature_implementation(feature, shaker)
    if not args.no_cancel_controller:
        cancel = Feature(CANCEL_FDL.read_text(encoding="utf-8"))
        server.set_feature_implementation(cancel, CancelController(server, cancel, shaker))
    server.start_insecure(args.address, args.port, enable_discovery=False)
    # One line the parent can wait for.
    print(f"sila2 shaker listening on {args.address}:{args.port}", flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    if args.exit_with_stdin:
        # A parent that dies closes our stdin: leave with it (no orphaned instruments).
        threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
    done.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
