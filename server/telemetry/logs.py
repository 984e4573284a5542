"""Structured logs: ``--log-format json`` writes one JSON object per line.

Every line has ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``pid``, ``process`` (front or
worker) and ``message``; lines about something carry its context as fields of their own, as the
code passed it (``extra=``): ``event`` (what happened: ``admission``, ``queued``, ``refusal``,
``session_end``, ``eviction``, ``spill_storm``, ``quota_change``, ``drain``,
``security_rejection``, ``device_unhealthy``, ...), ``session``, ``tenant``, ``request`` (the id the front gave
the client's HELLO, carried by its session's lines), ``worker``, ``device``, ``reason``. An
exception's traceback goes in ``exception``. The front and its workers (which inherit the format
through ``LIBREMOTE_LOG_FORMAT``) write to the same stream.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}
TEXT_FORMAT = "%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "logger": record.name, "pid": record.process,
            "process": self.process, "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def configure(level: str, log_format: str, process: str) -> None:
    """Set up the root logger on stderr as ``--log-level`` and ``--log-format`` ask."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(process) if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    os.environ["LIBREMOTE_LOG_FORMAT"] = log_format  # (workers: the zygote passes it on)
