"""The bot talks back: a command nobody takes gets an answer (with the closest known
command), a command whose callback is not running says so, and overheard messages stay
unanswered. A bot in this process with the memory adapter, callbacks over real gRPC."""

from __future__ import annotations

from pathlib import Path

import trio

from oco_core import Callback, Message
from oco_core.testing import RunningBot, open_bot, serving

WEATHER = "secret-weather-0123456789abc"
DEPLOY = "secret-deploy-0123456789abcd"


def config(tmp_path: Path, bot: str = "") -> str:
    return f"""
bot: {{name: oco{bot}}}
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
callbacks:
  - {{id: weather, secret: {WEATHER}}}
  - id: deploy
    secret: {DEPLOY}
    routes: [{{pattern: "^deploy (\\\\w+)$", respond: true, help: "deploy <app> - ship it"}}]
"""


def weather_callback(running: RunningBot) -> Callback:
    cb = Callback(id="weather", secret=WEATHER, address=running.address)

    @cb.respond(r"^weather (\w+)$", help="weather <city> - today's forecast")
    async def weather(message: Message) -> None:
        await message.reply(f"sunny in {message.match(1)}")

    @cb.hear(r"(?i)\bthanks\b")
    async def thanks(message: Message) -> None:
        await message.send("you're welcome!")

    return cb


async def say(running: RunningBot, body: str, room: str | None = "general") -> str:
    await running.adapter.inject(body, room=room)
    with trio.fail_after(10):
        return (await running.adapter.next_sent()).body


async def test_an_unknown_command_gets_the_closest_known_one(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = weather_callback(running)
        async with serving(cb):
            assert await say(running, "oco weathr paris") == (
                "no command matches 'weathr paris'; did you mean `oco weather <city>`? say `oco help` for all"
            )
            # The bot's own commands are known too.
            assert await say(running, "oco rolse") == (
                "no command matches 'rolse'; did you mean `oco roles [<user>]`? say `oco help` for all"
            )
            assert await say(running, "oco make me a sandwich") == (
                "no command matches 'make me a sandwich'; say `oco help` for what I can do"
            )
            # In private, where the bot's name is optional, too.
            assert await say(running, "wether paris", room=None) == (
                "no command matches 'wether paris'; did you mean `oco weather <city>`? say `oco help` for all"
            )
            assert await say(running, "oco weather paris") == "sunny in paris"
            # Answers in a room mention the person who asked; in private there is no need.
            assert [sent.mention for sent in running.adapter.sent] == [True, True, True, False, True]


async def test_overheard_messages_and_commands_that_matched_get_no_unknown_reply(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = weather_callback(running)
        async with serving(cb):
            # Not addressed to the bot: nothing, even though it is no command.
            await running.adapter.inject("make me a sandwich")
            # Addressed, matched by a hear route only: the callback answers, the bot does not.
            assert await say(running, "oco thanks") == "you're welcome!"
            # `help` is the bot's own.
            assert (await say(running, "oco help weather")).startswith("weather <city>")
            # What came after each is its own answer: nothing was said in between.
            assert await say(running, "oco weather oslo") == "sunny in oslo"
            assert [m.body for m in running.adapter.sent] == [
                "you're welcome!",
                "weather <city> - today's forecast",
                "sunny in oslo",
            ]


async def test_the_reply_to_unknown_commands_can_be_turned_off(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path, bot=", unknown_command_reply: false")) as running:
        cb = weather_callback(running)
        async with serving(cb):
            await running.adapter.inject("oco weathr paris")
            assert await say(running, "oco weather paris") == "sunny in paris"
            assert [m.body for m in running.adapter.sent] == ["sunny in paris"]


async def test_a_command_whose_callback_is_not_running_says_so(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        # Declared by the operator in config, never connected.
        assert await say(running, "oco deploy api") == (
            "the deploy callback is not running: it is not connected to the bot"
        )
        cb = weather_callback(running)
        async with serving(cb):
            assert await say(running, "oco weather paris") == "sunny in paris"
        # Its routes are remembered after it leaves, until it comes back.
        with trio.fail_after(10):
            while running.bot.core.router.subscriptions("weather"):
                await trio.sleep(0.01)
        assert await say(running, "oco weather paris") == (
            "the weather callback is not running: it is not connected to the bot"
        )
        async with serving(weather_callback(running)):
            assert await say(running, "oco weather rome") == "sunny in rome"
