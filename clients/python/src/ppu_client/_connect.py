"""How the SDK reaches ppud, shared by the synchronous and the asyncio client: the target forms,
the TLS credentials and the bearer token.

Targets: ``host:port`` and ``http://host:port`` (plain text), ``https://host:port`` (TLS), and
``unix:/path/to/ppud.sock`` (the daemon's local socket). Anything but http(s):// goes to gRPC
unchanged (so gRPC names like ``dns:///host:port`` work too). Giving TLS material
(`root_certificates`, `certificate_chain` + `private_key`, `tls_domain`) with a bare
``host:port`` also means TLS.

The target defaults to the ``PPU_ADDR`` environment variable (as for ppuctl), else
``127.0.0.1:50051``. A call waits at most `connect_timeout` for a connection to the daemon and
then fails with an `UnavailableError` that names the address (`unreachable`).

The token (argument, else the ``PPU_TOKEN`` environment variable) travels as
``authorization: Bearer <token>`` metadata on every call, streams included. It is attached per
call rather than as gRPC call credentials, because those are only sent over TLS and ppud also
takes tokens in plain text on loopback and over its Unix socket. It is never part of an error
message or a repr.
"""

from __future__ import annotations

import ipaddress
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import grpc

from .errors import UnavailableError

#: Environment variable the token is read from when none is passed.
TOKEN_ENV = "PPU_TOKEN"

#: Environment variable the target is read from when none is passed (ppuctl reads it too).
ADDR_ENV = "PPU_ADDR"

#: The target without argument or ``$PPU_ADDR``: ``ppud dev``'s and ppud's default listen address.
DEFAULT_TARGET = "127.0.0.1:50051"

#: Seconds a call waits for a connection to the daemon by default. Reaching a daemon on the lab
#: network takes milliseconds; a wrong or dead address should say so at once, not after the
#: call's own timeout (which also covers long calls).
DEFAULT_CONNECT_TIMEOUT_S = 3.0

#: Status codes of a `probe` that mean the daemon did not answer it.
UNREACHABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: How long the diagnostic call (`probe` without waiting) may take to bring back gRPC's reason.
DIAGNOSIS_TIMEOUT_S = 0.5

#: A PEM input: the bytes themselves, or the path of a file holding them.
PemSource = Union[bytes, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Connection:
    """What a client needs to open its channel and make calls."""

    #: The target as gRPC understands it (scheme stripped, ``unix:`` kept).
    grpc_target: str
    #: TLS credentials, or None for plain text.
    credentials: grpc.ChannelCredentials | None
    #: Extra channel options (the TLS name override, the authority for a Unix socket).
    options: tuple[tuple[str, str], ...]
    #: Metadata sent with every call (the authorization header, if any).
    metadata: tuple[tuple[str, str], ...] = field(repr=False)

    def open_channel(
        self,
        api: Any,
        defaults: Sequence[tuple[str, Any]],
        extra: Sequence[tuple[str, Any]],
    ) -> Any:
        """Opens the channel with `api` = ``grpc`` (sync) or ``grpc.aio``: plain text or TLS.
        Options: `defaults`, then this connection's, then the caller's `extra` (last wins)."""
        opts = [*defaults, *self.options, *extra]
        if self.credentials is None:
            return api.insecure_channel(self.grpc_target, options=opts)
        return api.secure_channel(self.grpc_target, self.credentials, options=opts)


def target_or_default(target: str | None) -> str:
    """`target`, else ``$PPU_ADDR`` (surrounding whitespace removed), else `DEFAULT_TARGET`."""
    if target is not None:
        return target
    return os.environ.get(ADDR_ENV, "").strip() or DEFAULT_TARGET


def probe(
    channel: Any, metadata: Sequence[tuple[str, str]], timeout: float | None, *, wait: bool
) -> Any:
    """A call that asks nothing of the daemon (``grpc.health.v1.Health/Check`` of the server
    as a whole), made to learn whether it is there: any reply, even a refusal, says it is.
    `wait` (gRPC's wait-for-ready) waits for a connection up to `timeout`; without it a channel
    in transient failure fails at once with gRPC's reason (``Connection refused``, a failed
    name lookup, a peer that is no gRPC server). Sync: returns the (empty) reply or raises
    `grpc.RpcError`; asyncio: returns the call to await."""
    method = channel.unary_unary("/grpc.health.v1.Health/Check")  # bytes in, bytes out
    return method(b"", timeout=timeout, metadata=metadata, wait_for_ready=wait)


def unreachable(
    target: str, waited: float | None, why: grpc.RpcError | None, reason: str | None = None
) -> UnavailableError:
    """The error for a daemon not reached in time: names the address and gRPC's reason when
    `why` carries one, else `reason`, else that nothing answered."""
    detail = None
    if why is not None and why.code() == grpc.StatusCode.UNAVAILABLE:
        detail = why.details()
    within = "" if waited is None else f" within {waited:g} s"
    msg = (
        f"cannot reach ppud at {target}{within}: "
        f"{detail or reason or 'no answer (the connection was not established)'}. Check the "
        f"address (the target argument, else ${ADDR_ENV}) and that ppud is running there; "
        "connect_timeout= waits longer for a daemon that is starting"
    )
    return UnavailableError(grpc.StatusCode.UNAVAILABLE, msg)


def state_reason(state: grpc.ChannelConnectivity | None) -> str | None:
    """What a channel that never became ready was doing, in words (None: nothing to add)."""
    if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
        return "the connection failed"
    if state == grpc.ChannelConnectivity.SHUTDOWN:
        return "the client was closed"
    return None


def resolve(
    target: str,
    *,
    token: str | None,
    root_certificates: PemSource | None,
    certificate_chain: PemSource | None,
    private_key: PemSource | None,
    tls_domain: str | None,
    own_channel: bool,
) -> Connection:
    """Checks the arguments and reads any PEM files. Raises ValueError on a bad argument
    (naming it, never echoing the token) and OSError when a PEM file cannot be read."""
    if (certificate_chain is None) != (private_key is None):
        raise ValueError("certificate_chain and private_key go together (client certificate)")
    tls_material = any(
        x is not None for x in (root_certificates, certificate_chain, private_key, tls_domain)
    )
    if tls_material and not own_channel:
        raise ValueError(
            "root_certificates, certificate_chain, private_key and tls_domain apply only when "
            "the client opens its own channel (not with channel=)"
        )
    grpc_target, tls = _split_target(target, tls_material)
    if tls_material and not tls:
        raise ValueError(
            f"TLS settings need an https:// (or bare host:port) target, not {target!r}"
        )
    credentials = None
    options: tuple[tuple[str, str], ...] = ()
    if grpc_target.startswith("unix:"):
        # gRPC's C core would send the socket path, percent-encoded, as the HTTP/2 :authority,
        # which ppud's HTTP/2 stack (hyper) rejects as malformed (RST_STREAM PROTOCOL_ERROR).
        options = (("grpc.default_authority", "localhost"),)
    if tls:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_pem("root_certificates", root_certificates),
            private_key=_pem("private_key", private_key),
            certificate_chain=_pem("certificate_chain", certificate_chain),
        )
        if tls_domain:
            options = (("grpc.ssl_target_name_override", tls_domain),)
    metadata: tuple[tuple[str, str], ...] = ()
    value = bearer_token(token)
    if value is not None:
        metadata = (("authorization", f"Bearer {value}"),)
        if not tls and not _is_local(grpc_target):
            warnings.warn(
                f"sending the ppud bearer token unencrypted to {target}; use an https:// "
                "target (or unix: on the daemon's machine)",
                stacklevel=3,
            )
    return Connection(grpc_target, credentials, options, metadata)


def bearer_token(token: str | None) -> str | None:
    """The token to send: `token`, else ``$PPU_TOKEN``, surrounding whitespace removed; None if
    neither is set. ValueError for an empty or malformed token (the message never repeats it)."""
    source = "token"
    if token is None:
        token = os.environ.get(TOKEN_ENV)
        source = TOKEN_ENV
        if token is None:
            return None
    token = token.strip()
    if not token:
        raise ValueError(f"{source} is empty")
    if any(c.isspace() for c in token):
        raise ValueError(f"{source} holds more than one word; it must be the token alone")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(f"{source} has characters a gRPC header cannot carry (visible ASCII only)")
    return token


def _split_target(target: str, tls_material: bool) -> tuple[str, bool]:
    """(target for gRPC, whether to use TLS)."""
    if target.startswith("unix:"):
        return target, False
    for scheme, tls in (("https://", True), ("http://", False)):
        if target.startswith(scheme):
            rest = target[len(scheme) :].rstrip("/")
            if not rest:
                raise ValueError(f"target {target!r} names no host")
            return rest, tls
    # Anything else (host:port, or a gRPC name such as dns:///host:port) goes to gRPC as is.
    return target, tls_material


def _is_local(grpc_target: str) -> bool:
    """Whether a plain-text target stays on this machine (loopback or a Unix socket)."""
    if grpc_target.startswith("unix:"):
        return True
    host = grpc_target.rsplit(":", 1)[0] if ":" in grpc_target else grpc_target
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pem(name: str, source: PemSource | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise OSError(e.errno, f"{name}: cannot read {os.fspath(source)}: {e.strerror}") from None
