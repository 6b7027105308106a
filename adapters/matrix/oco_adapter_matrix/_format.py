"""Message bodies: markdown to Matrix HTML, mention pills, reply fallbacks, splitting."""

from __future__ import annotations

import html
import json
import re
from urllib.parse import unquote

from markdown_it import MarkdownIt

# CommonMark with raw HTML off: a callback's text can format, never inject markup.
# "breaks" keeps single newlines as line breaks, as people expect in chat.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("strikethrough").enable("table")

_LEADING_PILL = re.compile(r"""^\s*<a\s+href=["']https://matrix\.to/#/([^"'?]+)[^"']*["']\s*>(.*?)</a>""", re.DOTALL)


def markdown_to_html(text: str) -> str:
    """Render ``text`` (CommonMark) to the HTML of a Matrix ``formatted_body``.

    A lone paragraph is unwrapped, so ``PONG`` becomes ``PONG``, not ``<p>PONG</p>``.
    """
    rendered = str(_MARKDOWN.render(text)).strip()
    if rendered.startswith("<p>") and rendered.endswith("</p>") and rendered.count("<p>") == 1:
        rendered = rendered[3:-4]
    return rendered


def pill(user_id: str, name: str) -> str:
    """The HTML of a mention of ``user_id`` shown as ``name``."""
    return f'<a href="https://matrix.to/#/{html.escape(user_id)}">{html.escape(name)}</a>'


def leading_pill(formatted_body: str) -> tuple[str, str] | None:
    """The user id and shown text of a mention pill that starts ``formatted_body``."""
    match = _LEADING_PILL.match(formatted_body)
    if match is None:
        return None
    return unquote(html.unescape(match.group(1))), html.unescape(re.sub(r"<[^>]+>", "", match.group(2)))


def strip_reply_fallback(body: str) -> str:
    """Drop the quoted ``> <@user> ...`` lines that older clients put before a reply."""
    if not body.startswith("> "):
        return body
    lines = body.split("\n")
    index = 0
    while index < len(lines) and lines[index].startswith(">"):
        index += 1
    if index < len(lines) and lines[index] == "":
        index += 1
    return "\n".join(lines[index:])


#: The most of a message body one event carries, in bytes of JSON with non-ASCII
#: escaped (more than the homeserver counts). Homeservers refuse events over 64 KiB;
#: the formatted body repeats the text, and encryption adds a third (base64).
MAX_BODY_JSON_BYTES = 12_000


def split_body(text: str, limit: int = MAX_BODY_JSON_BYTES) -> list[str]:
    """Cut ``text`` into pieces of at most ``limit`` bytes of JSON, in order and losing
    nothing: after a line where it can, else after a space, else between characters.
    (A markdown construct cut in two is rendered as two halves.)"""
    return _split(text, limit, ("\n", " ", ""))


def _json_bytes(text: str) -> int:
    # Escaping is per character, so the size of a concatenation is the sum of the sizes.
    return len(json.dumps(text)) - 2


def _split(text: str, limit: int, separators: tuple[str, ...]) -> list[str]:
    if _json_bytes(text) <= limit or not separators:
        return [text]
    separator, finer = separators[0], separators[1:]
    parts = re.split(f"(?<={re.escape(separator)})", text) if separator else list(text)
    pieces: list[str] = []
    current, size = "", 0
    for part in parts:
        part_size = _json_bytes(part)
        if size + part_size <= limit:
            current, size = current + part, size + part_size
            continue
        if current:
            pieces.append(current)
        current, size = part, part_size
        if part_size > limit:
            *done, current = _split(part, limit, finer)
            pieces += done
            size = _json_bytes(current)
    if current:
        pieces.append(current)
    return pieces
