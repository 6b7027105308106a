"""Markdown replies on IRC: a callback's ``markdown=True`` reply reaches a person on a real
ngircd with IRC's formatting codes (bold, italic, monospace) and links spelled out, never
with raw ``**``, backticks or ``[text](url)``; and the translation itself, case by case."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from oco_adapter_irc._markdown import BOLD, ITALIC, MONOSPACE, STRIKE, markdown_to_irc

from oco_core.testing import run_oco

CALLBACK = """\
from oco_core import Callback, Message

bot = Callback()


@bot.respond(r"^status$", help="status - a formatted status")
async def status(message: Message) -> None:
    await message.send(
        "**deploy** of *prod* with `make all`: see [the log](https://ci.example/7)\\n- one\\n- two",
        markdown=True,
    )


@bot.respond(r"^plain$")
async def plain(message: Message) -> None:
    await message.send("**not markdown**")


bot.run()
"""


@pytest.mark.server("ngircd")
async def test_a_markdown_reply_reaches_irc_formatted_and_a_plain_one_verbatim(kit: Any, tmp_path: Path) -> None:
    script = tmp_path / "formatted.py"
    script.write_text(CALLBACK)
    config = kit.oco_config(tmp_path, f'callbacks:\n  - id: formatted\n    command: ["{sys.executable}", "{script}"]\n')
    async with kit.person("alice") as alice, run_oco(config, tmp_path / "bot"):
        await alice.expect(r":oco!\S+ JOIN :?#test", timeout=30)
        since, first = await alice.ask_until("#test", "oco: status", r"PRIVMSG #test :.*deploy.*")
        assert first.group(0).endswith(
            f"{BOLD}deploy{BOLD} of {ITALIC}prod{ITALIC} with {MONOSPACE}make all{MONOSPACE}: "
            "see the log (https://ci.example/7)"
        ), first.group(0)
        await alice.expect(r"PRIVMSG #test :- one$", since=since)
        await alice.expect(r"PRIVMSG #test :- two$", since=since)
        assert not alice.find(r"PRIVMSG #test :.*(\*\*|`|\]\()", since=since)
        # A plain reply is the callback's text as written: its asterisks are its own.
        since = alice.mark()
        await alice.say("#test", "oco: plain")
        await alice.expect(r"PRIVMSG #test :\*\*not markdown\*\*$", since=since)


@pytest.mark.parametrize(
    ("markdown", "irc"),
    [
        ("**PONG**", f"{BOLD}PONG{BOLD}"),
        ("__bold__ and _it_", f"{BOLD}bold{BOLD} and {ITALIC}it{ITALIC}"),
        ("~~gone~~", f"{STRIKE}gone{STRIKE}"),
        ("# Title\nbody", f"{BOLD}Title{BOLD}\nbody"),
        ("[docs](https://x.org/a) or <https://y.org>", "docs (https://x.org/a) or https://y.org"),
        ("![graph](https://x.org/g.png)", "graph (https://x.org/g.png)"),
        ("- one\n- two\n\n3. c\n4. d", "- one\n- two\n3. c\n4. d"),
        ("```\nls -l\n\necho `hi`\n```", f"{MONOSPACE}ls -l{MONOSPACE}\n\n{MONOSPACE}echo `hi`{MONOSPACE}"),
        ("> quoted **b**", f"> quoted {BOLD}b{BOLD}"),
        (r"2 \* 3 \* 4", "2 * 3 * 4"),
        ("<b>raw</b>", "<b>raw</b>"),
        # A style across a line break is closed and opened again: IRC ends it per line.
        ("**two\nlines**", f"{BOLD}two{BOLD}\n{BOLD}lines{BOLD}"),
        ("- **a\n  b**", f"- {BOLD}a{BOLD}\n  {BOLD}b{BOLD}"),
    ],
)
def test_markdown_becomes_irc_formatting(markdown: str, irc: str) -> None:
    assert markdown_to_irc(markdown) == irc
