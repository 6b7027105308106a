"""Markdown replies as IRC text: bold, italic, code and strikethrough become IRC's
formatting codes, links show their URL, and no markup (``**``, backticks, ``[..](..)``)
reaches the channel raw. The parsing is oco-core's (:func:`oco_core.plugin.render_markdown`),
shared with the shell adapter; only the codes are IRC's."""

from __future__ import annotations

from oco_core.plugin import MarkdownStyles, render_markdown

BOLD = "\x02"
ITALIC = "\x1d"
MONOSPACE = "\x11"
STRIKE = "\x1e"

# IRC's codes toggle: the same one opens and closes a style.
IRC_STYLES = MarkdownStyles(
    bold=(BOLD, BOLD),
    italic=(ITALIC, ITALIC),
    strike=(STRIKE, STRIKE),
    code=(MONOSPACE, MONOSPACE),
)


def markdown_to_irc(text: str) -> str:
    """Render ``text`` (CommonMark) to IRC lines joined by newlines.

    IRC clients end formatting at the end of each line, so a style that spans a line
    break is closed before it and opened again after it.
    """
    return render_markdown(text, IRC_STYLES)
