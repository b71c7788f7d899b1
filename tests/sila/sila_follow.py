"""Following an observable command's ExecutionInfo on the raw SiLA stream, so a test sees
every update ppud sends (the `sila2` client keeps only the latest one)."""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

from sila2.client import SilaClient

STATUS = {0: "waiting", 1: "running", 2: "finishedSuccessfully", 3: "finishedWithError"}


@dataclass
class Info:
    status: str
    progress: float | None
    remaining_s: float | None


def follow(
    client: SilaClient, feature: str, command: str, execution_uuid: Any, timeout: float
) -> list[Info]:
    """Subscribes to `<command>_Info` for one execution and returns every ExecutionInfo up to
    and including the first finished one (the stream's end or a deadline fails the test)."""
    f = getattr(client, feature)
    pb2 = f._pb2_module.SiLAFramework__pb2
    stream = getattr(f._grpc_stub, f"{command}_Info")(
        pb2.CommandExecutionUUID(value=str(execution_uuid))
    )
    got: queue.Queue[Info | BaseException | None] = queue.Queue()

    def pump() -> None:
        try:
            for msg in stream:
                info = Info(
                    STATUS[msg.commandStatus],
                    msg.progressInfo.value if msg.HasField("progressInfo") else None,
                    (
                        msg.estimatedRemainingTime.seconds
                        + msg.estimatedRemainingTime.nanos / 1e9
                        if msg.HasField("estimatedRemainingTime")
                        else None
                    ),
                )
                got.put(info)
                if info.status.startswith("finished"):
                    break
        except BaseException as e:  # noqa: BLE001 (handed to the test)
            got.put(e)
        got.put(None)

    threading.Thread(target=pump, daemon=True).start()
    infos: list[Info] = []
    try:
        while True:
            item = got.get(timeout=timeout)
            if isinstance(item, BaseException):
                raise AssertionError(f"{command}_Info failed: {item!r}") from item
            if item is None:
                break
            infos.append(item)
    except queue.Empty:
        raise AssertionError(
            f"{command} {execution_uuid} did not finish within {timeout} s; infos: {infos}"
        ) from None
    finally:
        stream.cancel()
    assert infos, f"{command}_Info ended without any ExecutionInfo"
    assert infos[-1].status.startswith("finished"), f"{command}_Info ended early: {infos}"
    return infos


def uuid_to_ulid(u: Any) -> str:
    """The experiment ULID (Crockford base32, 26 chars) of a CommandExecutionUUID: the same 128
    bits."""
    n = int(str(u).replace("-", ""), 16)
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    return "".join(alphabet[(n >> (5 * i)) & 31] for i in reversed(range(26)))
