"""Playing chat users of a bot in another process, through its memory adapter's control
service (``adapters: [{type: memory, control: "127.0.0.1:0"}]``, control.proto)."""

from __future__ import annotations

import grpc
import trio

from .._proto import control_pb2, control_pb2_grpc


class ControlChat:
    """Writes messages as chat users and reads the bot's answers, in one room."""

    def __init__(self, address: str, *, user: str = "alice", room: str = "general") -> None:
        self.address = address
        self.user = user
        self.room = room
        #: The position of the last message of the bot's already read.
        self.seen = 0
        #: Every line of the bot's that :meth:`say_as` and :meth:`wait_for` have read.
        self.lines: list[str] = []

    def _inject(self, body: str, user: str, room: str) -> None:
        with grpc.insecure_channel(self.address) as channel:
            control = control_pb2_grpc.MemoryControlStub(channel)
            control.Inject(control_pb2.InjectRequest(body=body, user=user, room=room), timeout=10)

    def _read(self, wait: float) -> list[str]:
        with grpc.insecure_channel(self.address) as channel:
            control = control_pb2_grpc.MemoryControlStub(channel)
            sent = control.ListSent(
                control_pb2.ListSentRequest(after=self.seen, wait_ms=int(wait * 1000)), timeout=wait + 10
            )
        if sent.messages:
            self.seen = sent.messages[-1].seq
        return [m.body for m in sent.messages]

    def _say(self, body: str, user: str, wait: float) -> list[str]:
        self._inject(body, user, self.room)
        return self._read(wait)

    async def say_as(
        self, user: str, body: str, *, until: str, room: str | None = None, timeout: float = 15.0
    ) -> list[str]:
        """``user`` writes ``body`` (in ``room``, by default this chat's; "" for a private
        message); every line the bot says, up to the first that contains ``until``."""
        await trio.to_thread.run_sync(self._inject, body, user, self.room if room is None else room)
        return await self.wait_for(until, timeout=timeout, after=body)

    async def wait_for(self, until: str, *, timeout: float = 15.0, after: str = "") -> list[str]:
        """Every line the bot says from here, up to the first that contains ``until``;
        AssertionError with the lines read when none does within ``timeout`` seconds."""
        lines: list[str] = []
        with trio.move_on_after(timeout):
            while not any(until in line for line in lines):
                lines += await trio.to_thread.run_sync(self._read, 2.0)
            self.lines += lines
            return lines
        self.lines += lines
        said = f" after {after!r}" if after else ""
        raise AssertionError(f"no line with {until!r} within {timeout} s{said}: {lines!r}")

    async def say(self, body: str, *, user: str | None = None, wait: float = 10.0) -> str:
        """Write ``body`` as ``user`` (by default this chat's); the bot's first answer,
        "" when none comes within ``wait`` seconds."""
        answers = await trio.to_thread.run_sync(self._say, body, user or self.user, wait)
        return answers[0] if answers else ""

    async def until(self, body: str, expected: str, *, user: str | None = None, timeout: float = 15.0) -> None:
        """Say ``body`` until the answer contains ``expected`` (a change reaching the
        bot), or fail after ``timeout`` seconds with the last answers."""
        answers: list[str] = []
        with trio.move_on_after(timeout):
            while True:
                answers.append(await self.say(body, user=user, wait=5))
                if expected in answers[-1]:
                    return
                await trio.sleep(0.3)
        raise AssertionError(f"no answer to {body!r} had {expected!r} within {timeout} s: {answers[-5:]!r}")
