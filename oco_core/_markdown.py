"""Markdown replies as styled text lines, for adapters whose service shows no HTML.

A callback's ``markdown=True`` reply is CommonMark. An adapter that shows text (IRC with
its formatting codes, the shell with ANSI or none) renders it with :func:`render_markdown`
and the :class:`MarkdownStyles` of its service: emphasis, code and headings take the
service's codes, links show their URL as "text (url)", lists and quotes keep their
markers, and no markup (``**``, backticks, ``[..](..)``) is left raw.

It uses the same parser and dialect as the Matrix adapter (markdown-it-py, CommonMark with
strikethrough), so one reply reads alike everywhere. The parser is imported on the first
Markdown reply only: ``oco run`` pays nothing for it until then.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from markdown_it import MarkdownIt
    from markdown_it.token import Token

__all__ = ["MarkdownStyles", "render_markdown"]


@dataclass(frozen=True, slots=True)
class MarkdownStyles:
    """How a service shows each style: the text put before and after it.

    ``bold`` also serves headings, ``code`` both inline code and each line of a code
    block, which is further indented by ``code_block_indent``. Styles are closed at the
    end of every line and opened again on the next (IRC clients end them per line; a
    terminal line that ends with its styles closed cannot bleed into a prompt). The
    defaults, all empty, give clean plain text.
    """

    bold: tuple[str, str] = ("", "")
    italic: tuple[str, str] = ("", "")
    strike: tuple[str, str] = ("", "")
    code: tuple[str, str] = ("", "")
    code_block_indent: str = ""


@functools.cache
def _parser() -> MarkdownIt:
    from markdown_it import MarkdownIt

    # Raw HTML off: it is shown as text, never interpreted. "breaks": a newline stays a line.
    return MarkdownIt("commonmark", {"html": False, "breaks": True}).enable("strikethrough")


_STYLE_OF = {"strong": "bold", "em": "italic", "s": "strike"}
_LINK = "\x00link\x00"  # marks where a link's text starts, while it is rendered


def render_markdown(text: str, styles: MarkdownStyles) -> str:
    """Render ``text`` (CommonMark) to lines joined by newlines, styled by ``styles``.

    Paragraphs, list items and blocks each start a line (no blank lines between them, so
    that a chat line is never empty); a bullet item starts with "- ", a numbered one with
    its number, a quote with "> ", a rule is "----".
    """
    lines: list[str] = []
    prefixes: list[str] = []  # blockquote and list markers of the blocks we are in
    ordinal: list[int] = []  # the next number of each open ordered list (0: bulleted)
    pending_item = ""  # a list item's marker, put before its first line only
    heading = False
    code_open, code_close = styles.code
    for token in _parser().parse(text):
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
                if line:
                    lines.append(f"{lead}{styles.code_block_indent}{code_open}{line}{code_close}")
                else:
                    lines.append(lead.rstrip())
                lead = indent
        elif kind == "inline":
            rendered = _inline(token.children or [], styles, heading=heading)
            lead = "".join(prefixes) + pending_item
            indent = "".join(prefixes) + " " * len(pending_item)
            pending_item = ""
            for n, line in enumerate(rendered):
                lines.append((lead if n == 0 else indent) + line)
    return "\n".join(lines)


def _inline(children: Sequence[Token], styles: MarkdownStyles, *, heading: bool) -> list[str]:
    """The lines of one paragraph's inline tokens, each line with its styles balanced."""
    codes = {"bold": styles.bold, "italic": styles.italic, "strike": styles.strike}
    lines: list[str] = []
    current: list[str] = []
    # The styles open now, outermost first; one may be open twice (bold inside a
    # heading): its codes go out only when the first opens and the last closes.
    open_styles: list[str] = ["bold"] if heading else []
    links: list[str] = []

    def reopen() -> None:
        for name in dict.fromkeys(open_styles):
            current.append(codes[name][0])

    def end_line() -> None:
        for name in reversed(dict.fromkeys(open_styles)):
            current.append(codes[name][1])
        lines.append("".join(current))
        current.clear()
        reopen()

    reopen()
    for child in children:
        kind = child.type
        if kind in ("text", "html_inline"):
            current.append(child.content)
        elif kind == "code_inline":
            current.append(f"{styles.code[0]}{child.content}{styles.code[1]}")
        elif kind in ("softbreak", "hardbreak"):
            end_line()
        elif kind.endswith("_open") and kind[:-5] in _STYLE_OF:
            name = _STYLE_OF[kind[:-5]]
            if name not in open_styles:
                current.append(codes[name][0])
            open_styles.append(name)
        elif kind.endswith("_close") and kind[:-6] in _STYLE_OF:
            name = _STYLE_OF[kind[:-6]]
            if name in open_styles:
                open_styles.remove(name)
            if name not in open_styles:
                current.append(codes[name][1])
        elif kind == "link_open":
            links.append(str(child.attrGet("href") or ""))
            current.append(_LINK)
        elif kind == "link_close":
            href = links.pop()
            start = len(current) - 1 - current[::-1].index(_LINK)
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
    return [_drop_empty_styles(line, codes.values()) for line in lines]


def _drop_empty_styles(line: str, codes: Iterable[tuple[str, str]]) -> str:
    for start, end in codes:
        if start or end:
            line = line.replace(start + end, "")
    return line
