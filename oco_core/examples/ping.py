"""The bundled example callback: ``ping``, ``echo <text>`` and a counter kept in storage.

The bot launches it by default; by hand: ``OCO_ADDRESS=127.0.0.1:50051 OCO_CALLBACK_ID=example
OCO_SECRET=... python -m oco_core.examples.ping``.
"""

from __future__ import annotations

from oco_core import Callback, Message

bot = Callback()


@bot.respond(r"^ping$", help="ping - replies PONG", ignore_case=True)
async def ping(message: Message) -> None:
    """Answer ping with PONG."""
    await message.send("PONG")


@bot.respond(r"^echo (?P<text>.+)$", help="echo <text> - says <text> back")
async def echo(message: Message) -> None:
    """Say the text back."""
    await message.send(message.match("text"))


@bot.respond(r"^count$", help="count - counts how often it was asked, in the callback's storage")
async def count(message: Message) -> None:
    """Increment a counter with compare-and-set and say its value."""
    value = await bot.storage.update("count", lambda old: str(int(old or b"0") + 1).encode())
    await message.reply(f"counted {value.decode()} time(s)")


if __name__ == "__main__":
    bot.run()
