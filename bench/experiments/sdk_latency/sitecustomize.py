"""Times one event inside the SDK callback process of bench/_transport_chat.py: when its
EventBatch leaves grpc's asyncio thread, reaches trio, and when the reply's batch leaves
trio and reaches the asyncio thread again. Put this directory first on PYTHONPATH (the
bot's process ignores it); the times go to $OCO_PROBE_OUT (default sdk_latency.json).
See ../README.md."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

if any("_transport_clients.py" in arg for arg in sys.argv):
    from oco_core import _bridge
    from oco_core._proto import robot_pb2

    times: dict[str, list[int]] = {"a_in": [], "t_recv": [], "t_send": [], "a_out": []}

    def dump() -> None:
        with open(os.environ.get("OCO_PROBE_OUT", "sdk_latency.json"), "w") as out:
            json.dump(times, out)

    crossing_in = _bridge._AsyncioToTrio.send
    taken_in = _bridge._AsyncioToTrio._took
    crossing_out = _bridge._TrioToAsyncio.send
    taken_out = _bridge._TrioToAsyncio.get

    async def send_in(self: Any, item: Any) -> None:
        if isinstance(item, robot_pb2.EventBatch):
            times["a_in"].append(time.perf_counter_ns())
        await crossing_in(self, item)

    def took_in(self: Any, item: Any) -> Any:
        if isinstance(item, robot_pb2.EventBatch):
            times["t_recv"].append(time.perf_counter_ns())
        return taken_in(self, item)

    async def send_out(self: Any, item: Any) -> None:
        if isinstance(item, robot_pb2.SendMessagesBatch):
            times["t_send"].append(time.perf_counter_ns())
        await crossing_out(self, item)

    async def took_out(self: Any) -> Any:
        item = await taken_out(self)
        if isinstance(item, robot_pb2.SendMessagesBatch):
            times["a_out"].append(time.perf_counter_ns())
            if len(times["a_out"]) % 50 == 0:
                dump()
        return item

    _bridge._AsyncioToTrio.send = send_in  # type: ignore[method-assign]
    _bridge._AsyncioToTrio._took = took_in  # type: ignore[method-assign]
    _bridge._TrioToAsyncio.send = send_out  # type: ignore[method-assign]
    _bridge._TrioToAsyncio.get = took_out  # type: ignore[method-assign]
