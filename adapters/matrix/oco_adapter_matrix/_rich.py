"""Rich replies as Matrix events, and the ids of the bot's own messages.

Edits are ``m.replace`` relations, reactions ``m.annotation`` ones, threads ``m.thread``
ones; files are ``m.image``, ``m.video``, ``m.audio`` or ``m.file`` messages pointing at
the media repository. Everything here builds event contents or maps ids; the adapter
does the I/O.
"""

from __future__ import annotations

import html
import mimetypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from oco_core import AdapterError, UnknownTargetError
from oco_core.plugin import Attachment

#: How many of the bot's recent messages are remembered with their event ids, for edits
#: and reactions that name them by the id ``send`` gave.
SENT_MEMORY = 10_000

#: The first character of the ids ``send`` gives (event ids start with ``$``).
LOCAL_ID_PREFIX = "~"


@dataclass(slots=True)
class _Sent:
    event_id: str = ""  # "" until the send loop delivered it
    mentions: tuple[str, ...] = ()
    edit_of: str = ""  # for an edit: the message it replaced
    text_events: int = 1  # events its text went as (a long one is split)


class SentIds:
    """The ids the adapter's ``send`` gave (``~`` and a transaction id), each mapped to
    its event id once the send loop delivered the message; the most recent
    :data:`SENT_MEMORY` of them, with the users each one mentioned (an edit notifies only
    people the original did not)."""

    def __init__(self, size: int = SENT_MEMORY) -> None:
        self._size = size
        self._by_local: OrderedDict[str, _Sent] = OrderedDict()
        self._by_event: dict[str, str] = {}

    def accept(self, local_id: str, mentions: tuple[str, ...] = (), edit_of: str = "", text_events: int = 1) -> None:
        """Remember ``local_id``, not delivered yet (an edit of ``edit_of``; its text
        split into ``text_events`` events)."""
        self._by_local[local_id] = _Sent(mentions=mentions, edit_of=edit_of, text_events=text_events)
        while len(self._by_local) > self._size:
            _, old = self._by_local.popitem(last=False)
            self._by_event.pop(old.event_id, None)

    def delivered(self, local_id: str, event_id: str) -> None:
        """The message ``local_id`` names is the event ``event_id`` now."""
        sent = self._by_local.get(local_id)
        if sent is not None:
            sent.event_id = event_id
            self._by_event[event_id] = local_id

    def check(self, ref: str, what: str) -> None:
        """Raise :class:`UnknownTargetError` unless ``ref`` is an event id or an id given
        recently (delivered or still queued)."""
        if ref.startswith("$") or ref in self._by_local:
            return
        if ref.startswith(LOCAL_ID_PREFIX):
            raise UnknownTargetError(
                f"{what} {ref!r} is not one of the last {self._size} messages this Matrix adapter sent since it "
                "started (it forgets older ones and all on a restart): name the message by its event id ($...)"
            )
        raise UnknownTargetError(f"{what} {ref!r} is neither a Matrix event id ($...) nor an id the adapter gave")

    def event_id(self, ref: str, what: str) -> str:
        """The event id ``ref`` names: itself for an event id; for an id ``send`` gave,
        its delivered event's. Raises :class:`AdapterError` for a message never delivered."""
        self.check(ref, what)
        if ref.startswith("$"):
            return ref
        event_id = self._by_local[ref].event_id
        if not event_id:
            raise AdapterError(f"{what} {ref!r} names a message that was not delivered (its error is logged above)")
        return event_id

    def original(self, ref: str) -> str:
        """The message an edit replaced, for ``ref`` naming one of the bot's edits (an
        edit of an edit replaces the original: Matrix ignores replacements of
        replacements); otherwise ``ref``."""
        sent = self._by_local.get(self._by_event.get(ref, ref))
        return sent.edit_of if sent is not None and sent.edit_of else ref

    def mentions(self, ref: str) -> tuple[str, ...]:
        """Whom the bot's message ``ref`` (either kind of id) mentioned, where known."""
        sent = self._by_local.get(self._by_event.get(ref, ref))
        return sent.mentions if sent is not None else ()

    def text_events(self, ref: str) -> int:
        """How many events the text of the bot's message ``ref`` (either kind of id)
        went as, where known (1 where not)."""
        sent = self._by_local.get(self._by_event.get(ref, ref))
        return sent.text_events if sent is not None else 1

    def local_id(self, event_id: str) -> str:
        """The id ``send`` gave for the bot's event ``event_id``; ``event_id`` itself
        for anyone else's event (or one of the bot's that was forgotten)."""
        return self._by_event.get(event_id, event_id)


def media_type_of(attachment: Attachment) -> str:
    """The attachment's media type, else one guessed from its name, else
    ``application/octet-stream``."""
    return attachment.media_type or mimetypes.guess_type(attachment.name)[0] or "application/octet-stream"


#: The ``msgtype`` of file messages.
MEDIA_MSGTYPES = frozenset({"m.image", "m.file", "m.audio", "m.video"})


def caption(content: dict[str, Any]) -> str:
    """The text of a file message: its ``body`` when that is a caption (Matrix 1.10: the
    event has a ``filename`` and the body differs from it), else "" (the body is the
    file's name)."""
    body, filename = content.get("body"), content.get("filename")
    if isinstance(body, str) and isinstance(filename, str) and filename and body != filename:
        return body
    return ""


def msgtype_for(media_type: str) -> str:
    """The ``msgtype`` Matrix clients show a file of ``media_type`` with."""
    kind = media_type.split("/", 1)[0]
    return {"image": "m.image", "video": "m.video", "audio": "m.audio"}.get(kind, "m.file")


def file_content(attachment: Attachment, media_type: str, source: dict[str, Any]) -> dict[str, Any]:
    """An ``m.image``/``m.video``/``m.audio``/``m.file`` message for ``attachment``;
    ``source`` is ``{"url": mxc}`` or, in an encrypted room, ``{"file": EncryptedFile}``."""
    info: dict[str, Any] = {"mimetype": media_type}
    size = len(attachment.data) or attachment.size
    if size:
        info["size"] = size
    return {
        "msgtype": msgtype_for(media_type),
        "body": attachment.name,
        "filename": attachment.name,
        "info": info,
        **source,
    }


def link_content(attachment: Attachment, msgtype: str) -> dict[str, Any]:
    """A message linking an attachment given by an http(s) url: ``name: url``."""
    url, name = attachment.url, attachment.name
    return {
        "msgtype": msgtype,
        "body": f"{name}: {url}",
        "format": "org.matrix.custom.html",
        "formatted_body": f'<a href="{html.escape(url)}">{html.escape(name)}</a>',
    }


def edit_content(content: dict[str, Any], original: str, mentioned_before: tuple[str, ...]) -> dict[str, Any]:
    """``content`` (a message) as the replacement of the event ``original``: the new
    content in ``m.new_content``, a ``* `` fallback for clients without edits, and
    top-level mentions only of people the original did not mention (no second ping)."""
    mentioned = list((content.get("m.mentions") or {}).get("user_ids") or [])
    new = {**content, "m.mentions": {"user_ids": mentioned} if mentioned else {}}
    fallback: dict[str, Any] = {"msgtype": content["msgtype"], "body": f"* {content['body']}"}
    if "formatted_body" in content:
        fallback["format"] = content["format"]
        fallback["formatted_body"] = f"* {content['formatted_body']}"
    fresh = [user for user in mentioned if user not in mentioned_before]
    return {
        **fallback,
        "m.mentions": {"user_ids": fresh} if fresh else {},
        "m.new_content": new,
        "m.relates_to": {"rel_type": "m.replace", "event_id": original},
    }


def thread_relation(root: str, reply_to: str) -> dict[str, Any]:
    """The ``m.relates_to`` of a message in the thread of ``root``; clients without
    threads show it as a reply to ``reply_to``."""
    return {"rel_type": "m.thread", "event_id": root, "is_falling_back": True, "m.in_reply_to": {"event_id": reply_to}}


def reaction_content(event_id: str, key: str) -> dict[str, Any]:
    """An ``m.reaction`` annotating ``event_id`` with ``key``."""
    return {"m.relates_to": {"rel_type": "m.annotation", "event_id": event_id, "key": key}}


def as_dict(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one: a field of someone else's
    event is what their client put there, not what the specification says."""
    return value if isinstance(value, dict) else {}


#: Where the homeserver serves media to clients with an access token.
DOWNLOAD_PATH = "/_matrix/client/v1/media/download/"


def download_url(homeserver: str, mxc: str) -> str:
    """The homeserver's authenticated download url of the media ``mxc://server/id``
    (it needs an access token: ``Authorization: Bearer``); "" for anything else."""
    parts = urlsplit(mxc)
    media_id = parts.path.lstrip("/")
    if parts.scheme != "mxc" or not parts.netloc or not media_id or "/" in media_id:
        return ""
    if parts.netloc in (".", "..") or media_id in (".", ".."):
        return ""  # a path segment a server would resolve: somewhere else than the file
    server = quote(parts.netloc, safe=":[]")
    return f"{homeserver.rstrip('/')}{DOWNLOAD_PATH}{server}/{quote(media_id, safe='')}"


def download_path(homeserver: str, url: str) -> str:
    """The path (from ``homeserver``) of ``url``, a file url :func:`download_url` gives.
    Anything else raises :class:`UnknownTargetError`: the bot's access token goes with
    that request, and must never go to a url someone else chose."""
    base = homeserver.rstrip("/")
    server, _, media_id = url.removeprefix(base + DOWNLOAD_PATH).partition("/")
    # Only the exact url the file's mxc url gives: no other path, query or host.
    if (
        not url.startswith(base + DOWNLOAD_PATH)
        or download_url(base, f"mxc://{unquote(server)}/{unquote(media_id)}") != url
    ):
        raise UnknownTargetError(
            f"{url[:200]!r} is not the url of a file on this adapter's homeserver ({base}{DOWNLOAD_PATH}...): "
            "the Matrix adapter fetches nothing else with the bot's access token"
        )
    return url[len(base) :]


def incoming_attachment(homeserver: str, content: dict[str, Any], encrypted: bool) -> Attachment:
    """What a person's file message carries, as an :class:`Attachment`. An encrypted
    file (``file`` instead of ``url``) has no ``url`` here: its blob is of no use
    without its key, which the bot does not hand on."""
    info = as_dict(content.get("info"))
    name = content.get("filename") or content.get("body") or "attachment"
    media_type = info.get("mimetype") or ""
    if encrypted and not media_type:
        media_type = as_dict(content.get("file")).get("mimetype") or ""
    url = "" if encrypted else download_url(homeserver, str(content.get("url") or ""))
    return Attachment(name=str(name), media_type=str(media_type), url=url, size=file_size(info.get("size")))


#: The largest size a file may claim (the protocol's field is a 64-bit integer).
MAX_FILE_SIZE = 2**63 - 1


def file_size(claimed: object) -> int:
    """The ``info.size`` a sender claimed, as a size the bot can pass on: clamped to
    0..:data:`MAX_FILE_SIZE`; 0 (unknown) for anything but an integer."""
    if not isinstance(claimed, int) or isinstance(claimed, bool):
        return 0
    return min(max(claimed, 0), MAX_FILE_SIZE)
