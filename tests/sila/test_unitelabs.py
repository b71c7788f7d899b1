"""A second, independent SiLA 2 client library (`unitelabs-sila`, its asyncio `Client`) reads
ppud's features and runs commands: an unobservable one and an observable one whose status it
follows to the end."""

from __future__ import annotations

import asyncio

from conftest import TIMEOUT_S, Daemon
from sila.client import Client, ClientConfig
from test_commands import ramp


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

            furnace = client.feature("Furnace", originator="ppu")
            execution = await furnace.FurnaceProgram(Device="furnace-2", Segments=[ramp(75.0, 20.0)])
            statuses = []
            async for status in await execution.subscribe_status():
                statuses.append(status)
            assert execution.done, statuses
            responses = await execution.get_responses()
            assert responses.Targets[0].TemperatureC == 75.0, responses

            queue = client.feature("ExperimentQueue")
            got = await queue.GetExperiment(ExperimentId=responses.ExperimentId)
            assert "SUCCEEDED" in got.State.upper(), got
            assert got.StepCount == 1, got
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(main(), TIMEOUT_S * 2))
