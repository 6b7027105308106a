"""Message bodies: markdown to Matrix HTML, mention pills, reply fallbacks."""

from __future__ import annotations

import html
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
