"""structlog set-up: human-readable lines on stderr, request id and specialist bound in contextvars."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import structlog


def configure_logging(level: str = "info") -> None:
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        numeric = logging.INFO
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class Sparse:
    """A warning anyone on the bus can cause (a request it refuses), said at most once per ``every``
    seconds per process, with how many times it happened: one sender cannot grow the log without
    bound (one `$SRV.PING` with a forbidden reply subject was a line from every service)."""

    def __init__(self, every: float = 10.0):
        self.every = every
        self._at: dict[str, float] = {}
        self._times: dict[str, int] = {}

    def warning(self, logger: Any, event: str, **fields: Any) -> None:
        self._times[event] = self._times.get(event, 0) + 1
        now = time.monotonic()
        if now - self._at.get(event, -self.every) >= self.every:
            self._at[event] = now
            logger.warning(event, times=self._times.pop(event), **fields)


# The refusals of requests whose reply subject nobody may be answered at (bus/runs.py answerable).
refused = Sparse()
