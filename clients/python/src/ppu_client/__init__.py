"""ppu-client: the Python planner SDK for ppud, the ppu lab daemon.

Submit batches of experiments, follow their results and the event log across disconnects,
inspect and cancel them, and turn measured isotherms into AIF or pyGAPS objects::

    from ppu_client import Client, Experiment, anneal

    with Client("127.0.0.1:50051") as c:  # token from PPU_TOKEN, or Client(..., token=...)
        batch = c.submit_batch([Experiment("LDH 450 C", [anneal(450.0, hold_s=3600.0)])])
        for result in c.results(batch):
            print(result.name, result.state.name)

`AsyncClient` (in `ppu_client.aio`) offers the same API for asyncio. The raw ppu.v1 messages,
generated from proto/ppu/v1 when the package was built, are in `ppu_client.pb`.

Any device family's step is built by its command name with `step("gas_flow", flow_sccm=50,
...)`, and any step's result read with its units through `ExperimentResult.outputs()` (see
`ppu_client.schema`; `Client.schema()` learns the families added after the SDK was built).
"""

from . import pb
from ._connect import DEFAULT_TARGET
from .aio import AsyncClient
from .client import Client
from .errors import (
    FIELD_PATH_METADATA,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    PpuError,
    UnauthenticatedError,
    UnavailableError,
)
from .isotherm import amount_at, isotherm_to_aif, isotherm_to_pygaps
from .models import (
    Batch,
    Capability,
    ExperimentResult,
    Field,
    State,
    TypedIntermediate,
    TypedMessage,
    TypedResult,
)
from .recipes import (
    Degas,
    Dispense,
    Experiment,
    Furnace,
    Hold,
    Isotherm,
    Ramp,
    Refill,
    StepTo,
    Weigh,
    anneal,
    furnace,
)
from .schema import Schema, step

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TARGET",
    "FIELD_PATH_METADATA",
    "AlreadyExistsError",
    "AsyncClient",
    "Batch",
    "Capability",
    "Client",
    "DeadlineExceededError",
    "Degas",
    "Dispense",
    "Experiment",
    "ExperimentResult",
    "FailedPreconditionError",
    "Field",
    "Furnace",
    "Hold",
    "InvalidArgumentError",
    "Isotherm",
    "NotFoundError",
    "PermissionDeniedError",
    "PpuError",
    "Ramp",
    "Refill",
    "Schema",
    "State",
    "StepTo",
    "TypedIntermediate",
    "TypedMessage",
    "TypedResult",
    "UnauthenticatedError",
    "UnavailableError",
    "Weigh",
    "amount_at",
    "anneal",
    "furnace",
    "isotherm_to_aif",
    "isotherm_to_pygaps",
    "pb",
    "step",
]
