"""Where ``oco run`` logs, and how: ``log_format`` (``text`` or ``json``) and
``log_file`` (rotated by size: ``log_max_bytes``, ``log_backups``).

With ``log_file`` the log goes to that file alone, not to standard error as well (under
systemd that would log every line twice); the file is rotated when a line would take it
past ``log_max_bytes``, keeping ``log_backups`` older files (``oco.log.1`` the newest), so
the log never holds more than ``log_max_bytes * (log_backups + 1)`` bytes, however much
a callback prints. One bot per file: two processes rotating one file lose lines.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from collections.abc import Sequence
from datetime import UTC, datetime

from ._config import LoadedConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601, milliseconds), ``level``,
    ``logger``, ``message``, and ``exception`` (the traceback's text) when there is one,
    ``stack`` for ``stack_info``. Newlines inside a message stay inside its string."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            # Cached on the record, as logging.Formatter does, for other handlers.
            record.exc_text = record.exc_text or self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def log_handler(loaded: LoadedConfig) -> logging.Handler:
    """The handler the config asks for: standard error, or the rotated ``log_file``
    (ConfigError naming ``log_file`` when it cannot be opened for writing)."""
    config = loaded.config
    handler: logging.Handler
    if config.log_file is None:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.handlers.RotatingFileHandler(
                config.log_file, maxBytes=config.log_max_bytes, backupCount=config.log_backups, encoding="utf-8"
            )
        except OSError as exc:
            raise loaded.error(
                ("log_file",),
                f"cannot write the log file {str(config.log_file)!r}: {exc.strerror or exc}; "
                "create its folder, or give the bot's user write access to it",
            ) from None
    handler.setFormatter(JsonFormatter() if config.log_format == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure(loaded: LoadedConfig, level: int) -> None:
    """Log at ``level`` through the configured handler, as ``logging.basicConfig``
    does: nothing changes when the root logger has handlers already (a program that
    calls ``oco_core._cli.main`` has its own logging)."""
    logging.basicConfig(level=level, handlers=[log_handler(loaded)])


__all__: Sequence[str] = ["JsonFormatter", "configure", "log_handler"]
