"""The real `trustmesh` CLI as a subprocess, against a real `trustmesh registry serve`."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

TD = "test.local"
API = "trustmesh.dev/v1alpha1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(config: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRUSTMESH_", "OTEL_"))}
    if config is not None:
        env["TRUSTMESH_CONFIG"] = str(config)
    return env


def tm(
    *args: str, config: Path | None = None, cwd: Path | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trustmesh", *args],
        capture_output=True,
        text=True,
        env=_env(config),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    """The exit code is `code` and stderr is one `trustmesh: error:` line; returns it."""
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trustmesh: error: ")
    return lines[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Registry:
    data: Path
    address: str
    process: subprocess.Popen[str]

    @property
    def config(self) -> Path:
        return self.data / "config.yaml"

    def ok(self, *args: str) -> str:
        result = tm(*args, config=self.config, cwd=self.data.parent)
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        return result.stdout

    def get_json(self, kind: str, name: str = "") -> Any:
        return json.loads(self.ok("get", kind, *([name] if name else []), "-o", "json"))


def _serve(data: Path, log: Path) -> tuple[subprocess.Popen[str], str] | None:
    """Start `registry serve` on fresh ports; None if it died first (a port was taken)."""
    address, boot = f"127.0.0.1:{_free_port()}", f"127.0.0.1:{_free_port()}"
    with log.open("a") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "trustmesh",
                "registry",
                "serve",
                "--data-dir",
                str(data),
                "--listen",
                address,
                "--bootstrap-listen",
                boot,
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            env=_env(None),
        )
    assert proc.stdout is not None
    deadline = time.monotonic() + 15
    while proc.poll() is None and time.monotonic() < deadline:
        ready = select.select([proc.stdout], [], [], 0.1)[0]
        if ready and "registry serving" in proc.stdout.readline():
            return proc, address
    _stop(proc)
    return None


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    root = tmp_path_factory.mktemp("cli")
    data, log = root / "reg", root / "registry.stderr"
    init = tm("registry", "init", "--data-dir", str(data), "--trust-domain", TD)
    assert init.returncode == 0, init.stderr
    for _ in range(3):
        started = _serve(data, log)
        if started is not None:
            break
    else:
        raise TimeoutError(f"registry did not start: {log.read_text()[-2000:]}")
    proc, address = started
    config = data / "config.yaml"
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "registry": address}, sort_keys=False))
    try:
        yield Registry(data, address, proc)
    finally:
        _stop(proc)


def _doc(kind: str, name: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": kind, "metadata": {"name": name}, "spec": spec}


def _bp(name: str) -> dict[str, Any]:
    return _doc("AgentBlueprint", name, allowedMethods=["*"])


def _agent(name: str, bp: str, **spec: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "spiffeId": f"spiffe://{TD}/agents/{name}",
        "blueprint": bp,
        "sponsor": "cli@example.com",
        **spec,
    }
    return _doc("Agent", name, **fields)


def _write(path: Path, *docs: dict[str, Any] | str) -> Path:
    path.write_text("---\n".join(d if isinstance(d, str) else yaml.safe_dump(d) for d in docs))
    return path


# -- 1. registry init -------------------------------------------------------------------------


def test_registry_init_makes_private_files_and_refuses_twice(tmp_path: Path) -> None:
    data = tmp_path / "reg"
    result = tm("registry", "init", "--data-dir", str(data), "--trust-domain", TD)
    assert result.returncode == 0, result.stderr
    assert "CA fingerprint: sha256:" in result.stdout
    assert _mode(data) == 0o700
    assert _mode(data / "operator") == 0o700
    for private in ("ca.key", "operator/admin.key", "config.yaml", "registry.db"):
        assert _mode(data / private) == 0o600, private
    ca_key = (data / "ca.key").read_bytes()

    again = tm("registry", "init", "--data-dir", str(data), "--trust-domain", TD)
    line = one_error_line(again)
    assert line == f"trustmesh: error: {data} is already initialised (found ca.key)"
    assert (data / "ca.key").read_bytes() == ca_key


# -- 2. bad manifests apply nothing -------------------------------------------------------------

BAD = {
    "malformed-yaml": ("kind: Agent\nmetadata: {name: x\n", "#3: malformed YAML at line 2"),
    "unknown-kind": (_doc("Agnet", "x"), "#3: kind: unknown kind 'Agnet'"),
    "missing-sponsor": (
        _doc("Agent", "x", spiffeId=f"spiffe://{TD}/agents/x", blueprint="cli-bp"),
        "#3: spec.sponsor: is required",
    ),
    "malformed-spiffe-id": (
        _agent("x", "cli-bp", spiffeId="spiffe://Test Local/x"),
        "#3: spec.spiffeId: Invalid SPIFFE ID 'spiffe://Test Local/x'",
    ),
    "reserved-spiffe-id": (
        _agent("x", "cli-bp", spiffeId=f"spiffe://{TD}/operators/x"),
        f"#3: spec.spiffeId: spiffe://{TD}/operators/x is reserved",
    ),
    "unknown-blueprint": (_agent("x", "nope"), "#3: spec.blueprint: AgentBlueprint 'nope'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_manifest_is_one_line_and_applies_nothing(
    registry: Registry, tmp_path: Path, case: str
) -> None:
    bad, where = BAD[case]
    name = f"good-{case}"
    path = _write(tmp_path / "bad.yaml", _bp("cli-bp"), _agent(name, "cli-bp"), bad)
    line = one_error_line(tm("apply", "-f", str(path), config=registry.config))
    assert f"{path}{where}" in line
    assert name not in {a["metadata"]["name"] for a in registry.get_json("agents")}
    assert "cli-bp" not in {b["metadata"]["name"] for b in registry.get_json("blueprints")}


# -- 3. wrong flags -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["apply"], 2, "the following arguments are required: -f/--filename"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (
            ["token", "create", "spiffe://x/y", "--ttl", "banana"],
            1,
            "trustmesh: error: bad duration 'banana': use a number and a unit",
        ),
        (["token", "create", "alice"], 1, "trustmesh: error: Invalid SPIFFE ID 'alice'"),
        (
            ["apply", "-f", "missing.yaml"],
            1,
            "trustmesh: error: cannot read missing.yaml: No such file or directory",
        ),
    ],
    ids=["apply-without-f", "unknown-command", "bad-ttl", "bad-spiffe-id", "missing-file"],
)
def test_wrong_flags_are_clear(tmp_path: Path, argv: list[str], code: int, message: str) -> None:
    result = tm(*argv, config=tmp_path / "config.yaml", cwd=tmp_path)
    assert result.returncode == code
    assert "Traceback" not in result.stderr
    assert message in result.stderr
    if code == 1:
        one_error_line(result)


# -- 4. scripting: JSON output and operator state ---------------------------------------------------


def test_json_output_and_operator_state(registry: Registry, tmp_path: Path) -> None:
    manifest = _write(tmp_path / "a.yaml", _bp("json-bp"), _agent("json-agent", "json-bp"))
    assert registry.ok("apply", "-f", str(manifest)).splitlines() == [
        "AgentBlueprint/json-bp created",
        "Agent/json-agent created",
    ]
    agents = registry.get_json("agents")
    assert isinstance(agents, list)
    assert {a["metadata"]["name"] for a in agents} >= {"json-agent"}

    sid = f"spiffe://{TD}/agents/json-agent"
    before = int(time.time())
    token = json.loads(registry.ok("token", "create", sid, "--ttl", "10m", "-o", "json"))
    assert token["token"].startswith("tmjt.")
    assert before + 600 <= token["expiresAt"] <= int(time.time()) + 600
    assert token["spiffeId"] == sid

    def status() -> dict[str, Any]:
        return dict(registry.get_json("agents", "json-agent")["status"])

    assert status()["state"] == "Active"
    assert "disabled" in registry.ok("agent", "disable", "json-agent", "--reason", "incident-7")
    st = status()
    assert (st["state"], st["disabledReason"]) == ("Disabled", "incident-7")

    assert registry.ok("apply", "-f", str(manifest)).splitlines() == [
        "AgentBlueprint/json-bp unchanged",
        "Agent/json-agent unchanged",
    ]
    changed = _write(tmp_path / "b.yaml", _agent("json-agent", "json-bp", owners=["o@example.com"]))
    assert registry.ok("apply", "-f", str(changed)).splitlines() == ["Agent/json-agent configured"]
    assert status()["state"] == "Disabled"

    assert "enabled" in registry.ok("agent", "enable", sid)  # by SPIFFE ID this time
    st = status()
    assert (st["state"], st["disabledReason"]) == ("Active", "")


@pytest.mark.parametrize("flag", [["--ttl", "0s"], ["--uses", "0"]], ids=["ttl-0s", "uses-0"])
def test_zero_token_ttl_or_uses_is_refused(registry: Registry, flag: list[str]) -> None:
    result = tm(
        "token", "create", f"spiffe://{TD}/agents/zero", *flag, "-o", "json", config=registry.config
    )
    one_error_line(result)


# -- 5. operator renew ------------------------------------------------------------------------------


def test_operator_renew_writes_a_new_cert(registry: Registry) -> None:
    cert_path = registry.data / "operator" / "admin.crt"
    key_path = registry.data / "operator" / "admin.key"
    old_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    old_key = key_path.read_bytes()
    out = registry.ok("operator", "renew")
    new_cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    assert new_cert.serial_number != old_cert.serial_number
    assert out.startswith(
        f"renewed spiffe://{TD}/operators/admin: serial {format(new_cert.serial_number, 'x')}"
    )
    assert key_path.read_bytes() != old_key
    assert _mode(key_path) == 0o600
    san = new_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [
        f"spiffe://{TD}/operators/admin"
    ]
    assert isinstance(registry.get_json("agents"), list)  # the new credential works


# -- 6. no registry -----------------------------------------------------------------------------------


def test_unreachable_registry_is_one_line(registry: Registry) -> None:
    closed = f"127.0.0.1:{_free_port()}"
    result = tm("get", "agents", "--registry", closed, config=registry.config, timeout=30)
    line = one_error_line(result)
    assert line.startswith(f"trustmesh: error: cannot reach the registry at {closed}")
