"""Approvals (the two-person rule): matches of routes that need approval, and callbacks'
``RequestApproval`` calls, wait until enough people holding a role approve them in chat.

A route needs approval when the operator's rule says so (``callbacks[].route_rules.<id>
.approval``) or the callback declared it (``Route.approval``). The permission gate
(``_policy.MessageGate``) holds such a match back instead of delivering it; here it
becomes a pending request with a short id. The bot says in the room who wants what and
how to answer; ``<bot> approve <id>`` by a holder of the role who is not the asker (nor
one of their linked accounts) counts one approval, ``<bot> deny <id>`` (by a holder, or
the asker withdrawing) ends it. Once ``count`` people approved, the match goes to the
callback carrying ``Event.approval``; after the timeout it is dropped. Every step is
answered in chat and recorded in the audit log (kind ``approval``).

Pending requests live in this bot's memory: a restart drops them (the person asks
again), as it drops matches waiting in streams' queues.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from ._adapter import ChatRoom, ChatUser, IncomingMessage
from ._errors import InvalidRequestError
from ._proto import core_pb2, robot_pb2
from ._router import ApprovalNeed, Queued, Route, _spans, compile_pattern

if TYPE_CHECKING:
    from ._core import BotCore

log = logging.getLogger(__name__)

KIND = "approval"
#: The audit log's decisions for kind ``approval``.
REQUESTED, APPROVE, REFUSED, APPROVED, DENIED, TIMED_OUT, WITHDRAWN = (
    "requested",
    "approve",
    "refused",
    "approved",
    "denied",
    "timed_out",
    "withdrawn",  # a callback's RequestApproval call ended before it was decided
)
_COMMAND = re.compile(r"(?P<cmd>approve|deny)\s+(?P<id>[0-9a-f]{4,8})(?:\s+(?P<reason>.*))?", re.I | re.DOTALL)
HELP = [
    "approve <id> - approve a command waiting for your role's approval",
    "deny <id> [<reason>] - refuse it (or withdraw your own)",
]
Decision = robot_pb2.RequestApprovalResponse.Decision


@functools.lru_cache(maxsize=1024)
def _compiled(pattern: str, ignore_case: bool) -> Any:
    return compile_pattern(pattern, ignore_case)


def _user_pb(user_id: str, name: str = "") -> core_pb2.User:
    return core_pb2.User(id=user_id, name=name, mention_name=name)


@dataclass(eq=False)
class Pending:
    """One request waiting for approval."""

    id: str
    need: ApprovalNeed
    requester: str
    callback_id: str
    what: str
    adapter: str
    #: Where answers go: the message that asked, as its adapter gave it.
    incoming: IncomingMessage
    #: Called once approved, with who approved (delivers a match; wakes an RPC).
    on_approved: Callable[[core_pb2.Approval], None]
    route_id: str = ""
    approvers: list[core_pb2.User] = field(default_factory=list)
    decision: robot_pb2.RequestApprovalResponse.Decision.ValueType = Decision.DECISION_UNSPECIFIED
    reason: str = ""
    done: trio.Event = field(default_factory=trio.Event)

    def approval(self) -> core_pb2.Approval:
        return core_pb2.Approval(id=self.id, role=self.need.role, approvers=self.approvers)


class Approvals:
    """The pending approvals of one running bot."""

    def __init__(self, core: BotCore) -> None:
        self._core = core
        self._pending: dict[str, Pending] = {}

    def pending(self) -> Sequence[Pending]:
        """Requests waiting for approval, oldest first."""
        return list(self._pending.values())

    # -- holding matches -------------------------------------------------------------

    def hold(
        self,
        adapter: str,
        incoming: IncomingMessage,
        message: core_pb2.Message,
        respond_text: str | None,
        held: Sequence[tuple[str, Route, ApprovalNeed]],
    ) -> None:
        """Hold back the matches of ``message`` that the gate found needing approval,
        and ask for it in chat. Never waits."""
        for callback_id, route, need in held:
            text = respond_text if route.respond and respond_text is not None else incoming.body
            regex = _compiled(route.pattern, route.ignore_case)
            data = text.encode("utf-8")
            spans = _spans(regex, data)
            if spans is None:  # cannot happen: the router matched it
                continue
            groups = [data[a:b].decode("utf-8") if a >= 0 else "" for a, b in spans]
            named = {name: groups[i] for name, i in regex.groupindex.items() if spans[i][0] >= 0}
            matched = core_pb2.MatchedMessage(
                message=message,
                pattern=route.pattern,
                route_id=route.id,
                groups=groups,
                named_groups=named,
                direct=True if route.respond else respond_text is not None or incoming.direct,
                text=text,
            )
            deliver = partial(self._deliver, adapter, incoming, callback_id, route, matched)
            self._open(adapter, incoming, message.source.user.id, callback_id, need, text.strip(), deliver, route.id)

    def _deliver(
        self,
        adapter: str,
        incoming: IncomingMessage,
        callback_id: str,
        route: Route,
        matched: core_pb2.MatchedMessage,
        approval: core_pb2.Approval,
    ) -> None:
        core = self._core
        event = core_pb2.Event(matched_message=matched, approval=approval)
        if route.durable_ttl and core.router.keep_durable is not None:
            core.router.keep_durable(callback_id, event, route.durable_ttl)
            return
        queued = Queued(event.ByteSize(), partial(_copy, event))
        if not any(sub.offer(queued) for sub in core.router.subscriptions(callback_id)):
            core.outgoing.reply(
                adapter,
                incoming,
                f"approval {approval.id} came, but the {callback_id} callback is not connected (or is too busy) "
                "to take it: say the command again",
                mention=True,
            )

    # -- asking from a callback ------------------------------------------------------

    async def request(
        self, callback_id: str, message: core_pb2.Message, need: ApprovalNeed, what: str
    ) -> robot_pb2.RequestApprovalResponse:
        """A callback's ``RequestApproval``: ask in the room of ``message`` and wait until
        it is decided (approved, denied or timed out)."""
        user = message.source.user
        adapter, _, native_user = user.id.partition("/")
        if adapter not in self._core.links or not native_user:
            raise InvalidRequestError(
                f"message.source.user.id {user.id!r} names no user on one of the bot's adapters "
                f"({', '.join(self._core.links) or 'none'}): pass the message the callback received"
            )
        room = message.source.room
        chat_room = ChatRoom(room.id.partition("/")[2], room.name) if room.id and not message.private else None
        incoming = IncomingMessage(
            body=message.body,
            user=ChatUser(native_user, user.name, user.mention_name),
            room=chat_room,
            direct=chat_room is None,
            id=message.id.partition("/")[2],
        )
        result: list[core_pb2.Approval] = []
        pending = self._open(
            adapter, incoming, user.id, callback_id, need, what or message.body.strip(), result.append, ""
        )
        try:
            await pending.done.wait()
        finally:
            if not pending.done.is_set():  # the call ended first (deadline, cancelled, callback gone)
                reason = f"approval {pending.id} is no longer needed: the {callback_id} callback stopped waiting"
                self._end(pending, Decision.DECISION_DENIED, reason, WITHDRAWN, "")
                self._core.outgoing.reply(adapter, incoming, reason)
        return robot_pb2.RequestApprovalResponse(
            decision=pending.decision, approval=pending.approval(), reason=pending.reason
        )

    # -- the requests ----------------------------------------------------------------

    def _open(
        self,
        adapter: str,
        incoming: IncomingMessage,
        requester: str,
        callback_id: str,
        need: ApprovalNeed,
        what: str,
        on_approved: Callable[[core_pb2.Approval], None],
        route_id: str,
    ) -> Pending:
        core = self._core
        request_id = secrets.token_hex(2)
        while request_id in self._pending:
            request_id = secrets.token_hex(3)
        shown = what if len(what) <= 200 else what[:197] + "..."
        pending = Pending(request_id, need, requester, callback_id, shown, adapter, incoming, on_approved, route_id)
        self._pending[request_id] = pending
        self._record(pending, REQUESTED, requester, f"{request_id}: {shown}")
        name = core.router.bot_name
        who = "an approver" if need.count == 1 else f"{need.count} approvers"
        core.outgoing.reply(
            adapter,
            incoming,
            f"{incoming.user.name or incoming.user.id} wants to run `{shown}`; {who} ({need.role}) can say "
            f"`{name} approve {request_id}` or `{name} deny {request_id}` (within {_minutes(need.timeout)})",
        )
        core.spawn(partial(self._expire, pending))
        return pending

    async def _expire(self, pending: Pending) -> None:
        with trio.move_on_after(pending.need.timeout):
            await pending.done.wait()
            return
        if pending.done.is_set():
            return
        waited = _minutes(pending.need.timeout)
        got = len(pending.approvers)
        reason = f"approval {pending.id} timed out after {waited} with {got} of {pending.need.count} approvals"
        self._end(pending, Decision.DECISION_TIMED_OUT, reason, TIMED_OUT, "")
        self._core.outgoing.reply(
            pending.adapter, pending.incoming, f"nobody approved `{pending.what}` in time: {reason}", mention=True
        )

    def _end(
        self,
        pending: Pending,
        decision: robot_pb2.RequestApprovalResponse.Decision.ValueType,
        reason: str,
        audit: str,
        user: str,
    ) -> None:
        self._pending.pop(pending.id, None)
        pending.decision = decision
        pending.reason = reason
        pending.done.set()
        self._record(pending, audit, user, f"{pending.id}: {reason or pending.what}")

    def _record(self, pending: Pending, decision: str, user: str, detail: str) -> None:
        room = f"{pending.adapter}/{pending.incoming.room.id}" if pending.incoming.room else ""
        self._core.record(
            KIND,
            decision,
            user=user,
            person=self._core.auth.person(user) if user else "",
            room=room,
            callback=pending.callback_id,
            route=pending.route_id,
            permission=pending.need.role,
            detail=detail,
        )

    # -- chat commands ---------------------------------------------------------------

    def take(self, adapter: str, incoming: IncomingMessage, user_id: str, text: str) -> bool:
        """Answer ``approve <id>`` or ``deny <id> [<reason>]`` (addressed to the bot);
        True when it was one."""
        found = _COMMAND.fullmatch(text.strip())
        if found is None:
            return False
        request_id = found.group("id").lower()
        reason = (found.group("reason") or "").strip()
        answer = self._answer(user_id, found.group("cmd").lower(), request_id, reason)
        self._core.outgoing.reply(adapter, incoming, answer, mention=True)
        return True

    def _answer(self, user_id: str, command: str, request_id: str, reason: str) -> str:
        auth = self._core.auth
        pending = self._pending.get(request_id)
        if pending is None:
            return f"no request {request_id} is waiting for approval (it was decided, timed out, or never was)"
        role = pending.need.role
        asker = auth.person(user_id) == auth.person(pending.requester)
        holds = role in auth.roles(user_id)
        if command == "deny":
            if not (holds or asker):
                self._record(pending, REFUSED, user_id, f"{request_id}: deny without the role {role}")
                return f"only people with the role {role} (or the person who asked) may deny {request_id}"
            by = "withdrawn by the asker" if asker and not holds else f"denied by {user_id}"
            why = f"{by}: {reason}" if reason else by
            self._end(pending, Decision.DECISION_DENIED, f"`{pending.what}` was {why}", DENIED, user_id)
            return f"`{pending.what}` ({request_id}) was {why}; it will not run"
        if asker:
            self._record(pending, REFUSED, user_id, f"{request_id}: the asker may not approve")
            return f"you asked for {request_id}: someone else with the role {role} has to approve it"
        if not holds:
            self._record(pending, REFUSED, user_id, f"{request_id}: approve without the role {role}")
            return f"only people with the role {role} may approve {request_id}"
        if any(auth.person(a.id) == auth.person(user_id) for a in pending.approvers):
            return f"you approved {request_id} already; it needs {pending.need.count - len(pending.approvers)} more"
        user = self._core.directory.users.get(user_id)
        pending.approvers.append(_user_pb(user_id, user.name if user is not None else ""))
        self._record(pending, APPROVE, user_id, f"{request_id}: {pending.what}")
        missing = pending.need.count - len(pending.approvers)
        if missing > 0:
            got = len(pending.approvers)
            return f"approval {got} of {pending.need.count} for {request_id} noted; {missing} more needed"
        approvers = ", ".join(a.id for a in pending.approvers)
        self._end(pending, Decision.DECISION_APPROVED, "", APPROVED, user_id)
        pending.on_approved(pending.approval())
        return f"`{pending.what}` ({request_id}) approved by {approvers}; it runs now"


def _copy(event: core_pb2.Event) -> core_pb2.Event:
    copy = core_pb2.Event()
    copy.CopyFrom(event)
    return copy


def _minutes(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min"


__all__: Sequence[str] = ["HELP", "KIND", "Approvals", "Pending"]
