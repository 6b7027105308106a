"""The console's audit and people pages.

Audit (``/console/audit``): the audit log with ``oco audit``'s filters (``since``,
``user``, ``callback``, ``kind``, ``decision``; the same :class:`~.._audit.AuditQuery`
and :func:`~.._audit.query`, so the page and the command cannot disagree), newest first,
:data:`PAGE_SIZE` a page. ``/console/audit/stream`` sends records that match as they
reach the store: it reads the store every :data:`AUDIT_POLL` seconds rather than
listening to this bot's audit queue, so records written by ``oco roles``, by another
bot on the same store (``ha:``) or after a store outage show too. It starts where the
page's read stopped (``after`` and ``shown`` in its URL): a record written between the
page and the stream comes once, and the page's rows not again.

People (``/console/people``): who holds which role, from the store (granted in chat,
by ``oco roles`` or here) and the config (``auth.admins``, ``auth.default_roles``).
Admin tokens grant and revoke through the same :class:`~.._auth.Authorization` calls
as chat and ``oco roles``, audited (kind ``admin``) as ``console:<token name>``; a
running bot's chat sees the change at once, other bots on the store within
:data:`~.._auth.RELOAD_SECONDS`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import urlencode

import trio

from .._admin import local_time
from .._audit import ALLOWED, AuditQuery, AuditRecord, query
from .._auth import ADMIN_ROLE
from .._cli import AUDIT_DECISIONS, AUDIT_KINDS, WHEN_FORMS, parse_when
from .._errors import StoreError
from ._app import Console, EventStream, HttpError, Request, Response, SendEvent, json_data

#: Records on one audit page.
PAGE_SIZE = 50
#: The deepest audit page (older records: narrow the filters, or use ``oco audit``).
MAX_PAGE = 1000
#: Seconds between the audit stream's reads of the store.
AUDIT_POLL = 2.0
#: How far back the audit stream looks again at each read: a batch of records reaches
#: the store a moment after its records' times (and after an outage, much later).
_AUDIT_LATE = 30.0
#: Characters of a record's digest in the stream's ``shown`` (6 bytes, base64url).
_DIGEST = 8
_ROLE = re.compile(r"\S{1,100}")


# -- audit --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _AuditView:
    """The filters as given (to fill the form again) and as a query."""

    given: dict[str, str]
    filters: AuditQuery
    page: int
    error: str = ""


def _audit_view(fields: dict[str, str]) -> _AuditView:
    given = {name: fields.get(name, "").strip() for name in ("since", "user", "callback", "kind", "decision")}
    page_text = fields.get("page", "1").strip() or "1"
    problems: list[str] = []
    since = 0.0
    if given["since"]:
        try:
            since = parse_when(given["since"])
        except argparse.ArgumentTypeError:
            problems.append(f"since: {given['since']!r} is not a time: write {WHEN_FORMS}")
    if given["kind"] and given["kind"] not in AUDIT_KINDS:
        problems.append(f"kind: {given['kind']!r} is not a kind of record; choose one of {', '.join(AUDIT_KINDS)}")
    if given["decision"] and given["decision"] not in AUDIT_DECISIONS:
        problems.append(f"decision: choose {' or '.join(AUDIT_DECISIONS)}, not {given['decision']!r}")
    page = int(page_text) if page_text.isdigit() else 0
    if not 1 <= page <= MAX_PAGE:
        problems.append(f"page: a number from 1 to {MAX_PAGE}, not {page_text!r} (older records: narrow the filters)")
        page = 1
    filters = AuditQuery(
        since=since, kind=given["kind"], decision=given["decision"], user=given["user"], callback=given["callback"]
    )
    return _AuditView(given, filters, page, "; ".join(problems))


def _record_view(entry: AuditRecord) -> dict[str, str]:
    """What a row of the audit table shows (also the stream's event data)."""
    who = entry.user or entry.person
    if entry.user and entry.person and entry.person != entry.user:
        who = f"{entry.user} ({entry.person})"
    return {
        "when": local_time(entry.time),
        "iso": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(entry.time)),
        "user": who,
        "callback": "/".join(part for part in (entry.callback, entry.route) if part),
        "kind": entry.kind,
        "decision": entry.decision,
        "room": entry.room,
        "permission": entry.permission,
        "detail": entry.detail,
    }


def _link(given: dict[str, str], page: int) -> str:
    fields = {name: value for name, value in given.items() if value}
    if page > 1:
        fields["page"] = str(page)
    return "?" + urlencode(fields) if fields else "?"


async def audit_page(request: Request) -> Response:
    """The audit log, filtered, newest first, a page at a time."""
    view = _audit_view(request.query)
    rows: list[dict[str, str]] = []
    older = False
    stream_fields = {name: value for name, value in view.given.items() if value}
    if not view.error:
        read_at = time.time()
        # A page more than the pages so far: whether older records match too, and which
        # of them are as new as this page's oldest row (the stream must not send those).
        found = await query(request.core.store, view.filters, (view.page + 1) * PAGE_SIZE)
        older = len(found) > view.page * PAGE_SIZE
        newest_first = found[::-1]
        shown = newest_first[(view.page - 1) * PAGE_SIZE : view.page * PAGE_SIZE]
        rows = [_record_view(entry) for entry in shown]
        beyond = newest_first[view.page * PAGE_SIZE :]
        stream_fields.update(_stream_start(read_at, shown, beyond, full=len(shown) == PAGE_SIZE))
    return request.render(
        "audit.html",
        status=400 if view.error else 200,
        title="Audit log",
        given=view.given,
        error=view.error,
        rows=rows,
        page=view.page,
        page_size=PAGE_SIZE,
        older=_link(view.given, view.page + 1) if older else "",
        newer=_link(view.given, view.page - 1) if view.page > 1 else "",
        live=view.page == 1 and not view.error,
        stream=f"{request.console.prefix}/audit/stream?{urlencode(stream_fields)}",
        kinds=AUDIT_KINDS,
        decisions=AUDIT_DECISIONS,
    )


def _digest(entry: AuditRecord) -> str:
    return base64.urlsafe_b64encode(hashlib.blake2b(entry.to_json(), digest_size=6).digest()).decode()


def _stream_start(read_at: float, shown: list[AuditRecord], beyond: list[AuditRecord], *, full: bool) -> dict[str, str]:
    """Where the page's stream starts (``after``) and what it must not send again
    (``shown``): a record reaches the store a moment after its time (a batch, another
    bot, an outage), so one older than the page's read may still come, and the stream
    reads again from _AUDIT_LATE before it, skipping the rows the page shows. A full
    page hides older matches (on the next page): the stream starts at its oldest row,
    and skips those of ``beyond`` (the next page) as new as that (the log is in the
    order batches were written: two writers, or records of the same second, interleave)."""
    after = read_at - _AUDIT_LATE
    if full:
        after = max(after, min(entry.time for entry in shown))
    skipped = [entry for entry in (*shown, *beyond) if entry.time >= after]
    return {"after": f"{after:.6f}", "shown": "".join(_digest(entry) for entry in skipped)}


@dataclass(slots=True)
class _Seen:
    """Records already sent (or shown by the page), by digest, for the window the
    stream reads again each time; ``since``: where the next read starts; ``after``:
    (a reconnected stream) only records newer than this; ``newest``: the newest sent."""

    since: float
    keys: dict[str, float] = field(default_factory=dict)
    after: float = -math.inf
    newest: float = -math.inf

    def fresh(self, entry: AuditRecord) -> bool:
        key = _digest(entry)
        if key in self.keys or entry.time <= self.after:
            return False
        self.keys[key] = entry.time
        self.newest = max(self.newest, entry.time)
        return True

    def forget_before(self, moment: float) -> None:
        self.keys = {key: when for key, when in self.keys.items() if when >= moment}


def _seen(fields: dict[str, str], last_event_id: str) -> _Seen:
    """The stream's start from the page's ``after`` and ``shown`` (HttpError naming the
    parameter when it is not what the page writes). Without ``after`` (a URL written by
    hand): from now. A browser that reconnects sends the URL again, and the newest time
    the stream had sent as ``Last-Event-ID``: it goes on after that, rather than send
    again what it had (a record that reached the store later still, with an older time,
    is missed then)."""
    now = time.time()
    after_text = fields.get("after", "").strip()
    if not after_text:
        return _Seen(since=now)
    try:
        after = float(after_text)
    except ValueError:
        after = math.nan
    if math.isfinite(after) and after > now:
        # Rendered by a bot whose clock is ahead of this one's (ha: behind a balancer): a
        # 400 would close the browser's stream for good; start from now instead.
        after = now
    if not 0 <= after <= now:  # also NaN and infinities
        raise HttpError(
            400,
            f"after: {after_text!r} is not a time the audit page wrote (seconds since 1970); reload the audit page",
        )
    shown = fields.get("shown", "")
    if len(shown) % _DIGEST or len(shown) > 2 * PAGE_SIZE * _DIGEST or not re.fullmatch(r"[A-Za-z0-9_-]*", shown):
        raise HttpError(
            400,
            f"shown: {shown[:40]!r} is not the audit page's list of the rows it shows "
            f"(up to {2 * PAGE_SIZE} digests of {_DIGEST} characters); reload the audit page",
        )
    # The page's rows are never sent, however far ahead of this bot's clock one was
    # stamped (another bot, `oco roles` elsewhere): kept for the whole stream (100 at most).
    keys = {shown[i : i + _DIGEST]: math.inf for i in range(0, len(shown), _DIGEST)}
    resume = _resume_time(last_event_id)
    if resume is None:
        return _Seen(since=after, keys=keys)
    return _Seen(since=max(after, resume), keys=keys, after=resume)


def _resume_time(last_event_id: str) -> float | None:
    """The time a reconnecting browser's ``Last-Event-ID`` names (None: none, or not one
    this stream sent: the URL's start applies)."""
    try:
        when = float(last_event_id)
    except ValueError:
        return None
    if not when >= 0:  # also NaN
        return None
    return min(when, time.time())  # from a bot whose clock is ahead: from now, not a replay


async def audit_stream(request: Request) -> EventStream:
    """Server-sent ``record`` events: audit records matching the filters, as they come,
    from where the page's read stopped (``after``, ``shown``)."""
    view = _audit_view(request.query)
    if view.error:
        raise HttpError(400, view.error)
    seen = _seen(request.query, request.header("last-event-id"))
    store = request.core.store

    async def produce(send: SendEvent) -> None:
        while True:
            window = max(seen.since, view.filters.since)
            read_at = time.time()
            try:
                found = await query(store, replace(view.filters, since=window), 1000)
            except StoreError:
                found = None  # the next read tries again, from the same point
            if found is not None:
                for entry in found:
                    if seen.fresh(entry):
                        # Never later than this read: a record stamped ahead of this bot's
                        # clock would make a reconnect skip what comes meanwhile.
                        resume_at = min(seen.newest, read_at)
                        await send("record", json_data(_record_view(entry)), event_id=repr(resume_at))
                # What is older than this will not be read again: a record that late is lost.
                seen.since = max(seen.since, read_at - _AUDIT_LATE)
                seen.forget_before(seen.since)
            await trio.sleep(AUDIT_POLL)

    return EventStream(produce)


# -- people -------------------------------------------------------------------------


@dataclass(slots=True)
class _Holder:
    """One row of the people table: a person (by their first account) and their roles,
    each with where it comes from (``store`` or the config key)."""

    user: str
    accounts: list[str]
    roles: list[tuple[str, str]] = field(default_factory=list)


def _holders(request: Request) -> list[_Holder]:
    auth = request.core.auth
    rows: dict[str, _Holder] = {}
    # Authorization keeps no public list of people; the console reads what oco roles list reads.
    for person in auth._people.values():
        if person.roles:
            holder = rows.setdefault(person.id, _Holder(person.id, list(person.accounts)))
            holder.roles += [(role, "store") for role in sorted(person.roles)]
    for admin in sorted(auth._admins()):
        person_id = auth.person(admin)
        holder = rows.setdefault(person_id, _Holder(person_id, auth.accounts(admin)))
        holder.roles.append((ADMIN_ROLE, "config: auth.admins"))
    return sorted(rows.values(), key=lambda holder: holder.user)


def _known_roles(request: Request) -> list[str]:
    settings = request.core.auth.settings
    held = {role for person in request.core.auth._people.values() for role in person.roles}
    return sorted({ADMIN_ROLE, *settings.roles, *settings.default_roles, *held})


async def people_page(request: Request) -> Response:
    """Who holds which role; an admin's grant and revoke forms."""
    return _people(request)


def _people(request: Request, *, notice: str = "", error: str = "", status: int = 200) -> Response:
    settings = request.core.auth.settings
    return request.render(
        "people.html",
        status=status,
        title="People and roles",
        holders=_holders(request),
        default_roles=list(settings.default_roles),
        known_roles=_known_roles(request),
        adapters=_adapter_names(request),
        notice=notice,
        error=error,
        form_user=request.form.get("user", "") if error else "",
        form_role=request.form.get("role", "") if error else "",
    )


def _adapter_names(request: Request) -> list[str]:
    return [entry.instance_name for entry in request.bot.adapter_entries]


def _account(request: Request, ref: str) -> str:
    """An account as the admin wrote it (``irc/Bob``) → the id messages carry
    (``irc/bob``); HttpError unless it names one of the config's adapters."""
    ref = ref.strip()
    prefix, sep, native = ref.partition("/")
    names = _adapter_names(request)
    if not sep or not native or prefix not in names:
        raise HttpError(
            400,
            f"user: {ref!r} is not an account of this bot: write it as <adapter>/<user id>, as messages carry it "
            f"(irc/bob); this bot's adapters: {', '.join(names)}",
        )
    return request.console.canonical_user(ref)


def _role(ref: str) -> str:
    role = ref.strip()
    if not _ROLE.fullmatch(role):
        raise HttpError(400, f"role: {role!r} is not a role name: one word, up to 100 characters (ops, deployers)")
    return role


async def grant(request: Request) -> Response:
    """Grant a role (admins only), as ``grant`` in chat and ``oco roles grant`` do."""
    return await _change(request, "grant")


async def revoke(request: Request) -> Response:
    """Revoke a role (admins only), as ``revoke`` in chat and ``oco roles revoke`` do."""
    return await _change(request, "revoke")


async def _change(request: Request, action: str) -> Response:
    try:
        who = _account(request, request.form.get("user", ""))
        role = _role(request.form.get("role", ""))
    except HttpError as exc:
        return _people(request, error=exc.message, status=exc.status)
    auth = request.core.auth
    if action == "grant":
        changed = await auth.grant(who, role)
        notice = f"{who} now has the role {role}" if changed else f"{who} already has the role {role}; nothing changed"
    else:
        changed = await auth.revoke(who, role)
        notice = (
            f"{who} no longer has the role {role}"
            if changed
            else f"{who} did not have the role {role} in the store; nothing changed"
        )
        if role == ADMIN_ROLE and any(a in auth._admins() for a in auth.accounts(who)):
            notice += f" (note: {who} is still an admin: auth.admins in the config names them)"
        elif role in auth.settings.default_roles:
            notice += f" (note: everyone holds {role}: auth.default_roles in the config names it)"
    if changed:
        request.audit("admin", ALLOWED, detail=f"console {action} {who} {role}", permission=role)
    request.form.clear()
    return _people(request, notice=notice)


def register(console: Console) -> None:
    """The audit and people pages."""
    console.route("/audit", audit_page)
    console.route("/audit/stream", audit_stream, stream=True)
    console.route("/people", people_page)
    console.route("/people/grant", grant, methods=("POST",), admin=True)
    console.route("/people/revoke", revoke, methods=("POST",), admin=True)


__all__: Sequence[str] = ["AUDIT_POLL", "PAGE_SIZE", "register"]
