"""The audit trail: one JSON line per decision on the `trustmesh.audit` logger, at INFO.

Each line says which side decided (inbound or outbound), the caller, the callee, the
method, the decision, its reason code, the policy that allowed it and its message.
Lines are dated when the decision was made and written in order once the current
event-loop callback is done, so the write (a syscall) does not delay the call.
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


class Audit:
    """One JSON line per decision on the `trustmesh.audit` logger, at INFO.

    A decision is noted with its time; its record is made (with that time) and handed
    to the logger's handlers once the current event-loop callback is done, in order,
    so formatting and writing the line (a syscall) overlap the forwarded call instead
    of delaying it. Each router has its own queue, on its own loop. Without a running
    loop, or for a queue left behind by a loop that stopped, lines are written at once.
    """

    __slots__ = ("_entries", "_loop")

    def __init__(self) -> None:
        self._entries: list[_AuditEntry] = []
        self._loop: asyncio.AbstractEventLoop | None = None

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
        if not self._entries or self._loop is not loop:
            self.flush()  # (a batch whose loop never ran it: write it now)
            loop.call_soon(self.flush)
            self._loop = loop
        self._entries.append(entry)

    def flush(self) -> None:
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
