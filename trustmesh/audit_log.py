"""Where audit lines go: `2026-11-29T22:30:00.123Z audit {json}`, one per line.

The CLI puts one `AuditStreamHandler` on the `trustmesh.audit` logger. A sidecar
writes a line per decision, so its audit trail (`trustmesh_sidecar.audit`) hands a
batch of lines straight to that handler when it is the logger's only one and nothing
filters (`direct_handler`): the lines are dated, joined and written at once, without
a `LogRecord` each. Any other logging set-up (more handlers, filters, a level above
INFO, tests capturing records) goes through `logging` as usual.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TextIO

__all__ = ["AuditFormatter", "AuditStreamHandler", "direct_handler"]


class _Dates:
    """`2026-11-29T22:30:00.123Z` for a time in seconds; the date part is formatted
    once per second."""

    __slots__ = ("_date", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._date = ""

    def stamp(self, at: float, millis: int) -> str:
        second = int(at)
        if second != self._second:
            self._date = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._date}.{millis:03d}Z"


class AuditFormatter(logging.Formatter):
    """`2026-11-29T22:30:00.123Z audit {json}`: UTC, RFC 3339, to the millisecond."""

    def __init__(self) -> None:
        super().__init__()
        self._dates = _Dates()

    def format(self, record: logging.LogRecord) -> str:
        stamp = self._dates.stamp(record.created, int(record.msecs))
        return f"{stamp} audit {record.getMessage()}"


class AuditStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler for audit lines that can also take a batch of them at once."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self.setFormatter(AuditFormatter())
        self._dates = _Dates()

    def write_lines(self, lines: Iterable[tuple[float, str]]) -> None:
        """Write `(time, json)` lines as `format` would, in one write and one flush."""
        dates = self._dates
        text = "".join(
            f"{dates.stamp(at, int((at - int(at)) * 1000))} audit {line}{self.terminator}"
            for at, line in lines
        )
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:
            self.handleError(
                logging.LogRecord("trustmesh.audit", logging.INFO, __file__, 0, "", (), None)
            )
        finally:
            self.release()


def direct_handler(logger: logging.Logger) -> AuditStreamHandler | None:
    """The logger's `AuditStreamHandler` when lines may bypass `logging`: it is the
    only handler, nothing filters, and INFO is enabled on both."""
    handlers = logger.handlers
    if len(handlers) != 1 or logger.filters or not logger.isEnabledFor(logging.INFO):
        return None
    handler = handlers[0]
    if type(handler) is not AuditStreamHandler or handler.filters:
        return None
    if handler.level > logging.INFO or logger.propagate:
        return None
    return handler
