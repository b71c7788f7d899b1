"""The asyncio client (grpc.aio) against a real `ppud dev`."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from conftest import Daemon, TcpProxy
from ppu_client import (
    AsyncClient,
    Experiment,
    FailedPreconditionError,
    Hold,
    InvalidArgumentError,
    Ramp,
    State,
    StepTo,
    furnace,
    pb,
)

TIMEOUT_S = 120.0


def test_async_submit_results_events_cancel(daemon: Daemon, proxy: TcpProxy) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.addr) as c, AsyncClient(proxy.addr) as via_proxy:
            assert any(d.id == "furnace-1" for d in await c.devices())

            exps = [
                Experiment(f"aio-{t}", [furnace(Ramp(t, 20.0), Hold(120.0), StepTo(60.0))])
                for t in (115.0, 135.0)
            ]
            batch = await c.submit_batch(exps)
            assert (await c.submit_batch(exps)).duplicate

            # Follow the batch's events through a link that is cut mid-stream, concurrently
            # with collecting its results.
            async def follow() -> list[pb.Event]:
                got: list[pb.Event] = []
                pending = set(batch.experiment_ids)
                cut = False
                async for ev in via_proxy.events(0, batch_id=batch.id, timeout=TIMEOUT_S):
                    got.append(ev)
                    if not cut and ev.WhichOneof("kind") == "step_started":
                        assert proxy.cut() >= 1
                        cut = True
                    if (
                        ev.WhichOneof("kind") == "experiment_state_changed"
                        and State(ev.experiment_state_changed.to).terminal
                    ):
                        pending.discard(ev.experiment_id)
                        if not pending:
                            return got
                return got

            follower = asyncio.create_task(follow())
            results = [r async for r in c.results(batch, timeout=TIMEOUT_S)]
            assert sorted(r.id for r in results) == sorted(batch.experiment_ids)
            assert all(r.state is State.SUCCEEDED for r in results)
            assert all(len(r.furnace_results()) == 1 for r in results)

            followed = await asyncio.wait_for(follower, TIMEOUT_S)
            seqs = [e.sequence for e in followed]
            assert seqs == sorted(set(seqs)), "gap or duplicate after the cut"
            direct = []
            async for ev in c.events(0, batch_id=batch.id, timeout=TIMEOUT_S):
                direct.append(ev.sequence)
                if ev.sequence == seqs[-1]:
                    break
            assert direct == seqs
            assert proxy.accepted >= 2

            listed = [r.id async for r in c.list(batch=batch)]
            assert listed == list(batch.experiment_ids)
            assert (await c.get(listed[0])).name == "aio-115.0"
            assert [r.name for r in await c.wait(batch.id)] == ["aio-115.0", "aio-135.0"]

            with pytest.raises(InvalidArgumentError) as ei:
                await c.submit_batch([Experiment("bad", [furnace(Ramp(100.0, 500.0))])])
            assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert (
                ei.value.field_path
                == "experiments[0].steps[0].furnace.segments[0].ramp.rate_c_per_min"
            )

            long = await c.submit_batch(
                [Experiment("aio-long", [furnace(StepTo(40.0), Hold(48 * 3600.0))])]
            )
            (long_id,) = long.experiment_ids
            async for ev in c.events(0, experiment_id=long_id, timeout=TIMEOUT_S):
                if ev.WhichOneof("kind") == "step_started":
                    break
            await c.cancel(long_id, reason="async cancel")
            (done,) = [r async for r in c.results(long, timeout=TIMEOUT_S)]
            assert done.state is State.CANCELLED
            with pytest.raises(FailedPreconditionError):
                await c.cancel(long_id)

    asyncio.run(main())
