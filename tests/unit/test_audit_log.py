"""The audit trail's direct path writes what `logging` would, and only when nothing
else is listening."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable, Iterator

import pytest

from trustmesh.audit_log import AuditFormatter, AuditStreamHandler, direct_handler
from trustmesh.decision import Decision, Reason
from trustmesh_sidecar.audit import MAX_BATCH, Audit

ALLOW = Decision.allow("p", "AccessPolicy 'p' allows it")
DENY = Decision.deny(Reason.NO_MATCHING_POLICY, "no AccessPolicy allows it")


@pytest.fixture
def audit_logger() -> Iterator[logging.Logger]:
    logger = logging.getLogger("trustmesh.audit")
    saved = (logger.level, list(logger.handlers), list(logger.filters), logger.propagate)
    logger.handlers.clear()
    logger.filters.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger
    finally:
        logger.setLevel(saved[0])
        logger.handlers[:] = saved[1]
        logger.filters[:] = saved[2]
        logger.propagate = saved[3]


def _decide(audit: Audit) -> None:
    async def calls() -> None:
        audit("inbound", "spiffe://d/a", "spiffe://d/b", "/s.S/M", ALLOW)
        audit("inbound", "spiffe://d/c", "spiffe://d/b", "/s.S/M", DENY)
        await asyncio.sleep(0)  # the batch is written once the callback is done

    asyncio.run(calls())


def _quiet_filter(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addFilter(lambda r: True)


def _handler_filter(logger: logging.Logger, handler: logging.Handler) -> None:
    handler.addFilter(lambda r: True)


def _second_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(logging.NullHandler())


def _propagates(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.propagate = True


def _plain_stream_handler(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.removeHandler(handler)
    plain = logging.StreamHandler(handler.stream)  # type: ignore[attr-defined]
    plain.setFormatter(AuditFormatter())
    logger.addHandler(plain)


def _nothing(logger: logging.Logger, handler: logging.Handler) -> None:
    pass


@pytest.mark.parametrize(
    ("change", "direct"),
    [
        (_nothing, True),
        (_quiet_filter, False),
        (_handler_filter, False),
        (_second_handler, False),
        (_propagates, False),
        (_plain_stream_handler, False),
    ],
    ids=[
        "cli-setup",
        "logger-filter",
        "handler-filter",
        "two-handlers",
        "propagates",
        "plain-stream-handler",
    ],
)
def test_direct_path_only_for_the_cli_setup_and_lines_are_the_same(
    audit_logger: logging.Logger,
    change: Callable[[logging.Logger, logging.Handler], None],
    direct: bool,
) -> None:
    out = io.StringIO()
    handler = AuditStreamHandler(out)
    audit_logger.handlers[:] = [handler]  # pytest's capture handlers are not the CLI's
    change(audit_logger, handler)
    assert (direct_handler(audit_logger) is not None) == direct
    _decide(Audit())
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    for line, (caller, decision) in zip(
        lines, [("spiffe://d/a", "allow"), ("spiffe://d/c", "deny")], strict=True
    ):
        stamp, word, body = line.split(" ", 2)
        assert word == "audit" and stamp.endswith("Z") and len(stamp) == 24
        fields = json.loads(body)
        assert (fields["caller"], fields["decision"]) == (caller, decision)


def test_audit_off_writes_nothing(audit_logger: logging.Logger) -> None:
    out = io.StringIO()
    audit_logger.handlers[:] = [AuditStreamHandler(out)]
    audit_logger.setLevel(logging.WARNING)
    assert direct_handler(audit_logger) is None
    _decide(Audit())
    assert out.getvalue() == ""


def test_batch_matches_the_formatter_to_the_millisecond() -> None:
    out = io.StringIO()
    handler = AuditStreamHandler(out)
    at = 1764455400.2509
    handler.write_lines([(at, "{}"), (at + 1, '{"a":1}')])
    record = logging.LogRecord("trustmesh.audit", logging.INFO, __file__, 0, "{}", (), None)
    record.created, record.msecs = at, int((at - int(at)) * 1000)
    assert out.getvalue().splitlines() == [
        AuditFormatter().format(record),
        '2025-11-29T22:30:01.250Z audit {"a":1}',
    ]


def test_a_failing_stream_is_reported_not_raised(
    audit_logger: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    handler = AuditStreamHandler(Broken())
    handler.write_lines([(0.0, "{}")])  # logging's handleError reports it on stderr
    assert "disk full" in capsys.readouterr().err


# -- batching (ADR 0013) -----------------------------------------------------------------

_INTERVAL = 0.1


def _allow(audit: Audit, n: int = 1) -> None:
    for i in range(n):
        audit("inbound", f"spiffe://d/a{i}", "spiffe://d/b", "/s.S/M", ALLOW)


def _deny(audit: Audit) -> None:
    audit("inbound", "spiffe://d/c", "spiffe://d/b", "/s.S/M", DENY)


def _allow_then_deny(audit: Audit) -> None:
    _allow(audit, 2)
    _deny(audit)


def _full_batch(audit: Audit) -> None:
    _allow(audit, MAX_BATCH)


def _allow_then_flush(audit: Audit) -> None:
    _allow(audit)
    audit.flush()  # the sidecar's stop


# (interval, decisions made in one callback, lines once the callback is done, lines
# after the interval): allowed lines wait for the interval, a denial does not.
BATCHING = {
    "allowed-waits-for-the-interval": (_INTERVAL, _allow, 0, 1),
    "denial-at-once": (_INTERVAL, _deny, 1, 1),
    "denial-takes-earlier-lines-along": (_INTERVAL, _allow_then_deny, 3, 3),
    "full-batch-at-once": (_INTERVAL, _full_batch, MAX_BATCH, MAX_BATCH),
    "interval-zero-at-once": (0.0, _allow, 1, 1),
    "stop-flushes-and-nothing-twice": (_INTERVAL, _allow_then_flush, 1, 1),
}


@pytest.mark.parametrize(
    ("interval", "decide", "soon", "later"), list(BATCHING.values()), ids=list(BATCHING)
)
def test_allowed_lines_are_batched_by_time_denials_are_not(
    audit_logger: logging.Logger,
    interval: float,
    decide: Callable[[Audit], None],
    soon: int,
    later: int,
) -> None:
    out = io.StringIO()
    audit_logger.handlers[:] = [AuditStreamHandler(out)]

    async def run() -> tuple[int, int, float]:
        audit = Audit(interval)
        decided = time.monotonic()
        decide(audit)
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        seen = len(out.getvalue().splitlines())
        while len(out.getvalue().splitlines()) < later and time.monotonic() - decided < 2:
            await asyncio.sleep(0.005)
        waited = time.monotonic() - decided
        await asyncio.sleep(interval * 1.5)  # nothing more arrives (no second write)
        return seen, len(out.getvalue().splitlines()), waited

    seen, total, waited = asyncio.run(run())
    assert (seen, total) == (soon, later)
    if soon < later:  # the line waited for the interval, and no longer than ~2 of them
        assert interval * 0.9 <= waited < interval * 2 + 0.5


def test_a_batch_keeps_the_order_of_the_decisions(audit_logger: logging.Logger) -> None:
    out = io.StringIO()
    audit_logger.handlers[:] = [AuditStreamHandler(out)]

    async def run() -> None:
        audit = Audit(_INTERVAL)
        _allow(audit, 3)
        await asyncio.sleep(0)
        _deny(audit)
        await asyncio.sleep(0)

    asyncio.run(run())
    callers = [json.loads(line.split(" ", 2)[2])["caller"] for line in out.getvalue().splitlines()]
    assert callers == ["spiffe://d/a0", "spiffe://d/a1", "spiffe://d/a2", "spiffe://d/c"]


@pytest.mark.parametrize("interval", [-0.001, 10.5], ids=["negative", "over-ten-seconds"])
def test_flush_interval_out_of_range_is_refused(interval: float) -> None:
    with pytest.raises(ValueError, match="audit flush interval"):
        Audit(interval)
