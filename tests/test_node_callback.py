"""The Node.js example callback (examples/node) end to end through a real `oco run`.

Its npm dependencies are installed with `npm ci` from the committed package-lock.json
into a copy of the example, and its .proto files are written by `oco proto --out`, as
its README says. Without node or npm the tests skip (fail where OCO_REQUIRE_SERVERS=1).
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio

from oco_core.testing import Lines, free_port, run_oco

pytestmark = pytest.mark.server("node")

SECRET = "node-callback-secret-0123456789"


async def test_launched_by_the_bot(node_example: Path, tmp_path: Path) -> None:
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:0"}}
callbacks:
  - id: node
    command: ["node", "{node_example / "callback.js"}"]
"""
    async with run_oco(config, tmp_path) as bot:
        await bot.write("oco ping")
        await bot.expect(r"^PONG from Node\.js$")
        await bot.write("hello node, how are you?")
        await bot.expect(r"^hello alice, from Node\.js v\d+")
        await bot.write("oco count")
        await bot.expect(r"^alice: node counter is 1$")
        await bot.write("oco: count 41")
        await bot.expect(r"^alice: node counter is 42$")
        await bot.write("oco help count")
        await bot.expect(r"^count \[n\] - adds n")
        await bot.expect(r"\[node-callback node\] connected to .*: 3 route\(s\) registered", stream="stderr")


async def test_started_by_hand_reconnects_when_the_bot_restarts(node_example: Path, tmp_path: Path) -> None:
    port = free_port()
    config = f"""
adapters: [{{type: shell, user: alice}}]
store: {{url: "sqlite:///./oco.db"}}
grpc: {{listen: "127.0.0.1:{port}"}}
callbacks:
  - {{id: node, secret: "{SECRET}"}}
"""
    env = {**os.environ, "OCO_ADDRESS": f"127.0.0.1:{port}", "OCO_CALLBACK_ID": "node", "OCO_SECRET": SECRET}
    registered = r"connected to .*: 3 route\(s\) registered"
    stderr = Lines("the node callback's stderr")
    async with run_oco(config, tmp_path / "bot") as bot:
        callback = await trio.lowlevel.open_process(
            ["node", str(node_example / "callback.js")], env=env, stderr=subprocess.PIPE
        )
        try:
            async with trio.open_nursery() as nursery:
                assert callback.stderr is not None
                nursery.start_soon(stderr.pump, callback.stderr)
                await stderr.wait_for(registered)
                await bot.write("oco count")
                await bot.expect(r"^alice: node counter is 1$")
                await bot.stop()
                await stderr.wait_for(r"Listen stream ended")

                # The same bot again, on the same port and with the same store.
                async with run_oco(config, tmp_path / "bot") as again:
                    await stderr.wait_for(registered, count=2)
                    await again.write("oco ping")
                    await again.expect(r"^PONG from Node\.js$")
                    await again.write("oco count")
                    await again.expect(r"^alice: node counter is 2$")
                callback.send_signal(signal.SIGTERM)
                with trio.fail_after(10):
                    assert await callback.wait() == 0
        finally:
            if callback.returncode is None:
                callback.kill()
                with trio.CancelScope(shield=True):
                    await callback.wait()
