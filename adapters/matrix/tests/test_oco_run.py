"""End to end: a real ``oco run`` process with the Matrix adapter and the bundled example
callback; a person on Synapse says ``oco: ping`` and gets ``PONG``, in a plain and in an
encrypted room."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nio  # type: ignore[import-untyped]  # nio ships no type information
import pytest

from oco_core.testing import run_oco

pytestmark = [pytest.mark.server("synapse"), pytest.mark.slow]


def is_pong(event: Any) -> bool:
    """The bundled callback's answer, as the bot sends it (an ``m.notice``)."""
    return isinstance(event, nio.RoomMessageNotice) and event.body == "PONG"


async def test_oco_ping_over_matrix(synapse: Any, person: Any, make_bot: Any, tmp_path: Path) -> None:
    bot = make_bot()
    options = {key: value for key, value in bot.options.items() if key != "password"}
    # The password comes from the environment, as an operator's would.
    options["password"] = "${OCO_MATRIX_PASSWORD}"
    config = {
        "bot": {"name": "oco"},
        "adapters": [{"type": "matrix", **options}],
        "store": {"url": f"sqlite:///{tmp_path / 'oco.db'}"},
        "grpc": {"listen": "127.0.0.1:0"},
        "callbacks": [{"id": "example", "command": [sys.executable, "-m", "oco_core.examples.ping"]}],
    }
    async with run_oco(json.dumps(config), tmp_path / "bot", env={"OCO_MATRIX_PASSWORD": bot.password}) as oco:
        await oco.expect(r"callback 'example' is listening", stream="stderr", timeout=60)
        plain = await bot.room_with(person, in_process=False)
        await person.say(plain, "oco: ping")
        first = await person.wait_for_message(bot.user_id, plain, is_pong)
        # In a thread, the answer goes into the thread.
        root = await person.say(plain, "release notes")
        asked = await person.say(plain, "oco: ping", **{"m.relates_to": {"rel_type": "m.thread", "event_id": root}})
        threaded = await person.wait_for_message(bot.user_id, plain, lambda e: is_pong(e) and e is not first)
        assert threaded.source["content"]["m.relates_to"]["event_id"] == root
        assert threaded.source["content"]["m.relates_to"]["m.in_reply_to"] == {"event_id": asked}
        # An edit is not a new command: no third PONG.
        await person.say(
            plain,
            "* oco: ping",
            **{
                "m.new_content": {"msgtype": "m.text", "body": "oco: ping"},
                "m.relates_to": {"rel_type": "m.replace", "event_id": asked},
            },
        )
        encrypted = await bot.room_with(person, encrypted=True, in_process=False)
        await person.say(encrypted, "oco: ping")
        reply = await person.wait_for_message(bot.user_id, encrypted, is_pong)
        assert reply.decrypted
        assert len([e for e in person.messages_from(bot.user_id, plain) if is_pong(e)]) == 2
    output = "\n".join(oco.stderr_lines + oco.stdout_lines)
    assert bot.password not in output, "the password leaked"
    assert "syt_" not in output, "an access token leaked"  # Synapse's tokens start so
