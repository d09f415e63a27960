"""The audit trail: one JSON line per decision on the `trustmesh.audit` logger, at INFO.

Each line says which side decided (inbound or outbound), the caller, the callee, the
method, the decision, its reason code, the policy that allowed it and its message.
Lines are dated when the decision was made and written in order, in batches (ADR 0013):

* a denial, and every line before it, once the current event-loop callback is done;
* an allowed call within `flush_interval` seconds of its decision (default 50 ms),
  or sooner when `MAX_BATCH` lines are waiting;
* everything still waiting when the sidecar stops (`Audit.flush`).

A write is a system call; one per allowed call cost the sidecar ~40 us of CPU per call,
as much as its whole policy decision, so allowed lines are gathered the way access logs
are (Envoy flushes its access-log files on an interval too).
"""

from __future__ import annotations

import asyncio
import json
import logging
from time import time

from trustmesh.audit_log import direct_handler
from trustmesh.decision import Decision

__all__ = ["Audit"]

audit = logging.getLogger("trustmesh.audit")


# Audit lines by what they say: the same few (caller, callee, method, decision) come
# back call after call, and their JSON is the same every time. Bounded; emptied when full.
_AUDIT_LINES: dict[tuple[str, str, str, str, Decision], str] = {}
_AUDIT_LINES_MAX = 4096
_AUDIT_KEY_MAX = 1024  # longer values (a caller's odd method path) are not remembered


def _audit_line(side: str, caller: str, callee: str, method: str, decision: Decision) -> str:
    key = (side, caller, callee, method, decision)
    line = _AUDIT_LINES.get(key)
    if line is None:
        line = json.dumps(
            {
                "side": side,
                "caller": caller,
                "callee": callee,
                "method": method,
                "decision": "allow" if decision.allowed else "deny",
                "reason": decision.reason.value,
                "policy": decision.policy,
                "message": decision.message,
            },
            separators=(",", ":"),
        )
        if len(method) + len(caller) <= _AUDIT_KEY_MAX:
            if len(_AUDIT_LINES) >= _AUDIT_LINES_MAX:
                _AUDIT_LINES.clear()
            _AUDIT_LINES[key] = line
    return line


_AuditEntry = tuple[float, str, str, str, str, Decision]


DEFAULT_FLUSH_INTERVAL = 0.05  # seconds; `trustmesh sidecar run --audit-flush-ms`
MAX_BATCH = 512  # lines waiting before a write is due regardless of the interval


class Audit:
    """One JSON line per decision on the `trustmesh.audit` logger, at INFO.

    A decision is noted with its time; its record is made (with that time) and handed
    to the logger's handlers later, in order: after the current event-loop callback
    for a denial (and whatever waits before it), within `flush_interval` for an
    allowed call. Each router has its own queue, on its own loop. Without a running
    loop, or for a queue left behind by a loop that stopped, lines are written at once.
    `flush_interval=0` writes every batch once the current callback is done.
    """

    __slots__ = ("_entries", "_handle", "_loop", "_timed", "flush_interval")

    def __init__(self, flush_interval: float = DEFAULT_FLUSH_INTERVAL) -> None:
        if not 0 <= flush_interval <= 10:
            raise ValueError(f"audit flush interval {flush_interval!r} s: expected 0 to 10")
        self.flush_interval = flush_interval
        self._entries: list[_AuditEntry] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.Handle | None = None  # the scheduled flush, if any
        self._timed = False  # whether that flush waits for the interval

    def __call__(
        self, side: str, caller: str, callee: str, method: str, decision: Decision
    ) -> None:
        if not audit.isEnabledFor(logging.INFO):
            return
        entry = (time(), side, caller, callee, method, decision)
        loop = self._loop
        if loop is None or not loop.is_running():
            # Routers run on their loop's thread: while the loop that took the last
            # batch runs, it is this one. (get_running_loop() is a getpid() system call
            # on CPython 3.11, and this runs per call.)
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                _write_audit(entry)
                return
        if self._loop is not loop:
            self.flush()  # a batch whose loop never ran it: write it now
            self._loop = loop
        entries = self._entries
        entries.append(entry)
        soon = not decision.allowed or len(entries) >= MAX_BATCH or self.flush_interval <= 0
        handle = self._handle
        if handle is None:
            if soon:
                self._handle, self._timed = loop.call_soon(self.flush), False
            else:
                self._handle = loop.call_later(self.flush_interval, self.flush)
                self._timed = True
        elif soon and self._timed:
            handle.cancel()
            self._handle, self._timed = loop.call_soon(self.flush), False

    def flush(self) -> None:
        """Write every waiting line now (the scheduled write, and the sidecar's stop)."""
        if self._handle is not None:
            self._handle.cancel()  # a no-op when it is the running callback
            self._handle = None
        entries, self._entries = self._entries, []
        if not entries:
            return
        handler = direct_handler(audit)
        if handler is not None:  # the CLI's set-up: one write for the batch
            handler.write_lines((e[0], _audit_line(*e[1:])) for e in entries)
            return
        for entry in entries:
            _write_audit(entry)


def _write_audit(entry: _AuditEntry) -> None:
    at, side, caller, callee, method, decision = entry
    line = _audit_line(side, caller, callee, method, decision)
    # Logger.info's record, without its stack walk for the caller's file and line,
    # dated when the decision was made.
    record = audit.makeRecord(audit.name, logging.INFO, __file__, 0, line, (), None, "_audit")
    record.relativeCreated += (at - record.created) * 1000
    record.created = at
    record.msecs = int((at - int(at)) * 1000) + 0.0
    audit.handle(record)
