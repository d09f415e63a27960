"""k8s/base/registry/init-datadir.sh, the registry's init container, run with `sh`
and the real `trustmesh` CLI: idempotent, and the Secret path installs the CA as-is."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from k8s_support import K8S

from trustmesh.ca import CertificateAuthority

SCRIPT = K8S / "base" / "registry" / "init-datadir.sh"
SH = shutil.which("sh")
pytestmark = pytest.mark.skipif(SH is None, reason="no sh")


def run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    bindir = str(Path(sys.executable).parent)  # where `trustmesh` is installed
    full = {"PATH": f"{bindir}:{os.environ.get('PATH', '')}", "HOME": str(tmp_path), **env}
    return subprocess.run(
        [SH or "sh", str(SCRIPT)], env=full, capture_output=True, text=True, check=False, timeout=60
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_first_start_initialises_then_later_starts_do_nothing(tmp_path: Path) -> None:
    data = tmp_path / "pvc" / "data"
    env = {
        "TRUSTMESH_DATA_DIR": str(data),
        "TRUSTMESH_CA_DIR": str(tmp_path / "no-secret"),
        "TRUSTMESH_TRUST_DOMAIN": "example.org",
        "TRUSTMESH_REGISTRY_ADDRESS": "trustmesh-registry.trustmesh-system.svc:8443",
    }
    first = run(tmp_path, **env)
    assert first.returncode == 0, first.stderr
    assert "initialised trust domain example.org" in first.stdout
    assert mode(data) == 0o700 and mode(data / "ca.key") == 0o600
    assert (
        "registry: trustmesh-registry.trustmesh-system.svc:8443"
        in (data / "config.yaml").read_text()
    )
    key = (data / "ca.key").read_bytes()
    second = run(tmp_path, **env)
    assert (second.returncode, second.stdout) == (
        0,
        f"init-datadir: {data} is already initialised\n",
    )
    assert (data / "ca.key").read_bytes() == key


def test_the_secret_path_installs_the_given_ca(tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from trustmesh.spiffe_id import TrustDomain

    ca = CertificateAuthority.create(TrustDomain.parse("example.org"), now=datetime.now(UTC))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "ca.key").write_bytes(ca.key_pem())
    (secret / "ca.crt").write_bytes(ca.cert_pem())
    for f in secret.iterdir():
        f.chmod(0o440)  # defaultMode of the Secret volume
    data = tmp_path / "data"
    out = run(tmp_path, TRUSTMESH_DATA_DIR=str(data), TRUSTMESH_CA_DIR=str(secret))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"init-datadir: installed the CA from {secret} into {data}\n"
    assert (data / "ca.key").read_bytes() == ca.key_pem()
    assert (data / "bundle.pem").read_bytes() == (data / "ca.crt").read_bytes() == ca.cert_pem()
    assert (mode(data), mode(data / "ca.key"), mode(data / "ca.crt")) == (0o700, 0o600, 0o644)
    assert sorted(p.name for p in data.iterdir()) == ["bundle.pem", "ca.crt", "ca.key"]
    # What the registry will load, it can load.
    from trustmesh_registry.datadir import DataDir

    assert DataDir(data).load_ca().trust_domain == TrustDomain.parse("example.org")


def test_missing_settings_fail_clearly(tmp_path: Path) -> None:
    out = run(
        tmp_path, TRUSTMESH_DATA_DIR=str(tmp_path / "d"), TRUSTMESH_CA_DIR=str(tmp_path / "none")
    )
    assert out.returncode != 0
    assert "TRUSTMESH_TRUST_DOMAIN is not set" in out.stderr
