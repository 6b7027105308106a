"""Markdown replies as IRC text: bold, italic, code and strikethrough become IRC's
formatting codes, links show their URL, and no markup (``**``, backticks, ``[..](..)``)
reaches the channel raw."""

from __future__ import annotations

from collections.abc import Sequence

from markdown_it import MarkdownIt
from markdown_it.token import Token

# The same dialect the Matrix adapter renders, so one reply reads alike on both services.
# Raw HTML off: it is shown as text, never interpreted. "breaks": a newline stays a line.
_MARKDOWN = MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("strikethrough")

BOLD = "\x02"
ITALIC = "\x1d"
MONOSPACE = "\x11"
STRIKE = "\x1e"

_CODES = {"strong": BOLD, "em": ITALIC, "s": STRIKE}


def markdown_to_irc(text: str) -> str:
    """Render ``text`` (CommonMark) to IRC lines joined by newlines.

    IRC clients end formatting at the end of each line, so a style that spans a line
    break is closed before it and opened again after it.
    """
    lines: list[str] = []
    prefixes: list[str] = []  # blockquote and list markers of the blocks we are in
    ordinal: list[int] = []  # the next number of each open ordered list (0: bulleted)
    pending_item = ""  # a list item's marker, put before its first line only
    heading = False
    for token in _MARKDOWN.parse(text):
        kind = token.type
        if kind == "blockquote_open":
            prefixes.append("> ")
        elif kind == "blockquote_close":
            prefixes.pop()
        elif kind in ("bullet_list_open", "ordered_list_open"):
            ordinal.append(int(token.attrGet("start") or 1) if kind == "ordered_list_open" else 0)
        elif kind in ("bullet_list_close", "ordered_list_close"):
            ordinal.pop()
        elif kind == "list_item_open":
            if ordinal and ordinal[-1]:
                pending_item = f"{ordinal[-1]}. "
                ordinal[-1] += 1
            else:
                pending_item = "- "
        elif kind == "heading_open":
            heading = True
        elif kind == "heading_close":
            heading = False
        elif kind == "hr":
            lines.append("".join(prefixes) + "----")
        elif kind in ("fence", "code_block"):
            lead = "".join(prefixes) + pending_item
            indent = "".join(prefixes) + " " * len(pending_item)
            pending_item = ""
            for line in token.content.rstrip("\n").split("\n"):
                lines.append(f"{lead}{MONOSPACE}{line}{MONOSPACE}" if line else lead.rstrip())
                lead = indent
        elif kind == "inline":
            rendered = _inline(token.children or [], bold=heading)
            lead = "".join(prefixes) + pending_item
            indent = "".join(prefixes) + " " * len(pending_item)
            pending_item = ""
            for n, line in enumerate(rendered):
                lines.append((lead if n == 0 else indent) + line)
    return "\n".join(lines)


def _inline(children: Sequence[Token], *, bold: bool) -> list[str]:
    """The lines of one paragraph's inline tokens, each line with its styles balanced."""
    lines: list[str] = []
    current: list[str] = []
    open_codes: list[str] = [BOLD] if bold else []
    current.extend(open_codes)
    links: list[str] = []

    def end_line() -> None:
        current.extend(reversed(open_codes))
        lines.append("".join(current))
        current.clear()
        current.extend(open_codes)

    for child in children:
        kind = child.type
        if kind in ("text", "html_inline"):
            current.append(child.content)
        elif kind == "code_inline":
            current.append(f"{MONOSPACE}{child.content}{MONOSPACE}")
        elif kind in ("softbreak", "hardbreak"):
            end_line()
        elif kind.endswith("_open") and kind[:-5] in _CODES:
            open_codes.append(_CODES[kind[:-5]])
            current.append(_CODES[kind[:-5]])
        elif kind.endswith("_close") and kind[:-6] in _CODES:
            code = _CODES[kind[:-6]]
            if code in open_codes:
                open_codes.remove(code)
            current.append(code)
        elif kind == "link_open":
            links.append(str(child.attrGet("href") or ""))
            current.append("\x00link\x00")  # where the link's text starts
        elif kind == "link_close":
            href = links.pop()
            start = len(current) - 1 - current[::-1].index("\x00link\x00")
            shown = "".join(current[start + 1 :])
            del current[start]
            # An autolink (<https://x>) shows its URL once; other links show text and URL.
            if href and shown.strip() != href and shown.strip() != href.removeprefix("mailto:"):
                current.append(f" ({href})")
        elif kind == "image":
            alt = child.content or "image"
            current.append(f"{alt} ({child.attrGet('src') or ''})")
    end_line()
    # A line whose styles all closed with nothing between them is just the empty line.
    return [_drop_empty_styles(line) for line in lines]


def _drop_empty_styles(line: str) -> str:
    for code in (BOLD, ITALIC, STRIKE):
        line = line.replace(code + code, "")
    return line
