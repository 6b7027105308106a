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

    def _say(self, body: str, user: str, wait: float) -> list[str]:
        with grpc.insecure_channel(self.address) as channel:
            control = control_pb2_grpc.MemoryControlStub(channel)
            control.Inject(control_pb2.InjectRequest(body=body, user=user, room=self.room), timeout=10)
            sent = control.ListSent(
                control_pb2.ListSentRequest(after=self.seen, wait_ms=int(wait * 1000)), timeout=wait + 10
            )
        if sent.messages:
            self.seen = sent.messages[-1].seq
        return [m.body for m in sent.messages]

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
