"""Events beyond chat, and the one path every durable event takes to a callback.

Webhook requests, schedule firings, published events and matches of durable routes are
all :class:`~._proto.core_pb2.Event` messages. Whoever makes one hands it to
:meth:`EventHub.deliver` (``_webhooks``, ``_schedules``, :meth:`EventHub.publish`, the
router for durable routes); the hub keeps it in the core store (namespace ``events``)
until the callback has it, and writes it to one stream of the callback when one is
connected, in order, through the stream's own queue (``_router.Subscription``).

A stream that asked to acknowledge (``ListenRequest.acknowledge``) gets each durable
event with a ``delivery_id``; the event stays in the store until ``Robot.Acknowledge``
names it, and goes back to the callback's other streams (or waits for the next one)
when its stream ends first: at least once. A stream that does not acknowledge (a
client generated from the specification) has an event once it was written to it: at
most once, as chat matches have always been.

Declarations (webhook routes, schedules, topics) live with the stream that made them,
as routes do; after a callback's last stream leaves, the hub remembers them for
``events.ttl``, so events for a callback restarting for a deploy are kept for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ._proto import core_pb2, robot_pb2

log = logging.getLogger(__name__)

#: The core store's namespace for durable events: key ``<callback id>/<time>-<n>``.
NAMESPACE = "events"


class NotConnectedError(Exception):
    """No stream of the callback is connected to take a synchronous webhook request."""


@dataclass(frozen=True, slots=True)
class WebhookTarget:
    """The webhook route a request goes to."""

    callback_id: str
    route: robot_pb2.WebhookRoute
    #: Whether a stream of the callback is connected now.
    connected: bool


@dataclass(frozen=True, slots=True)
class DeclaredSchedule:
    """A schedule of a callback, from its streams or from the operator's config."""

    callback_id: str
    schedule: robot_pb2.Schedule
    #: True for one of the operator's ``callbacks[].schedules``.
    configured: bool


__all__ = ["NAMESPACE", "DeclaredSchedule", "NotConnectedError", "WebhookTarget", "core_pb2"]
