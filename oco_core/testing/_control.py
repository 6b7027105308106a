"""The memory adapter's control service (``oco.MemoryControl``, proto/oco/control.proto).

Test-only. A bot serves it when a memory adapter's config names an address::

    adapters:
      - type: memory
        control: 127.0.0.1:0                    # port 0 picks a free port
        control_address_file: control.address   # optional: where to write the real address

Another process (``oco conformance --control HOST:PORT``, or a test in any language) then
plays the chat users: ``Inject`` delivers a message as if a user wrote it, ``ListSent``
shows what the bot sent. It has no authentication, so bind it to a loopback address.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import trio

from .._adapter import Attachment, MembershipKind, OutgoingMessage
from .._bridge import CallInfo, Method, RpcAbort, open_bridge
from .._errors import AdapterError
from .._proto import control_pb2, core_pb2

if TYPE_CHECKING:
    from . import MemoryAdapter

log = logging.getLogger(__name__)

SERVICE = "oco.MemoryControl"
#: The longest a ListSent call waits for a message, whatever it asks for.
MAX_WAIT_MS = 60_000
_POLL_SECONDS = 0.005


def _sent(seq: int, message: OutgoingMessage, message_id: str) -> control_pb2.SentMessage:
    return control_pb2.SentMessage(
        seq=seq,
        body=message.body,
        room=message.room_id or "",
        user=message.user.id if message.user is not None else "",
        mention=message.mention,
        private=message.private or message.room_id is None,
        in_reply_to=message.in_reply_to,
        markdown=message.format == "markdown",
        action=message.action,
        id=message_id,
        thread_id=message.thread_id,
        attachments=[
            core_pb2.Attachment(name=a.name, media_type=a.media_type, url=a.url, data=a.data, size=a.size)
            for a in message.attachments
        ],
        edit_of=message.edit_of,
        reaction=message.reaction,
        typing_seconds=message.typing_seconds,
    )


class ControlService:
    """The trio implementation of ``oco.MemoryControl`` for one memory adapter."""

    def __init__(self, adapter: MemoryAdapter) -> None:
        self.adapter = adapter

    async def inject(self, request: control_pb2.InjectRequest, info: CallInfo) -> control_pb2.InjectResponse:
        """Deliver a message from a user, as the chat service would."""
        if not request.user:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "InjectRequest.user is empty: say who writes")
        await self.adapter.inject(
            request.body,
            user=request.user,
            room=request.room or None,
            direct=request.direct,
            id=request.id,
            edit_of=request.edit_of,
            thread_id=request.thread_id,
            attachments=[
                Attachment(name=a.name, media_type=a.media_type, url=a.url, data=a.data, size=a.size or len(a.data))
                for a in request.attachments
            ],
        )
        return control_pb2.InjectResponse()

    async def inject_reaction(
        self, request: control_pb2.InjectReactionRequest, info: CallInfo
    ) -> control_pb2.InjectResponse:
        """Deliver a reaction from a user, as the chat service would."""
        if not request.user or not request.message_id or not request.key:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, "InjectReactionRequest needs user, message_id and key")
        await self.adapter.react(request.key, request.message_id, user=request.user, room=request.room or None)
        return control_pb2.InjectResponse()

    async def inject_membership(
        self, request: control_pb2.InjectMembershipRequest, info: CallInfo
    ) -> control_pb2.InjectResponse:
        """Report a user entering, leaving or renamed in a room."""
        try:
            kind = MembershipKind(request.kind)
        except ValueError:
            raise RpcAbort(grpc.StatusCode.INVALID_ARGUMENT, f"unknown membership kind {request.kind}") from None
        if not request.user or (kind is MembershipKind.RENAMED) != bool(request.previous):
            raise RpcAbort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "InjectMembershipRequest needs user, and previous exactly when kind is KIND_RENAMED",
            )
        await self.adapter.member(kind, request.user, request.room or "general", previous=request.previous or None)
        return control_pb2.InjectResponse()

    async def list_sent(self, request: control_pb2.ListSentRequest, info: CallInfo) -> control_pb2.ListSentResponse:
        """What the bot sent after ``request.after``, waiting up to ``wait_ms`` for one."""
        sent = self.adapter.sent
        # The adapter only appends to `sent`, so a position is its index plus one. Polling
        # keeps this test-only service out of the adapter's send path.
        with trio.move_on_after(min(request.wait_ms, MAX_WAIT_MS) / 1000):
            while len(sent) <= request.after:
                await trio.sleep(_POLL_SECONDS)
        return control_pb2.ListSentResponse(
            messages=[_sent(i + 1, m, self.adapter.sent_ids[i]) for i, m in enumerate(sent) if i >= request.after]
        )

    def table(self) -> dict[str, dict[str, Method]]:
        """The service's methods, for :meth:`~oco_core._bridge.Bridge.serve`."""

        def m(impl: Any, request: Any, response: Any) -> Method:
            return Method("unary", impl, request.FromString, response.SerializeToString)

        return {
            SERVICE: {
                "Inject": m(self.inject, control_pb2.InjectRequest, control_pb2.InjectResponse),
                "ListSent": m(self.list_sent, control_pb2.ListSentRequest, control_pb2.ListSentResponse),
                "InjectReaction": m(
                    self.inject_reaction, control_pb2.InjectReactionRequest, control_pb2.InjectResponse
                ),
                "InjectMembership": m(
                    self.inject_membership, control_pb2.InjectMembershipRequest, control_pb2.InjectResponse
                ),
            }
        }


async def serve_control(
    adapter: MemoryAdapter,
    listen: str,
    address_file: Path | None = None,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``adapter``'s control service on ``listen`` until cancelled; ``task_status``
    gets the bound address, which is also written to ``address_file`` when given."""
    service = ControlService(adapter)
    async with open_bridge() as bridge:
        try:
            server = await bridge.serve(listen, service.table(), health_services=[SERVICE])
        except OSError as exc:
            raise AdapterError(f"memory adapter: cannot serve its control service on {listen}: {exc}") from None
        address = f"{listen.rpartition(':')[0]}:{server.port}"
        if address_file is not None:
            address_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = address_file.with_name(address_file.name + ".tmp")
            tmp.write_text(address + "\n")
            tmp.replace(address_file)
        log.warning("memory adapter: test-only control service (no authentication) on %s", address)
        try:
            task_status.started(address)
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await bridge.stop(server, 0)
