"""SiLA calls pass through ppu.v1's tokens and roles: with a tokens file, a call without a
token is refused (discovery and an execution's follow-up calls excepted, as standard clients
send no metadata there), a viewer reads but cannot start a command, a planner's token (as SiLA
AccessToken metadata or as a bearer header) runs one, and the audit record names the
principal."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
from conftest import (
    PLANNER,
    PLANNER_PRINCIPAL,
    TIMEOUT_S,
    VIEWER,
    VIEWER_PRINCIPAL,
    Daemon,
    sila_client,
    wait_until,
)
from sila2.client import SilaClient
from sila2.client.utils import pack_metadata_for_grpc
from sila_follow import uuid_to_ulid
from test_commands import experiment_ids, hold, ramp

STATUS_FINISHED = {2: "finishedSuccessfully", 3: "finishedWithError"}


def raw_furnace_call(
    viewer: SilaClient, d: Daemon, metadata: tuple[tuple[str, Any], ...]
) -> Any:
    """Calls Furnace.FurnaceProgram on a channel of its own that carries only `metadata`: the
    parameters and the AccessToken metadata are serialized by the sila2 package (the same code
    its client uses), the channel adds no bearer header."""
    f = viewer.Furnace
    params = f.FurnaceProgram._wrapped_command.parameters.to_message(
        Device="", Segments=[ramp(80.0, 20.0), hold(60.0)]
    )
    channel = grpc.insecure_channel(f"{d.sila_host}:{d.sila_port}")
    stub = f._grpc_module.FurnaceStub(channel)
    try:
        return stub.FurnaceProgram(params, metadata=metadata, timeout=TIMEOUT_S), stub, channel
    except BaseException:
        channel.close()
        raise


def access_token(client: SilaClient, token: str) -> tuple[tuple[str, Any], ...]:
    return pack_metadata_for_grpc([client.AuthorizationService.AccessToken(token)])


@pytest.fixture(scope="module")
def viewer(secured: Daemon) -> SilaClient:
    c = sila_client(secured, bearer=VIEWER)
    yield c
    c.close()


def test_the_metadata_header_is_the_agreed_one(viewer: SilaClient) -> None:
    ((key, _),) = access_token(viewer, "x")
    assert key == "sila-org.silastandard-core-authorizationservice-v1-metadata-accesstoken-bin"


def test_a_call_without_a_token_is_refused(secured: Daemon, viewer: SilaClient) -> None:
    with pytest.raises(grpc.RpcError) as err:
        raw_furnace_call(viewer, secured, ())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    # A wrong token is no better.
    with pytest.raises(grpc.RpcError) as err:
        raw_furnace_call(viewer, secured, access_token(viewer, "ppu_not-a-token"))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    # Other reads need a token as well: the queue's state of an experiment.
    channel = grpc.insecure_channel(f"{secured.sila_host}:{secured.sila_port}")
    try:
        q = viewer.ExperimentQueue
        stub = q._grpc_module.ExperimentQueueStub(channel)
        params = q.GetExperiment._wrapped_command.parameters.to_message(
            ExperimentId="01M96K0GJA45G8MSHYWN5CBD81"
        )
        with pytest.raises(grpc.RpcError) as err:
            stub.GetExperiment(params, timeout=TIMEOUT_S)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    finally:
        channel.close()


def test_discovery_needs_no_token(secured: Daemon) -> None:
    # A standard client reads SiLAService (where the standard forbids metadata) and the
    # AccessToken's affected calls before it can send a token: a plain sila2 client connects.
    plain = sila_client(secured)
    try:
        features = plain.SiLAService.ImplementedFeatures.get()
        assert "ppu/devices/Furnace/v1" in features, features
        affected = {str(x) for x in plain.AuthorizationService.AccessToken.get_affected_calls()}
        assert any("Furnace" in x for x in affected), affected
        # …but it cannot run anything without one.
        with pytest.raises(Exception) as err:
            plain.Furnace.FurnaceProgram(Device="", Segments=[ramp(80.0, 20.0)])
        cause = getattr(err.value, "exception", err.value)
        assert isinstance(cause, grpc.RpcError), err.value
        assert cause.code() == grpc.StatusCode.UNAUTHENTICATED, err.value
    finally:
        plain.close()


def test_a_viewer_reads_but_cannot_start_a_command(secured: Daemon, viewer: SilaClient) -> None:
    features = viewer.SiLAService.ImplementedFeatures.get()
    assert "ppu/devices/Furnace/v1" in features
    assert viewer.SiLAService.GetFeatureDefinition("ppu/devices/Furnace/v1").FeatureDefinition
    before = experiment_ids(secured, VIEWER)
    # As AccessToken metadata…
    with pytest.raises(grpc.RpcError) as err:
        raw_furnace_call(viewer, secured, access_token(viewer, VIEWER))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    # …and as the bearer header, through the sila2 client.
    with pytest.raises(Exception) as err:
        viewer.Furnace.FurnaceProgram(Device="", Segments=[ramp(80.0, 20.0)])
    cause = getattr(err.value, "exception", err.value)
    assert isinstance(cause, grpc.RpcError), err.value
    assert cause.code() == grpc.StatusCode.PERMISSION_DENIED, err.value
    # Nothing was queued: the refusal came before the queue.
    assert experiment_ids(secured, VIEWER) == before


def test_a_planner_token_runs_a_command_and_is_audited(secured: Daemon, viewer: SilaClient) -> None:
    token = access_token(viewer, PLANNER)
    confirmation, stub, channel = raw_furnace_call(viewer, secured, token)
    try:
        uuid = confirmation.commandExecutionUUID.value
        exp_id = uuid_to_ulid(uuid)
        pb = viewer.Furnace._pb2_module.SiLAFramework__pb2
        status = None
        for info in stub.FurnaceProgram_Info(
            pb.CommandExecutionUUID(value=uuid), metadata=token, timeout=TIMEOUT_S
        ):
            status = STATUS_FINISHED.get(info.commandStatus)
            if status:
                break
        assert status == "finishedSuccessfully", status
        result = stub.FurnaceProgram_Result(
            pb.CommandExecutionUUID(value=uuid), metadata=token, timeout=TIMEOUT_S
        )
        assert result.ExperimentId.value == exp_id
    finally:
        channel.close()

    shown = secured.ppuctl_json("show", exp_id, token=VIEWER)
    assert shown["state"] == "EXPERIMENT_STATE_SUCCEEDED", shown
    # The audit record of the SiLA call names the planner's principal and role.
    event, _ = secured.watch_until(
        lambda e: e.get("audit", {}).get("principal") == PLANNER_PRINCIPAL
        and "FurnaceProgram" in e["audit"].get("method", ""),
        token=VIEWER,
    )
    audit = event["audit"]
    assert audit["role"] in ("planner", "ROLE_PLANNER"), audit
    assert audit["code"] in ("OK", "Ok", "ok"), audit
    # The viewer's refused attempt is audited too, under its own principal.
    secured.watch_until(
        lambda e: e.get("audit", {}).get("principal") == VIEWER_PRINCIPAL
        and "FurnaceProgram" in e["audit"].get("method", ""),
        token=VIEWER,
    )


def test_a_bearer_header_works_for_every_call(secured: Daemon) -> None:
    planner = sila_client(secured, bearer=PLANNER)
    try:
        run = planner.Furnace.FurnaceProgram(Device="", Segments=[ramp(70.0, 20.0)])
        from sila_follow import follow

        infos = follow(planner, "Furnace", "FurnaceProgram", run.execution_uuid, TIMEOUT_S)
        assert infos[-1].status == "finishedSuccessfully", infos
        assert run.get_responses().ExperimentId == uuid_to_ulid(run.execution_uuid)
    finally:
        planner.close()


def test_a_stock_client_with_access_token_metadata_runs_and_follows_its_command(
    secured: Daemon,
) -> None:
    # The plain sila2 flow: the token as AccessToken metadata on the command only; the
    # client's ExecutionInfo thread and get_responses() send no metadata (the execution UUID
    # names the experiment).
    client = sila_client(secured)
    try:
        token = client.AuthorizationService.AccessToken(PLANNER)
        run = client.Furnace.FurnaceProgram(
            Device="", Segments=[ramp(75.0, 20.0), hold(30.0)], metadata=[token]
        )
        wait_until("the program to finish", lambda: run.done)
        assert run.status.name == "finishedSuccessfully", run.status
        exp_id = run.get_responses().ExperimentId
        assert exp_id == uuid_to_ulid(run.execution_uuid)
    finally:
        client.close()
    secured.watch_until(
        lambda e: e.get("audit", {}).get("principal") == PLANNER_PRINCIPAL
        and exp_id in json.dumps(e),
        token=VIEWER,
    )
