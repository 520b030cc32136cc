"""Structured request logs: ``key=value`` lines (default) or JSON lines.

The servicer logs one line per request on the ``esmsearch.server`` logger and
attaches the same figures as a dict in the record attribute ``fields``.
:class:`JsonLinesFormatter` writes each record as one JSON object (``ts``,
``level``, ``logger``, ``msg`` plus those fields), for log shippers.
Only entry points (the CLI, :func:`esmsearch.server.serve`) configure logging.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Final, Literal

__all__ = ["LOG_FORMATS", "JsonLinesFormatter", "use_log_format"]

#: Accepted values of ``--log-format``.
LOG_FORMATS: Final = ("text", "json")


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: ts (RFC 3339 UTC), level, logger, msg, and the request fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            doc.update(fields)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, separators=(",", ":"), default=str)


def use_log_format(fmt: Literal["text", "json"] | str, logger: logging.Logger | None = None) -> None:
    """Switch the handlers of ``logger`` (default: root) to ``fmt``.

    Raises:
        ValueError: ``fmt`` is not one of :data:`LOG_FORMATS`.
    """
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    if fmt == "text":
        return
    target = logger or logging.getLogger()
    if not target.handlers:
        target.addHandler(logging.StreamHandler())
    for handler in target.handlers:
        handler.setFormatter(JsonLinesFormatter())
