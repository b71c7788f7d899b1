"""A second, independent SiLA 2 client library (`unitelabs-sila`, its asyncio `Client`) reads
ppud's features and runs commands: an unobservable one and an observable one whose status it
follows to the end."""

from __future__ import annotations

import asyncio

from conftest import TIMEOUT_S, Daemon
from sila.client import Client, ClientConfig


def test_unitelabs_client_runs_commands(daemon: Daemon) -> None:
    async def main() -> None:
        client = Client(
            ClientConfig(
                hostname=daemon.sila_host,
                port=daemon.sila_port,
                tls=False,
                default_timeout=TIMEOUT_S * 1000,
            )
        )
        await client.open()
        try:
            assert await client.get_server_uuid()
            loaded = {str(f.fully_qualified_identifier) for f in client.features.values()}
            assert {"ppu/devices/Furnace/v1", "ppu/queue/ExperimentQueue/v1"} <= loaded, loaded

            # ppud's AuthorizationService says its AccessToken affects every command, and this
            # library insists on it (open ppud: any token is an admin).
            auth = client.feature("AuthorizationService")
            token = await auth.AccessToken.from_native(client, "ppu_open")
            furnace = client.feature("Furnace", originator="ppu")
            execution = await furnace.FurnaceProgram(
                Device="furnace-2",
                Segments=[segment("Ramp", {"TemperatureC": 75.0, "RateCPerMin": 20.0})],
                metadata=[token],
            )
            statuses = []
            async for status in await execution.subscribe_status():
                statuses.append(status)
            assert execution.done, statuses
            responses = await execution.get_responses()
            assert responses.Targets[0].TemperatureC == 75.0, responses

            queue = client.feature("ExperimentQueue")
            got = await queue.GetExperiment(ExperimentId=responses.ExperimentId, metadata=[token])
            assert "SUCCEEDED" in got.State.upper(), got
            assert got.StepCount == 1, got
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S * 2))


def segment(kind: str, value: dict) -> dict:
    """A FurnaceSegment for unitelabs-sila: Structures are dicts, the oneof's variants Lists
    of at most one item."""
    return {k: ([value] if k == kind else []) for k in ("Ramp", "Hold", "Step")}
