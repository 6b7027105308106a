"""The operator console: web pages at ``/console`` on the bot's HTTP server that show
the bot, its callbacks and its decisions, and let admins grant and revoke roles.

Off unless ``console:`` is configured (with ``http:``). :mod:`._app` is the application
(and says how to add a page), :mod:`._auth` the tokens, sessions and login throttle,
:mod:`._html` the templates, :mod:`._admin_pages` the audit and people pages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ._app import PREFIX, Console

if TYPE_CHECKING:
    from .._bot import Bot
    from .._core import BotCore
    from .._http import HttpApp


def mount(app: HttpApp, bot: Bot, core: BotCore, *, secure: bool) -> Console:
    """Serve the console at ``/console`` on ``app`` (``secure``: the server has TLS,
    so the session cookie is ``Secure``)."""
    settings = bot.config.console
    assert settings is not None
    console = Console(bot, core, settings, secure=secure)
    app.mount(PREFIX, console)
    return console


__all__: Sequence[str] = ["PREFIX", "Console", "mount"]
