"""The raw ppu.v1 protobuf messages and enums (generated from proto/ppu/v1 at build time).

Everything the typed layer returns keeps its protobuf message at hand (`.proto`), and every
call that takes a typed value also takes the message, so this module is the escape hatch to the
full API, e.g. ``pb.Step(isotherm=pb.Isotherm(...))`` or ``pb.ExperimentState.Name(3)``.
"""

from ._generated.devices_pb2 import *  # noqa: F401,F403
from ._generated.events_pb2 import *  # noqa: F401,F403
from ._generated.experiment_pb2 import *  # noqa: F401,F403
from ._generated.queue_pb2 import *  # noqa: F401,F403
