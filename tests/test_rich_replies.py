"""Issue 15's rich-reply pieces in the core, through a real bot and a real SDK callback:
a person who changes their name is one RENAMED change (with who they were), not a
departure and an arrival, and the directory follows it."""

from __future__ import annotations

from pathlib import Path

import trio

from oco_core import Callback, Membership
from oco_core._adapter import MembershipKind
from oco_core.testing import open_bot, serving

SECRET = "secret-rich-0123456789abcdef"


def config(tmp_path: Path) -> str:
    return f"""
adapters: [{{type: memory}}]
store: {{url: "sqlite:///{tmp_path}/oco.db"}}
bot: {{name: oco}}
callbacks:
  - {{id: alpha, secret: {SECRET}}}
"""


async def test_a_rename_reaches_callbacks_as_renamed_with_the_previous_user(tmp_path: Path) -> None:
    async with open_bot(config(tmp_path)) as running:
        cb = Callback(id="alpha", secret=SECRET, address=running.address)
        seen: list[Membership] = []
        more = trio.Event()

        @cb.on_membership
        async def member(change: Membership) -> None:
            nonlocal more
            seen.append(change)
            more.set()
            more = trio.Event()

        async with serving(cb):
            await running.adapter.member(MembershipKind.JOINED, "carol", "ops")
            with trio.fail_after(5):
                while not seen:
                    await more.wait()
            await running.adapter.member(MembershipKind.RENAMED, "caroline", "ops", previous="carol")
            with trio.fail_after(5):
                while len(seen) < 2:
                    await more.wait()
            renamed = seen[1]
            assert renamed.kind == "renamed"
            assert renamed.user.id == "memory/caroline"
            assert renamed.previous is not None
            assert (renamed.previous.id, renamed.previous.name) == ("memory/carol", "Carol")
            assert renamed.room.id == "memory/ops"
            assert seen[0].previous is None  # only a rename carries one
            # The directory has the new name in the room, and not the old one.
            members = [u.id for u in await cb.directory.list_users("memory/ops")]
            assert "memory/caroline" in members
            assert "memory/carol" not in members
