"""Structured logs for every process: one JSON object per line on stderr.

Fields passed with ``extra=`` (``message_id``, ``correlation_id``, ``saga_id``, ...)
become keys of the object, so ``jq 'select(.correlation_id == "...")'`` follows one
operation across processes.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else came from ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self._service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self._service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry |= {
            key: value if isinstance(value, str | int | float | bool | None) else str(value)
            for key, value in vars(record).items()
            if key not in _STANDARD
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aio-pika/aiormq narrate every reconnect attempt at INFO; warnings are enough.
    for noisy in ("aio_pika", "aiormq"):
        logging.getLogger(noisy).setLevel(max(root.level, logging.WARNING))
