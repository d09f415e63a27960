"""The CLI's parsing and its one error boundary, in-process (no network)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from trustmesh.cli.commands import parse_duration
from trustmesh.cli.main import main
from trustmesh.errors import ConfigError
from trustmesh.spiffe_id import TrustDomain
from trustmesh_registry.datadir import DataDir

from certs import raises


@pytest.fixture(autouse=True)
def _restore_audit_logger() -> Iterator[None]:
    """main() configures the audit logger for `registry` commands; undo it per test."""
    audit = logging.getLogger("trustmesh.audit")
    saved = (list(audit.handlers), audit.propagate, audit.level)
    yield
    audit.handlers[:] = saved[0]
    audit.propagate, audit.level = saved[1], saved[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90s", timedelta(seconds=90)),
        ("30m", timedelta(minutes=30)),
        ("1h", timedelta(hours=1)),
        ("7d", timedelta(days=7)),
        (" 2h ", timedelta(hours=2)),
        ("3650d", timedelta(days=3650)),
    ],
    ids=["seconds", "minutes", "hours", "days", "surrounding-space", "longest"],
)
def test_parse_duration_valid(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "banana",
        "",
        "1",
        "h",
        "1.5h",
        "-1h",
        "1w",
        "1H",
        "1h30m",
        "1 h",
        "9999999999999d",
    ],
    ids=[
        "word",
        "empty",
        "no-unit",
        "no-number",
        "fraction",
        "negative",
        "weeks",
        "upper-case-unit",
        "compound",
        "inner-space",
        "too-many-digits",
    ],
)
def test_parse_duration_invalid(text: str) -> None:
    with raises(ConfigError, f"bad duration {text!r}: use a number and a unit, like 90s"):
        parse_duration(text)


@pytest.mark.parametrize(
    "text",
    ["0s", "0d", "3651d", "9999999999d"],
    ids=["zero", "zero-days", "over-ten-years", "would-overflow"],
)
def test_parse_duration_out_of_range(text: str) -> None:
    with raises(ConfigError, f"bad duration {text!r}: must be more than 0s and at most 3650d"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["apply"], "the following arguments are required: -f/--filename"),
        (["get"], "the following arguments are required: kind"),
        (["token", "create", "spiffe://x/y", "--uses", "many"], "invalid int value: 'many'"),
        (["get", "agents", "-o", "xml"], "invalid choice: 'xml'"),
        (["registry", "init", "--data-dir", "d"], "required: --trust-domain"),
        (["agent", "enable", "alice", "--reason", "x"], "unrecognized arguments: --reason x"),
    ],
    ids=[
        "no-command",
        "unknown-command",
        "apply-without-f",
        "get-without-kind",
        "uses-not-int",
        "unknown-output",
        "init-without-domain",
        "enable-takes-no-reason",
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.startswith("usage: trustmesh")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["apply", "-f", "/nonexistent.yaml"],
            "cannot read /nonexistent.yaml: No such file or directory",
        ),
        (["token", "create", "spiffe://x/y", "--ttl", "banana"], "bad duration 'banana'"),
        (["token", "create", "not-an-id"], "Invalid SPIFFE ID 'not-an-id'"),
        (
            ["get", "agents", "--config", "{tmp}/missing.yaml"],
            "no client config at {tmp}/missing.yaml",
        ),
        (
            ["get", "agents", "--credentials", "{tmp}/op.pem"],
            "--credentials needs --trust-bundle and --registry too",
        ),
        (["registry", "serve", "--data-dir", "{tmp}"], "holds no CA: run `trustmesh registry init"),
        (
            [
                *("sidecar", "run", "--spiffe-id", "spiffe://test.local/agents/a"),
                *("--registry", "127.0.0.1:1", "--app", "127.0.0.1:2", "--data-dir", "{tmp}"),
                *("--credentials", "ca", "--event-loop", "libuv"),
            ],
            "unknown event loop 'libuv': expected one of auto, uvloop, asyncio",
        ),
        *(
            (
                [
                    *("sidecar", "run", "--spiffe-id", "spiffe://test.local/agents/a"),
                    *("--registry", "127.0.0.1:1", "--app", "127.0.0.1:2", "--data-dir", "{tmp}"),
                    *("--credentials", "ca", "--audit-flush-ms", value),
                ],
                f"--audit-flush-ms '{value}': expected whole milliseconds from 0 to 10000",
            )
            for value in ("-1", "10001", "0.5", "soon")
        ),
    ],
    ids=[
        "apply-missing-file",
        "bad-ttl",
        "bad-spiffe-id",
        "missing-config",
        "credentials-alone",
        "serve-uninitialised",
        "unknown-event-loop",
        "audit-flush-negative",
        "audit-flush-too-long",
        "audit-flush-fraction",
        "audit-flush-word",
    ],
)
def test_config_errors_exit_1_with_one_line(
    argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 1
    out = capsys.readouterr()
    lines = out.err.splitlines()
    assert len(lines) == 1, out.err
    assert lines[0].startswith("trustmesh: error: ")
    assert message.replace("{tmp}", str(tmp_path)) in lines[0]
    assert out.out == ""


def test_out_of_range_uses_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    DataDir(tmp_path / "d").init(
        TrustDomain.parse("test.local"), now=datetime.now(UTC), registry_address="127.0.0.1:1"
    )
    argv = [
        "token",
        "create",
        "spiffe://test.local/a",
        "--uses",
        "99999999999",
        "--config",
        str(tmp_path / "d" / "config.yaml"),
    ]
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("trustmesh: error: ")
    assert "99999999999" in line


def test_verbose_lets_the_traceback_through(tmp_path: Path) -> None:
    with raises(ConfigError, "cannot read /nonexistent.yaml"):
        main(["-v", "apply", "-f", "/nonexistent.yaml"])


def test_apply_reports_the_file_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: trustmesh.dev/v1alpha1\nkind: Agent\nmetadata: {name: a}\n"
        "spec: {spiffeId: 'spiffe://test.local/agents/a', blueprint: any}\n"
    )
    assert main(["apply", "-f", str(bad)]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == f"trustmesh: error: {bad}#1: spec.sponsor: is required"


@pytest.mark.parametrize(
    ("created", "want"),
    [
        (1764455400.25, "2025-11-29T22:30:00.250Z audit {}"),
        (1764455400.0, "2025-11-29T22:30:00.000Z audit {}"),
        (1764455401.5, "2025-11-29T22:30:01.500Z audit {}"),
        (0.007, "1970-01-01T00:00:00.007Z audit {}"),
    ],
    ids=["millis", "whole-second", "next-second", "epoch"],
)
def test_audit_lines_are_dated_in_utc_to_the_millisecond(created: float, want: str) -> None:
    from trustmesh.audit_log import AuditFormatter

    formatter = AuditFormatter()
    record = logging.LogRecord("trustmesh.audit", logging.INFO, __file__, 0, "{}", (), None)
    record.created, record.msecs = created, (created - int(created)) * 1000
    assert formatter.format(record) == want
    assert formatter.format(record) == want  # the cached date part is reused
