"""The bearer token and the transports (TLS, mTLS, Unix socket).

Most tests run against a small grpc-python server in the test that records the metadata of
every call it gets and refuses calls without the expected token, as ppud does: that shows the
header on every call and stream, and exercises TLS and mTLS with certificates made by openssl.
The last tests run a real `ppud dev --tokens-file … --socket …` (roles, the Unix socket)."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from conftest import Daemon
from ppu_client import (
    AsyncClient,
    Client,
    Experiment,
    Hold,
    PermissionDeniedError,
    Ramp,
    State,
    StepTo,
    UnauthenticatedError,
    UnavailableError,
    furnace,
    pb,
)
from ppu_client._generated import devices_pb2_grpc, events_pb2_grpc, experiment_pb2_grpc

TOKEN = "ppu_TESTTOKENABCDEFGHIJKLMNOPQRSTUVWXYZ234567ABCDEFGHIJ"
TIMEOUT_S = 30.0


@dataclass
class Recorder:
    """What the server saw: (method, authorization value or None) per call, in order."""

    required: str | None = TOKEN
    calls: list[tuple[str, str | None]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, method: str, context: grpc.ServicerContext) -> None:
        auth = [v for k, v in context.invocation_metadata() if k == "authorization"]
        with self.lock:
            self.calls.append((method, auth[0] if auth else None))
        if self.required is not None and auth != [f"Bearer {self.required}"]:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        if method == "CancelExperiment":
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "role viewer may not call ppu.v1.ExperimentService/CancelExperiment",
            )

    def methods(self) -> list[str]:
        with self.lock:
            return [m for m, _ in self.calls]

    def authorizations(self) -> set[str | None]:
        with self.lock:
            return {a for _, a in self.calls}


class Experiments(experiment_pb2_grpc.ExperimentServiceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def SubmitBatch(self, request, context):  # noqa: N802 (gRPC method names)
        self.rec.check("SubmitBatch", context)
        batch = pb.Batch(id="B1", experiment_ids=["E1"], idempotency_key=request.idempotency_key)
        return pb.SubmitBatchResponse(batch=batch)

    def GetBatch(self, request, context):  # noqa: N802
        self.rec.check("GetBatch", context)
        return pb.Batch(id=request.id, experiment_ids=["E1"])

    def GetExperiment(self, request, context):  # noqa: N802
        self.rec.check("GetExperiment", context)
        return pb.Experiment(id=request.id)

    def ListExperiments(self, request, context):  # noqa: N802
        self.rec.check("ListExperiments", context)
        return pb.ListExperimentsResponse(experiments=[pb.Experiment(id="E1")])

    def CancelExperiment(self, request, context):  # noqa: N802
        self.rec.check("CancelExperiment", context)
        return pb.Experiment(id=request.id)


class Devices(devices_pb2_grpc.DeviceServiceServicer):
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec

    def ListDevices(self, request, context):  # noqa: N802
        self.rec.check("ListDevices", context)
        return pb.ListDevicesResponse(devices=[pb.Device(id="furnace-1")])


class Events(events_pb2_grpc.EventServiceServicer):
    """Sends one event per stream and ends the first stream (as a daemon restart would), so the
    client must reopen it; later streams stay open until the client cancels them."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.streams = 0

    def StreamEvents(self, request, context):  # noqa: N802
        self.rec.check("StreamEvents", context)
        self.streams += 1
        yield pb.Event(sequence=request.from_sequence + 1, batch_id="B1")
        if self.streams == 1:
            return
        done = threading.Event()
        context.add_callback(done.set)
        done.wait(TIMEOUT_S)


class FakeDaemon:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        experiment_pb2_grpc.add_ExperimentServiceServicer_to_server(Experiments(rec), self.server)
        devices_pb2_grpc.add_DeviceServiceServicer_to_server(Devices(rec), self.server)
        events_pb2_grpc.add_EventServiceServicer_to_server(Events(rec), self.server)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(TIMEOUT_S)


@pytest.fixture
def fake() -> Iterator[tuple[FakeDaemon, str]]:
    d = FakeDaemon(Recorder())
    port = d.server.add_insecure_port("127.0.0.1:0")
    d.start()
    yield d, f"127.0.0.1:{port}"
    d.stop()


def exercise(c: Client) -> None:
    """Every call the client makes, the event stream across one reconnect included."""
    assert [d.id for d in c.devices()] == ["furnace-1"]
    batch = c.submit_batch([pb.ExperimentSpec(name="x")])
    assert c.get_batch(batch.id).experiment_ids == ("E1",)
    assert c.get("E1").id == "E1"
    assert [e.id for e in c.list()] == ["E1"]
    stream = c.events(timeout=TIMEOUT_S)
    try:
        assert [next(stream).sequence, next(stream).sequence] == [1, 2]
    finally:
        stream.close()


ALL_METHODS = {
    "ListDevices",
    "SubmitBatch",
    "GetBatch",
    "GetExperiment",
    "ListExperiments",
    "StreamEvents",
}


def test_the_token_goes_with_every_call_and_every_stream(fake) -> None:
    d, addr = fake
    with Client(addr, token=TOKEN, timeout=TIMEOUT_S) as c:
        exercise(c)
    assert set(d.rec.methods()) == ALL_METHODS
    assert d.rec.methods().count("StreamEvents") == 2, "the stream was reopened"
    assert d.rec.authorizations() == {f"Bearer {TOKEN}"}


def test_the_token_comes_from_ppu_token(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    d, addr = fake
    monkeypatch.setenv("PPU_TOKEN", f"  {TOKEN}\n")
    with Client(addr, timeout=TIMEOUT_S) as c:
        assert c.devices()
    # An explicit token wins over the environment.
    monkeypatch.setenv("PPU_TOKEN", "ppu_somebodyelse")
    with Client(addr, token=TOKEN, timeout=TIMEOUT_S) as c:
        assert c.devices()
    assert d.rec.authorizations() == {f"Bearer {TOKEN}"}


def test_without_a_token_calls_and_streams_are_refused(
    fake, monkeypatch: pytest.MonkeyPatch
) -> None:
    d, addr = fake
    monkeypatch.delenv("PPU_TOKEN", raising=False)
    with Client(addr, timeout=TIMEOUT_S) as c:
        with pytest.raises(UnauthenticatedError) as ei:
            c.devices()
        assert ei.value.code == grpc.StatusCode.UNAUTHENTICATED
        # A refused stream is raised, not retried.
        with pytest.raises(UnauthenticatedError):
            next(c.events(timeout=TIMEOUT_S))
    with Client(addr, token="ppu_wrong", timeout=TIMEOUT_S) as c:
        with pytest.raises(UnauthenticatedError):
            c.devices()
    assert d.rec.calls == [
        ("ListDevices", None),
        ("StreamEvents", None),
        ("ListDevices", "Bearer ppu_wrong"),
    ]


def test_permission_denied_keeps_the_daemons_message(fake) -> None:
    _, addr = fake
    with Client(addr, token=TOKEN, timeout=TIMEOUT_S) as c:
        with pytest.raises(PermissionDeniedError) as ei:
            c.cancel("E1")
    assert "role viewer may not call" in str(ei.value)


def test_async_client_sends_the_token_on_every_call_and_stream(fake) -> None:
    d, addr = fake

    async def main() -> None:
        async with AsyncClient(addr, token=TOKEN, timeout=TIMEOUT_S) as c:
            assert [x.id for x in await c.devices()] == ["furnace-1"]
            batch = await c.submit_batch([pb.ExperimentSpec(name="x")])
            assert (await c.get_batch(batch.id)).experiment_ids == ("E1",)
            assert (await c.get("E1")).id == "E1"
            assert [e.id async for e in c.list()] == ["E1"]
            stream = c.events(timeout=TIMEOUT_S)
            try:
                assert [(await anext(stream)).sequence, (await anext(stream)).sequence] == [1, 2]
            finally:
                await stream.aclose()
        async with AsyncClient(addr, token="ppu_wrong", timeout=TIMEOUT_S) as c:
            with pytest.raises(UnauthenticatedError):
                await c.devices()

    asyncio.run(main())
    assert set(d.rec.methods()) == ALL_METHODS
    assert d.rec.methods().count("StreamEvents") == 2
    assert d.rec.authorizations() == {f"Bearer {TOKEN}", "Bearer ppu_wrong"}


def test_unix_socket_target(tmp_path: Path) -> None:
    d = FakeDaemon(Recorder())
    sock = tmp_path / "ppud.sock"
    d.server.add_insecure_port(f"unix:{sock}")
    d.start()
    try:
        with Client(f"unix:{sock}", token=TOKEN, timeout=TIMEOUT_S) as c:
            exercise(c)

        async def main() -> None:
            async with AsyncClient(f"unix://{sock}", token=TOKEN, timeout=TIMEOUT_S) as c:
                assert await c.devices()

        asyncio.run(main())
    finally:
        d.stop()
    assert d.rec.authorizations() == {f"Bearer {TOKEN}"}


def test_bad_tokens_and_arguments_are_refused_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad, expected in [
        ("", "token is empty"),
        ("  \n", "token is empty"),
        ("ppu_secret and more", "more than one word"),
        ("ppu_secrét", "visible ASCII"),
    ]:
        with pytest.raises(ValueError, match=expected) as ei:
            Client("127.0.0.1:1", token=bad)
        assert "secr" not in str(ei.value), "the token leaked into the error"
    monkeypatch.setenv("PPU_TOKEN", " ")
    with pytest.raises(ValueError, match="PPU_TOKEN is empty"):
        Client("127.0.0.1:1")
    with pytest.raises(ValueError, match="go together"):
        Client("https://127.0.0.1:1", certificate_chain=b"x")
    with pytest.raises(ValueError, match="need an https://"):
        Client("http://127.0.0.1:1", root_certificates=b"x")
    with pytest.raises(ValueError, match="need an https://"):
        Client("unix:/run/ppu/ppud.sock", tls_domain="ppud")
    with pytest.raises(OSError, match="root_certificates: cannot read /nonexistent/ca.crt"):
        Client("https://127.0.0.1:1", root_certificates="/nonexistent/ca.crt")


def test_a_token_in_plain_text_off_loopback_is_warned_about(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("PPU_TOKEN", raising=False)
    with pytest.warns(UserWarning, match="unencrypted to lab-pc.invalid:50051"):
        Client("lab-pc.invalid:50051", token=TOKEN).close()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Client("127.0.0.1:50051", token=TOKEN).close()
        Client("localhost:50051", token=TOKEN).close()
        Client("[::1]:50051", token=TOKEN).close()
        Client("lab-pc.invalid:50051").close()  # no token, nothing to leak


# -- TLS ---------------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA, a server certificate for the name ``ppud.lab`` only, and a client
    certificate, made with the openssl command-line tool."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command-line tool is not installed (needed to make test certs)")
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=ppu test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip
    for name, cn, ext in [
        ("server", "ppud.lab", "subjectAltName=DNS:ppud.lab\nextendedKeyUsage=serverAuth\n"),
        ("client", "planner-gp", "extendedKeyUsage=clientAuth\n"),
    ]:
        (d / f"{name}.ext").write_text(ext)
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn}",
                 cwd=d)  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=d,
        )  # fmt: skip
    return Pki(d / "ca.crt", d / "server.crt", d / "server.key", d / "client.crt", d / "client.key")


def tls_daemon(pki: Pki, require_client_auth: bool) -> tuple[FakeDaemon, int]:
    d = FakeDaemon(Recorder())
    creds = grpc.ssl_server_credentials(
        [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
        root_certificates=pki.ca.read_bytes(),
        require_client_auth=require_client_auth,
    )
    port = d.server.add_secure_port("127.0.0.1:0", creds)
    d.start()
    return d, port


def test_tls_with_the_labs_ca_and_a_name_override(pki: Pki) -> None:
    d, port = tls_daemon(pki, require_client_auth=False)
    try:
        # The certificate names ppud.lab, not 127.0.0.1: verified against that name.
        with Client(
            f"https://127.0.0.1:{port}",
            token=TOKEN,
            root_certificates=pki.ca,
            tls_domain="ppud.lab",
            timeout=TIMEOUT_S,
        ) as c:
            exercise(c)
        # PEM bytes work as well as paths, and TLS settings make a bare host:port TLS.
        with Client(
            f"127.0.0.1:{port}",
            token=TOKEN,
            root_certificates=pki.ca.read_bytes(),
            tls_domain="ppud.lab",
            timeout=TIMEOUT_S,
        ) as c:
            assert c.devices()
        # Without the override the name does not match: the handshake fails.
        with Client(
            f"https://127.0.0.1:{port}", token=TOKEN, root_certificates=pki.ca, timeout=5.0
        ) as c:
            with pytest.raises(UnavailableError):
                c.devices()
    finally:
        d.stop()
    assert d.rec.authorizations() == {f"Bearer {TOKEN}"}


def test_mtls_needs_the_client_certificate(pki: Pki) -> None:
    d, port = tls_daemon(pki, require_client_auth=True)
    target = f"https://127.0.0.1:{port}"
    try:
        with Client(
            target,
            token=TOKEN,
            root_certificates=pki.ca,
            certificate_chain=pki.client_cert,
            private_key=pki.client_key,
            tls_domain="ppud.lab",
            timeout=TIMEOUT_S,
        ) as c:
            assert c.devices()

        async def main() -> None:
            async with AsyncClient(
                target,
                token=TOKEN,
                root_certificates=pki.ca,
                certificate_chain=pki.client_cert,
                private_key=pki.client_key,
                tls_domain="ppud.lab",
                timeout=TIMEOUT_S,
            ) as c:
                assert await c.devices()

        asyncio.run(main())
        calls_with_cert = len(d.rec.calls)
        with Client(
            target, token=TOKEN, root_certificates=pki.ca, tls_domain="ppud.lab", timeout=5.0
        ) as c:
            with pytest.raises(UnavailableError):
                c.devices()
    finally:
        d.stop()
    assert calls_with_cert == 2
    assert len(d.rec.calls) == 2, "a client without a certificate got through"


# -- against a real ppud ---------------------------------------------------------------------

PLANNER = "ppu_planner-1f9e8d7c6b5a4f3e2d1c0b9a8f7e6d5c4b3a2f1e0d9c8b7a6f5e4d3c2b1a0f9e"
VIEWER = "ppu_viewer-0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b0c1d2e3f4a5b6c7d8e9f0a1b"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path]]:
    """`ppud dev` requiring tokens from a tokens file (SHA-256 entries, as `ppud token` prints
    them), with its Unix socket; yields the daemon and the socket path."""
    base = tmp_path_factory.mktemp("ppud-secured")
    tokens = base / "tokens.toml"
    tokens.write_text(
        "".join(
            f'[[token]]\nprincipal = "{p}"\nrole = "{r}"\n'
            f'sha256 = "{hashlib.sha256(t.encode()).hexdigest()}"\n\n'
            for p, r, t in [("gp-planner", "planner", PLANNER), ("dash", "viewer", VIEWER)]
        )
    )
    sock = base / "ppud.sock"
    d = Daemon(
        base / "data", base / "ppud.log", ("--tokens-file", str(tokens), "--socket", str(sock))
    )
    d.start()
    yield d, sock
    d.stop()


def test_real_ppud_roles_over_tcp(secured, monkeypatch: pytest.MonkeyPatch) -> None:
    d, _ = secured
    monkeypatch.delenv("PPU_TOKEN", raising=False)
    exp = Experiment("auth-anneal", [furnace(Ramp(120.0, 20.0), Hold(60.0), StepTo(60.0))])
    with Client(d.addr, timeout=TIMEOUT_S) as c:
        with pytest.raises(UnauthenticatedError):
            c.devices()
        with pytest.raises(UnauthenticatedError):
            next(c.events(timeout=TIMEOUT_S))
    with Client(d.addr, token=VIEWER, timeout=TIMEOUT_S) as viewer:
        assert any(x.id == "furnace-1" for x in viewer.devices())
        with pytest.raises(PermissionDeniedError, match="role viewer may not call"):
            viewer.submit_batch([exp])
    # The planner's token from PPU_TOKEN: submit, then follow the results on the event stream.
    monkeypatch.setenv("PPU_TOKEN", PLANNER)
    with Client(d.addr, timeout=TIMEOUT_S) as planner:
        batch = planner.submit_batch([exp])
        (result,) = planner.wait(batch, timeout=120.0)
        assert result.state is State.SUCCEEDED, result.message

    async def main() -> None:
        async with AsyncClient(d.addr, timeout=TIMEOUT_S) as c:
            got = await c.get_batch(batch.id)
            assert got.experiment_ids == batch.experiment_ids
            stream = c.events(batch_id=batch.id, timeout=TIMEOUT_S)
            try:
                assert (await anext(stream)).batch_id == batch.id
            finally:
                await stream.aclose()

    asyncio.run(main())


def test_real_ppud_unix_socket(secured, monkeypatch: pytest.MonkeyPatch) -> None:
    _, sock = secured
    monkeypatch.delenv("PPU_TOKEN", raising=False)
    # Same user as the daemon: admitted without a token.
    with Client(f"unix:{sock}", timeout=TIMEOUT_S) as c:
        assert any(x.id == "furnace-1" for x in c.devices())
    # A token sent over the socket wins over the peer credentials.
    with Client(f"unix:{sock}", token=VIEWER, timeout=TIMEOUT_S) as c:
        assert c.devices()
        with pytest.raises(PermissionDeniedError):
            c.submit_batch([Experiment("x", [furnace(StepTo(40.0))])])
