"""The console's status pages: what the bot is doing, read from the running bot.

- Overview (``/console/``): name, version, uptime, active or standby, each adapter's
  state (with the last error while it reconnects), the store, messages in and out per
  minute over the last hour (an SVG chart drawn here, no script), events dropped.
- Callbacks (``/console/callbacks``): every configured or connected callback, launched
  or dialled in, its replicas, matches and replies (totals and in the last minute),
  p50/p99 latency from a match to its first reply, restarts; and a page each
  (``/console/callbacks/<id>``) with its replicas' peers, routes, schedules, webhooks and
  the last failure of a launched one.
- Live (``/console/live``): the recent matched messages (server-rendered, so it works
  without JavaScript), and ``/console/live/stream``, server-sent events ``message`` and
  ``reply`` that ``static/live.js`` turns into rows. Bodies are ``hidden`` unless
  ``console.show_bodies``.

The figures come from :class:`~.._activity.Activity` (counts by minute, latency, the live
feed) and from what the bot's parts know already: the router (replicas, routes, events
dropped), the event hub (schedules, webhooks), health (the store), the adapters' links,
the callbacks' states (restarts, last failure). Nothing here is computed on the message
path. No secret is ever shown: a callback's secret and webhook settings are not read.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING
from urllib.parse import quote

from .._activity import LiveEntry, Reading
from .._admin import local_time
from .._events import schedule_id, webhook_route_id
from .._health import STORE
from .._version import __version__
from ._app import Console, EventStream, HttpError, Request, Response, SendEvent, json_data

if TYPE_CHECKING:
    from .._core import BotCore
    from .._router import Route

#: The chart's size in SVG user units, and the room kept for its labels.
CHART_WIDTH = 720
CHART_HEIGHT = 160
_CHART_LEFT = 40
_CHART_BOTTOM = 20
_CHART_TOP = 10
CHART_MINUTES = 60


# -- what the pages show ----------------------------------------------------------------


def uptime(seconds: float) -> str:
    """``3 d 4 h``, ``2 h 5 min``, ``12 min 3 s``, ``45 s``."""
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    if minutes:
        return f"{minutes} min {secs} s"
    return f"{secs} s"


def milliseconds(seconds: float | None) -> str:
    """``12 ms`` (``—`` for none)."""
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


@dataclass(frozen=True, slots=True)
class AdapterRow:
    name: str
    type: str
    #: Starts with connected, reconnecting, connecting or stopped.
    state: str
    #: The state's first word, for the style.
    word: str


def adapter_rows(request: Request) -> list[AdapterRow]:
    """Each configured adapter and its state."""
    bot, core = request.bot, request.core
    acting = core.leader.acting()
    rows = []
    for name, kind, _ in bot._adapter_specs:
        link = core.links.get(name)
        if link is not None:
            word = link.state
            state = f"{word}: {link.last_error}" if word == "reconnecting" and link.last_error else word
        elif not acting:
            word, state = "stopped", "stopped (this bot is a standby: the active bot is connected to chat)"
        elif not bot.up.is_set():
            word = state = "connecting"
        else:
            word, state = "stopped", "stopped (not running on this bot)"
        rows.append(AdapterRow(name, kind.name, state, word))
    return rows


def store_state(request: Request) -> str:
    """``reachable (sqlite)`` or ``unreachable: why``."""
    core = request.core
    why = dict(core.health.not_ready()).get(STORE)
    kind = request.bot._store_type.name
    return f"unreachable ({kind}): {why}" if why else f"reachable ({kind})"


@dataclass(frozen=True, slots=True)
class Bar:
    """One minute of the chart: its bars' geometry and what they stand for."""

    x_in: float
    x_out: float
    y_in: float
    y_out: float
    h_in: float
    h_out: float
    received: int
    sent: int
    label: str


@dataclass(frozen=True, slots=True)
class Chart:
    bars: list[Bar]
    width: int
    height: int
    left: int
    top: int
    bottom: float
    bar_width: float
    peak: int
    summary: str


def chart(minutes: Sequence[tuple[int, int]], now: float) -> Chart:
    """The bars of messages in and out per minute, oldest left, scaled to the busiest."""
    peak = max((max(pair) for pair in minutes), default=0) or 1
    plot_width = CHART_WIDTH - _CHART_LEFT - 4
    plot_height = CHART_HEIGHT - _CHART_TOP - _CHART_BOTTOM
    step = plot_width / max(len(minutes), 1)
    bar_width = max(step / 2 - 0.5, 0.5)
    bottom = _CHART_TOP + plot_height
    bars = []
    count = len(minutes)
    for index, (received, sent) in enumerate(minutes):
        x = _CHART_LEFT + index * step
        h_in = plot_height * received / peak
        h_out = plot_height * sent / peak
        ago = count - 1 - index
        when = local_time(now - ago * 60)[11:16]
        label = f"{when}: {received} in, {sent} out" if ago else f"this minute: {received} in, {sent} out"
        bars.append(
            Bar(
                round(x, 1),
                round(x + bar_width, 1),
                round(bottom - h_in, 1),
                round(bottom - h_out, 1),
                round(h_in, 1),
                round(h_out, 1),
                received,
                sent,
                label,
            )
        )
    total_in = sum(r for r, _ in minutes)
    total_out = sum(s for _, s in minutes)
    busiest = max(minutes, key=lambda pair: pair[0] + pair[1], default=(0, 0))
    summary = (
        f"Messages per minute over the last {count} minutes: {total_in} in and {total_out} out in all; "
        f"the busiest minute had {busiest[0]} in and {busiest[1]} out."
    )
    return Chart(bars, CHART_WIDTH, CHART_HEIGHT, _CHART_LEFT, _CHART_TOP, bottom, round(bar_width, 1), peak, summary)


@dataclass(frozen=True, slots=True)
class CallbackRow:
    id: str
    kind: str
    #: connected, not connected, or given up (with why).
    state: str
    replicas: int
    matched: int
    replies: int
    matched_per_minute: int
    replies_per_minute: int
    p50: str
    p99: str
    #: A number for a launched callback; ``—`` for one that dials in (the bot does not run it).
    restarts: str
    href: str


def callback_ids(core: BotCore) -> list[str]:
    """Configured callbacks in the config's order, then any other that connected."""
    configured = [cb.id for cb in core.config.callbacks]
    others = ({sub.callback_id for sub in core.router.subscriptions()} | set(core.callbacks)) - set(configured)
    return configured + sorted(others)


def callback_row(request: Request, callback_id: str, reading: Reading) -> CallbackRow:
    core = request.core
    state = core.callbacks.get(callback_id)
    launched = state is not None and state.launched
    replicas = len(core.router.subscriptions(callback_id))
    matched, replies = reading.of(callback_id)
    per_minute = core.activity.callback_per_minute(callback_id, reading)
    latency = core.activity.latency(callback_id)
    if replicas:
        status = "connected"
    elif state is not None and state.given_up:
        status = f"given up: {state.given_up}"
    else:
        status = "not connected"
    return CallbackRow(
        id=callback_id,
        kind="launched" if launched else "dialled in",
        state=status,
        replicas=replicas,
        matched=matched,
        replies=replies,
        matched_per_minute=per_minute[0],
        replies_per_minute=per_minute[1],
        p50=milliseconds(latency[0] if latency else None),
        p99=milliseconds(latency[1] if latency else None),
        restarts=str(state.restarts) if launched and state is not None else "—",
        href=f"{request.console.prefix}/callbacks/{quote(callback_id, safe='')}",
    )


def routes_of(core: BotCore, callback_id: str) -> tuple[list[Route], str]:
    """A callback's routes and where they come from: its streams (every replica's,
    by id), else what it declared before it left, else its configured routes."""
    found: dict[str, Route] = {}
    for sub in core.router.subscriptions(callback_id):
        for route in sub.routes:
            found.setdefault(route.id, route)
    if found:
        return list(found.values()), "declared by its connected stream(s) and the config"
    departed = core.router.departed_routes(callback_id)
    if departed:
        return list(departed), "declared when it was last connected"
    state = core.callbacks.get(callback_id)
    return (list(state.routes) if state is not None else []), "from the config (it is not connected)"


# -- pages ----------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    core = request.core
    activity = core.activity
    reading = activity.reading()
    now = time.time()
    core.health.evaluate()  # as /readyz does: what nothing announces, looked at now
    leader = core.leader
    acting = leader.acting()
    active_at = "" if acting else leader.active_grpc_address
    return request.render(
        "overview.html",
        title="Overview",
        version=__version__,
        started=activity.started,
        uptime=uptime(time.monotonic() - activity.started_monotonic),
        role="active" if acting else "standby",
        active_at=active_at,
        not_ready=core.health.not_ready(),
        adapters=adapter_rows(request),
        store=store_state(request),
        chart=chart(activity.per_minute(CHART_MINUTES, reading), now),
        received=reading.received,
        sent=reading.sent,
        dropped=core.router.overflowed,
        callbacks_connected=len({sub.callback_id for sub in core.router.subscriptions()}),
    )


async def callbacks(request: Request) -> Response:
    reading = request.core.activity.reading()
    rows = [callback_row(request, callback_id, reading) for callback_id in callback_ids(request.core)]
    return request.render("callbacks.html", title="Callbacks", rows=rows)


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    id: str
    when: str
    time_zone: str
    origin: str


@dataclass(frozen=True, slots=True)
class WebhookRow:
    id: str
    method: str
    path: str
    mode: str
    help: str


async def callback(request: Request) -> Response:
    core = request.core
    callback_id = request.params["id"]
    if callback_id not in callback_ids(core):
        raise HttpError(404, f"no callback {callback_id!r} is configured or connected: see the callbacks page")
    reading = core.activity.reading()
    row = callback_row(request, callback_id, reading)
    state = core.callbacks.get(callback_id)
    routes, routes_origin = routes_of(core, callback_id)
    schedules = [
        ScheduleRow(
            schedule_id(found.schedule),
            found.schedule.cron or f"every {found.schedule.every_seconds} s",
            found.schedule.time_zone or "UTC",
            "config" if found.configured else "declared",
        )
        for found in core.events.schedules()
        if found.callback_id == callback_id
    ]
    webhooks = [
        WebhookRow(
            webhook_route_id(route),
            route.method.upper(),
            f"/hooks/{callback_id}{route.path}",
            "asynchronous (202, delivered durably)" if route.asynchronous else "synchronous (waits for the answer)",
            route.help,
        )
        for route in core.events.webhooks().get(callback_id, [])
    ]
    replicas = [sub.peer or "unknown" for sub in core.router.subscriptions(callback_id)]
    return request.render(
        "callback.html",
        title=f"Callback {callback_id}",
        cb=row,
        replicas=replicas,
        routes=routes,
        routes_origin=routes_origin,
        schedules=schedules,
        webhooks=webhooks,
        last_error=(state.last_error if state is not None else "") or "",
        given_up=(state.given_up if state is not None else None) or "",
        launched=row.kind == "launched",
    )


def _live_row(entry: LiveEntry) -> dict[str, object]:
    """What a row of the live view shows: the entry, its time formatted as the page does."""
    return {**entry.as_json(), "iso": _iso(entry.when), "time": local_time(entry.when)[11:], "private": not entry.room}


def _iso(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="seconds")


async def live(request: Request) -> Response:
    feed = request.core.activity.live
    assert feed is not None  # the console runs only with console:, which makes the feed
    entries = feed.recent()
    return request.render(
        "live.html",
        title="Live",
        rows=[_live_row(entry) for entry in entries],
        last=entries[0].id if entries else 0,
        size=feed.entries.maxlen,
        show_bodies=feed.show_bodies,
        stream=f"{request.console.prefix}/live/stream",
    )


async def live_stream(request: Request) -> EventStream:
    feed = request.core.activity.live
    assert feed is not None
    # The page says what it shows: rows up to ``after``, the oldest still without a
    # reply ``waiting``. The stream starts with what happened since it was rendered.
    after = _number(request.query.get("after", ""), 0)
    waiting = _number(request.query.get("waiting", ""), after + 1)

    async def produce(send: SendEvent) -> None:
        with feed.watch() as watcher:
            sent = after
            for entry in list(feed.entries):
                if entry.id > after:
                    await send("message", json_data(_live_row(entry)))
                    sent = entry.id
                elif entry.id >= waiting and entry.duration is not None:
                    await send("reply", json_data(_live_row(entry)))
            while True:
                for kind, entry in await watcher.next():
                    if kind == "message" and entry.id <= sent:
                        continue  # sent above already
                    await send(kind, json_data(_live_row(entry)))

    return EventStream(produce)


def _number(text: str, default: int) -> int:
    return int(text) if text.isdigit() and len(text) < 19 else default


def register(console: Console) -> None:
    """The overview, callbacks and live pages."""
    console.route("/", overview)
    console.route("/callbacks", callbacks)
    console.route("/callbacks/{id}", callback)
    console.route("/live", live)
    console.route("/live/stream", live_stream, stream=True)
