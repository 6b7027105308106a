"""The adapter's pieces that need no homeserver: config, formatting, plugin registration."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
from pathlib import Path

import httpx
import oco_adapter_matrix
import pydantic
import pytest
import trio
from oco_adapter_matrix import MatrixAdapter, MatrixConfig
from oco_adapter_matrix._format import leading_pill, markdown_to_html, pill, split_body, strip_reply_fallback
from oco_adapter_matrix._rich import (
    MAX_FILE_SIZE,
    SentIds,
    caption,
    download_path,
    download_url,
    edit_content,
    incoming_attachment,
    media_type_of,
    msgtype_for,
)
from oco_adapter_matrix._transport import Transport, _split_token

from oco_core import AdapterError, RequestTooLargeError, UnknownTargetError
from oco_core.plugin import Attachment, Feature, OutgoingMessage

BASE = {"homeserver": "https://matrix.example.org/", "user_id": "@oco:example.org", "password": "pw"}


def test_config_minimal_and_defaults() -> None:
    config = MatrixConfig.model_validate(BASE)
    assert config.homeserver == "https://matrix.example.org"
    assert config.localpart == "oco"
    assert config.encryption is True
    assert config.autojoin_invites == []
    assert config.message_type == "notice"
    assert isinstance(config.store_path, Path)
    assert (config.queue_size, config.queue_bytes) == (1000, 64 * 1024 * 1024)


def test_config_keeps_secrets_out_of_repr() -> None:
    config = MatrixConfig.model_validate({**BASE, "password": "hunter2"})
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config)
    token = MatrixConfig.model_validate({**BASE, "password": None, "access_token": "syt_secret"})
    assert "syt_secret" not in repr(token)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"homeserver": "matrix.example.org"}, "http"),
        ({"user_id": "oco"}, "full Matrix user id"),
        ({"rooms": ["ops"]}, "neither a room id"),
        ({"password": None}, "exactly one of password or access_token"),
        ({"access_token": "t"}, "exactly one of password or access_token"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
        ({"message_type": "shout"}, "notice"),
        ({"queue_size": 0}, "queue_size"),
        ({"queue_bytes": 0}, "queue_bytes"),
    ],
)
def test_config_errors_name_the_problem(change: dict[str, object], complaint: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=complaint):
        MatrixConfig.model_validate({**BASE, **change})


def test_autojoin_false_means_off() -> None:
    assert MatrixConfig.model_validate({**BASE, "autojoin_invites": False}).autojoin_invites == []
    allowed = MatrixConfig.model_validate({**BASE, "autojoin_invites": ["@*:example.org"]})
    assert allowed.autojoin_invites == ["@*:example.org"]


def test_markdown_becomes_matrix_html() -> None:
    assert markdown_to_html("PONG") == "PONG"
    assert markdown_to_html("**PONG**") == "<strong>PONG</strong>"
    assert markdown_to_html("`x` and\nnext") == "<code>x</code> and<br />\nnext"
    assert "<ul>" in markdown_to_html("- a\n- b")
    # Raw HTML from a callback is shown, never interpreted.
    assert "<script>" not in markdown_to_html("<script>alert(1)</script>")


def test_pills() -> None:
    made = pill("@oco:example.org", "OCO <bot>")
    assert made == '<a href="https://matrix.to/#/@oco:example.org">OCO &lt;bot&gt;</a>'
    assert leading_pill(made + ": ping") == ("@oco:example.org", "OCO <bot>")
    assert leading_pill('<a href="https://matrix.to/#/%40oco%3Aexample.org">oco</a> hi') == ("@oco:example.org", "oco")
    assert leading_pill("hello <a href='https://matrix.to/#/@oco:example.org'>oco</a>") is None


def test_reply_fallback_is_dropped() -> None:
    assert strip_reply_fallback("> <@a:x> earlier\n> more\n\noco: ping") == "oco: ping"
    assert strip_reply_fallback("oco: ping") == "oco: ping"


def test_registered_through_the_oco_entry_point() -> None:
    entry_points = importlib.metadata.entry_points(group="oco")
    matrix = [ep for ep in entry_points if ep.name == "matrix"]
    assert matrix, "no oco entry point named matrix"
    module = matrix[0].load()
    assert module is oco_adapter_matrix
    (adapter_type,) = module.oco_adapter_types()
    assert adapter_type.name == "matrix"
    assert adapter_type.config_model is MatrixConfig
    assert adapter_type.package == "oco-adapter-matrix"
    assert isinstance(adapter_type.create(MatrixConfig.model_validate(BASE)), MatrixAdapter)


def test_public_names_are_exported() -> None:
    for name in oco_adapter_matrix.__all__:
        assert getattr(oco_adapter_matrix, name).__doc__, f"{name} has no docstring"


def test_access_token_moves_from_the_query_to_a_header() -> None:
    path, token = _split_token("/_matrix/client/v3/sync?access_token=syt_abc&since=s1&timeout=30000")
    assert token == "syt_abc"
    assert path == "/_matrix/client/v3/sync?since=s1&timeout=30000"
    assert _split_token("/_matrix/client/versions") == ("/_matrix/client/versions", None)


def test_split_body_cuts_at_lines_then_spaces_then_characters() -> None:
    assert split_body("short") == ["short"]
    lines = "\n".join(f"line {n}" for n in range(100))
    pieces = split_body(lines, limit=100)
    assert "".join(pieces) == lines
    assert all(piece.endswith("\n") or piece == pieces[-1] for piece in pieces)
    words = " ".join(["word"] * 100)
    assert all(piece.endswith(" ") or piece == split_body(words, limit=50)[-1] for piece in split_body(words, limit=50))
    blob = "漢🙂" * 100  # no spaces: cut between characters; each costs 6 and 12 bytes of JSON
    pieces = split_body(blob, limit=40)
    assert "".join(pieces) == blob
    assert all(len(json.dumps(piece)) - 2 <= 40 for piece in pieces)


def test_the_adapter_renders_every_rich_reply_itself() -> None:
    wanted = Feature.THREADS | Feature.ATTACHMENTS | Feature.EDITS | Feature.REACTIONS | Feature.TYPING
    assert MatrixAdapter(MatrixConfig.model_validate(BASE)).features == wanted


def test_ids_given_map_to_event_ids_once_delivered_and_are_forgotten_oldest_first() -> None:
    sent = SentIds(size=2)
    sent.accept("~a", ("@bob:x",))
    sent.check("~a", "edit_of")
    sent.check("$anyone", "edit_of")  # an event id is taken as it is
    with pytest.raises(AdapterError, match="was not delivered"):
        sent.event_id("~a", "edit_of")
    sent.delivered("~a", "$A")
    assert sent.event_id("~a", "edit_of") == "$A"
    assert sent.local_id("$A") == "~a"
    assert sent.local_id("$other") == "$other"
    assert sent.mentions("~a") == sent.mentions("$A") == ("@bob:x",)
    sent.accept("~b")
    sent.accept("~c")  # past the size: ~a goes, with its event id
    with pytest.raises(UnknownTargetError, match="is not one of the last 2 messages"):
        sent.check("~a", "edit_of")
    assert sent.local_id("$A") == "$A"
    with pytest.raises(UnknownTargetError, match="neither a Matrix event id"):
        sent.check("m1", "in_reply_to")
    # An edit of an edit replaces the original.
    sent.accept("~edit", edit_of="~b")
    sent.delivered("~edit", "$E")
    assert sent.original("~edit") == sent.original("$E") == sent.original("~b") == "~b"


def test_an_edit_notifies_only_people_the_original_did_not_mention() -> None:
    content = {
        "msgtype": "m.notice",
        "body": "bob: done",
        "format": "org.matrix.custom.html",
        "formatted_body": "<a>bob</a>: done",
        "m.mentions": {"user_ids": ["@bob:x"]},
    }
    edit = edit_content(content, "$orig", ("@bob:x",))
    assert edit["body"] == "* bob: done"
    assert edit["formatted_body"] == "* <a>bob</a>: done"
    assert edit["m.mentions"] == {}
    assert edit["m.new_content"] == content
    assert edit["m.relates_to"] == {"rel_type": "m.replace", "event_id": "$orig"}
    assert edit_content(content, "$orig", ())["m.mentions"] == {"user_ids": ["@bob:x"]}
    plain = edit_content({"msgtype": "m.text", "body": "x"}, "$orig", ())
    assert "formatted_body" not in plain
    assert plain["m.new_content"] == {"msgtype": "m.text", "body": "x", "m.mentions": {}}


def test_files_get_the_msgtype_clients_show_them_with() -> None:
    assert [msgtype_for(t) for t in ("image/png", "video/mp4", "audio/ogg", "application/pdf", "")] == [
        "m.image",
        "m.video",
        "m.audio",
        "m.file",
        "m.file",
    ]
    assert media_type_of(Attachment("graph.png")) == "image/png"
    assert media_type_of(Attachment("blob.zzz-unknown")) == "application/octet-stream"
    assert media_type_of(Attachment("graph.png", media_type="image/webp")) == "image/webp"


def test_incoming_files_get_the_authenticated_download_url() -> None:
    home = "https://matrix.example.org"
    assert download_url(home + "/", "mxc://example.org/AbC_1") == (
        "https://matrix.example.org/_matrix/client/v1/media/download/example.org/AbC_1"
    )
    for bad in ("https://example.org/x", "mxc://example.org", "mxc://example.org/a/b", ""):
        assert download_url(home, bad) == ""
    content: dict[str, object] = {"msgtype": "m.image", "body": "look", "filename": "a.png"}
    content |= {"url": "mxc://example.org/X", "info": {"mimetype": "image/png", "size": 10}}
    assert incoming_attachment(home, content, encrypted=False) == Attachment(
        name="a.png", media_type="image/png", url=f"{home}/_matrix/client/v1/media/download/example.org/X", size=10
    )
    secret = {"msgtype": "m.file", "body": "k.txt", "file": {"url": "mxc://example.org/Y", "mimetype": "text/plain"}}
    assert incoming_attachment(home, secret, encrypted=True) == Attachment(name="k.txt", media_type="text/plain")


@pytest.mark.parametrize(
    ("claimed", "passed_on"),
    [(12, 12), (0, 0), (-1, 0), (2**70, MAX_FILE_SIZE), (2**63, MAX_FILE_SIZE), (1.5, 0), (True, 0), ("12", 0)],
)
def test_an_incoming_files_size_is_clamped_to_what_the_protocol_holds(claimed: object, passed_on: int) -> None:
    # Synapse refuses integers past 2**53 in events, but other homeservers and federated
    # events may carry anything: a size must never break the dispatch of a message.
    content = {"msgtype": "m.file", "body": "a", "url": "mxc://example.org/X", "info": {"size": claimed}}
    assert incoming_attachment("https://hs", content, encrypted=False).size == passed_on
    assert MAX_FILE_SIZE == 2**63 - 1
    # Fields that are not JSON objects where objects belong are treated as absent.
    odd = {"msgtype": "m.file", "body": "a", "info": "big", "file": "k"}
    assert incoming_attachment("https://hs", odd, encrypted=True) == Attachment(name="a")


def test_a_files_body_is_text_only_when_it_is_a_caption() -> None:
    assert caption({"msgtype": "m.file", "body": "deploy-notes.pdf"}) == ""
    assert caption({"msgtype": "m.file", "body": "deploy-notes.pdf", "filename": "deploy-notes.pdf"}) == ""
    assert caption({"msgtype": "m.image", "body": "the dashboard", "filename": "shot.png"}) == "the dashboard"
    assert caption({"msgtype": "m.image", "body": "look", "filename": ""}) == ""
    assert caption({"msgtype": "m.image", "body": "look", "filename": 5}) == ""


def test_only_the_homeservers_own_file_urls_are_fetched() -> None:
    home = "https://matrix.example.org"
    url = download_url(home, "mxc://example.org/AbC_1")
    assert download_path(home, url) == "/_matrix/client/v1/media/download/example.org/AbC_1"
    assert download_path(home + "/", url) == "/_matrix/client/v1/media/download/example.org/AbC_1"
    sub = "https://example.org/matrix"
    assert download_path(sub, download_url(sub, "mxc://h:8448/x")) == "/_matrix/client/v1/media/download/h:8448/x"
    prefix = f"{home}/_matrix/client/v1/media/download"
    for foreign in (
        "https://evil.example/steal",
        "https://matrix.example.org.evil.example/_matrix/client/v1/media/download/example.org/AbC_1",
        "http://matrix.example.org/_matrix/client/v1/media/download/example.org/AbC_1",
        f"{home}/_matrix/client/v3/account/whoami",
        f"{home}/_matrix/client/v1/media/thumbnail/example.org/AbC_1",
        f"{prefix}/example.org/AbC_1?allow_redirect=true",
        f"{prefix}/example.org/AbC_1#x",
        f"{prefix}/example.org/AbC_1/more",
        f"{prefix}/example.org/../../v3/account/whoami",
        f"{prefix}/example.org/%2e%2e",
        f"{prefix}/../x",
        f"{prefix}/example.org/a%2Fb",
        f"{prefix}/example.org/",
        f"{prefix}/example.org",
        prefix,
        "",
    ):
        with pytest.raises(UnknownTargetError, match="fetches nothing else with the bot's access token"):
            download_path(home, foreign)
    assert download_url(home, "mxc://example.org/..") == ""
    assert download_url(home, "mxc://../x") == ""


async def test_a_message_that_does_not_fit_the_queue_is_refused_whole() -> None:
    # Not running: the state of an adapter whose homeserver is away, where messages
    # wait. What is refused names the key to raise; nothing of it is queued.
    adapter = MatrixAdapter(MatrixConfig.model_validate({**BASE, "queue_size": 4, "queue_bytes": 5000}))
    room = "!r:example.org"
    await adapter.send(OutgoingMessage("one", room_id=room))
    await adapter.send(OutgoingMessage("two", room_id=room, attachments=(Attachment("a.bin", data=b"x" * 3000),)))
    with pytest.raises(AdapterError, match=r"queue_bytes 5000\): the message was not sent"):
        await adapter.send(OutgoingMessage("", room_id=room, attachments=(Attachment("b.bin", data=b"y" * 2000),)))
    with pytest.raises(AdapterError, match=r"this message needs 2; queue_size 4\)"):
        await adapter.send(OutgoingMessage("three", room_id=room, attachments=(Attachment("c", url="https://x/c"),)))
    await adapter.send(OutgoingMessage("four", room_id=room))
    with pytest.raises(AdapterError, match="queue_size 4"):
        await adapter.send(OutgoingMessage("", room_id=room, reaction="👍", in_reply_to="$e"))
    queued = []
    while True:
        try:
            queued.append(adapter._outbox_rx.receive_nowait())
        except trio.WouldBlock:
            break
    assert [(p.message.body, p.attachment.name if p.attachment else "") for p in queued] == [
        ("one", ""),
        ("two", ""),
        ("", "a.bin"),
        ("four", ""),
    ]


async def test_a_download_stops_as_soon_as_it_is_past_max_bytes() -> None:
    # A real HTTP server that streams a body without a length, and would go on forever:
    # the download gives up past max_bytes instead of reading (and keeping) it all.
    sent = 0

    async def endless(stream: trio.SocketStream) -> None:
        nonlocal sent
        await stream.receive_some(65536)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 4096
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while True:
                await stream.send_all(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                sent += len(chunk)

    async with trio.open_nursery() as nursery:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, endless, listeners)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            with trio.fail_after(10), pytest.raises(RequestTooLargeError, match="larger than the 100000 bytes"):
                await Transport(http).download("/_matrix/client/v1/media/download/h/x", "token", 100_000)
        nursery.cancel_scope.cancel()
    assert sent < 10_000_000


async def test_an_edit_of_a_message_sent_as_several_events_is_refused() -> None:
    # Matrix replaces one event: the edit would change the first piece and leave the rest.
    adapter = MatrixAdapter(MatrixConfig.model_validate(BASE))
    room = "!r:example.org"
    long = await adapter.send(OutgoingMessage("word " * 20_000, room_id=room))
    assert long is not None
    with pytest.raises(AdapterError, match=r"sent as \d+ events .* would replace only the first: send a new message"):
        await adapter.send(OutgoingMessage("short now", room_id=room, edit_of=long))
    # Also when named by its event id, once delivered.
    adapter._sent.delivered(long, "$long")
    with pytest.raises(AdapterError, match="would replace only the first"):
        await adapter.send(OutgoingMessage("short now", room_id=room, edit_of="$long"))
    # One event of text (with a file after it) may be edited: the file is no part of it.
    short = await adapter.send(OutgoingMessage("short", room_id=room, attachments=(Attachment("a", data=b"a"),)))
    assert short is not None
    assert await adapter.send(OutgoingMessage("shorter", room_id=room, edit_of=short))
