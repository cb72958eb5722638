"""Logging set-up: upstream's ``--v`` verbosity and a key=value or JSON format.

klog's ``V(n)`` levels map onto Python levels below INFO: ``--v=0`` and ``--v=1`` show INFO
and above, ``--v=2`` adds per-sync details (upstream logs syncs at V(2)), ``--v=4`` and up add
DEBUG. Use `vlog` for a message at a klog verbosity.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any


#: Python level for klog V(n): INFO for n <= 1, then one step down per level.
def level_for_verbosity(verbosity: int) -> int:
    return logging.INFO - max(0, verbosity - 1)


def vlog(logger: logging.Logger, verbosity: int, message: str, *args: Any) -> None:
    logger.log(level_for_verbosity(verbosity), message, *args)


class KeyValueFormatter(logging.Formatter):
    """``time=... level=... logger=... msg="..."``: greppable and structured."""

    def format(self, record: logging.LogRecord) -> str:
        level = (record.levelname if record.levelno >= logging.INFO
                 else f"V{logging.INFO - record.levelno + 1}")
        parts = [
            f"time={time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(record.created))}"
            f".{int(record.msecs):03d}Z",
            f"level={level}",
            f"logger={record.name}",
            f"msg={json.dumps(record.getMessage())}",
        ]
        if record.exc_info:
            parts.append(f"error={json.dumps(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.levelno < logging.INFO:
            entry["v"] = logging.INFO - record.levelno + 1
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(verbosity: int = 0, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level_for_verbosity(verbosity))
    # Third-party chatter (HTTP connection pools) only at high verbosity.
    for noisy in ("urllib3", "kubernetes", "pyroute2"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbosity < 6 else logging.DEBUG)
