"""The audit trail's direct path writes what `logging` would, and only when nothing
else is listening."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Callable, Iterator

import pytest

from trustmesh.audit_log import AuditFormatter, AuditStreamHandler, direct_handler
from trustmesh.decision import Decision, Reason
from trustmesh_sidecar.audit import Audit

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
