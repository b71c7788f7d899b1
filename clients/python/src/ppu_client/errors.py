"""Exceptions raised by the client: one per gRPC status code the daemon uses, each keeping the
status code and the field path the daemon named.

The daemon names the offending field twice: as the prefix of the status message
(`experiments[0].steps[1].furnace.segments[0].ramp.temperature_c: 1500 exceeds ...`) and, for
recipe refusals, in the trailing metadata key `ppu-field-path`. The metadata wins when present.
"""

from __future__ import annotations

import re
from typing import Any

import grpc

#: Trailing-metadata key carrying the offending field path.
FIELD_PATH_METADATA = "ppu-field-path"

# `name`, `experiments[0].steps[1].furnace`, ... followed by ": ".
_PATH_PREFIX = re.compile(
    r"^([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*): (.*)$", re.S
)


class PpuError(Exception):
    """Base of every error the client raises for a failed call.

    Attributes:
        code: the gRPC status code (`grpc.StatusCode`).
        details: the daemon's full status message.
        field_path: the request field the daemon blamed, e.g.
            ``experiments[0].steps[0].furnace.segments[0].ramp.temperature_c``; None if none.
        reason: the message without the field-path prefix.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        field_path: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.code = code
        self.details = details
        self.field_path = field_path
        self.reason = details if reason is None else reason
        super().__init__(f"{code.name}: {details}")


class InvalidArgumentError(PpuError):
    """The request is malformed or a recipe breaks a device limit (INVALID_ARGUMENT)."""


class NotFoundError(PpuError):
    """An id names nothing the daemon knows (NOT_FOUND)."""


class AlreadyExistsError(PpuError):
    """The idempotency key was used before with different content (ALREADY_EXISTS)."""


class FailedPreconditionError(PpuError):
    """The request cannot apply now, e.g. cancelling a finished experiment or a step no
    configured device can run (FAILED_PRECONDITION)."""


class UnavailableError(PpuError):
    """The daemon cannot be reached (UNAVAILABLE), including a lost event stream that could
    not be re-established in time."""


class DeadlineExceededError(PpuError):
    """The call did not finish within its timeout (DEADLINE_EXCEEDED)."""


class UnauthenticatedError(PpuError):
    """The daemon wants a bearer token and got none it accepts (UNAUTHENTICATED): pass
    ``token=`` or set ``PPU_TOKEN``."""


class PermissionDeniedError(PpuError):
    """The token's role may not make this call (PERMISSION_DENIED), e.g. a viewer token
    submitting a batch; the message names the role and the method."""


_BY_CODE: dict[grpc.StatusCode, type[PpuError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        k, v = item[0], item[1]
        if k == key:
            return v.decode() if isinstance(v, bytes) else str(v)
    return None


def error_from_status(
    code: grpc.StatusCode, details: str | None, trailing_metadata: Any = None
) -> PpuError:
    """Builds the exception for a status, extracting the field path."""
    details = details or ""
    reason = details
    path = _metadata_value(trailing_metadata, FIELD_PATH_METADATA)
    m = _PATH_PREFIX.match(details)
    if m and (path is None or m.group(1) == path):
        path, reason = m.group(1), m.group(2)
    elif path is not None and details.startswith(path + ": "):
        reason = details[len(path) + 2 :]
    cls = _BY_CODE.get(code, PpuError)
    return cls(code, details, field_path=path or None, reason=reason)


#: Codes whose message gets the daemon's address appended: the call may never have reached it.
_NAMES_ADDRESS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def error_from_rpc(e: grpc.RpcError, target: str | None = None) -> PpuError:
    """Converts a `grpc.RpcError` (sync) or `grpc.aio.AioRpcError` to a `PpuError`. With
    `target`, an UNAVAILABLE or DEADLINE_EXCEEDED message ends naming the daemon's address."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    if target and code in _NAMES_ADDRESS and target not in (details or ""):
        details = f"{details or code.name} (ppud at {target})"
    return error_from_status(code, details, trailing)
