"""The sidecar's credential source, without a registry: config errors, reuse, signer."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.errors import ConfigError
from trustmesh.x509svid import write_private_file, write_public_file
from trustmesh_sidecar.credentials import RegistryCredentials

from certs import HOUR, NOW, TD, issue, make_ca, sid

AGENT = sid(f"spiffe://{TD}/agents/a")


def _creds(tmp_path: Path, now: datetime = NOW, **kw: object) -> RegistryCredentials:
    args: dict[str, object] = {
        "registry": "127.0.0.1:1",
        "bootstrap": "127.0.0.1:2",
        "data_dir": tmp_path,
        "clock": lambda: now,
        "bundle_file": tmp_path / "b.pem",
    }
    args.update(kw)
    return RegistryCredentials(AGENT, **args)  # type: ignore[arg-type]


def test_refuses_to_start_without_a_way_to_trust_the_registry(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--trust-bundle FILE or --ca-fingerprint"):
        _creds(tmp_path, bundle_file=None)


@pytest.mark.parametrize(
    ("issued_for", "age", "reused"),
    [
        (AGENT, timedelta(minutes=10), True),
        (AGENT, timedelta(minutes=58), False),  # < 10% of its lifetime left
        (sid(f"spiffe://{TD}/agents/other"), timedelta(minutes=1), False),
    ],
    ids=["fresh-same-id", "nearly-expired", "other-id"],
)
def test_reuses_an_svid_on_disk_only_when_it_is_ours_and_fresh(
    tmp_path: Path, issued_for: object, age: timedelta, reused: bool
) -> None:
    ca = make_ca(TD)
    svid = issue(ca, issued_for, now=NOW, ttl=HOUR)  # type: ignore[arg-type]
    write_public_file(tmp_path / "svid.crt", svid.chain_pem())
    write_private_file(tmp_path / "svid.key", svid.key_pem())
    loaded = _creds(tmp_path, now=NOW + age)._load_existing()
    assert (loaded is not None) == reused


def test_a_damaged_svid_file_means_bootstrap_again_not_a_crash(tmp_path: Path) -> None:
    write_public_file(tmp_path / "svid.crt", b"-----BEGIN CERTIFICATE-----\ngarbage\n")
    write_private_file(tmp_path / "svid.key", b"junk")
    assert _creds(tmp_path)._load_existing() is None


def test_signer_signs_with_the_current_svid_key(tmp_path: Path) -> None:
    ca = make_ca(TD)
    svid = issue(ca, AGENT, now=NOW, ttl=HOUR)
    creds = _creds(tmp_path)
    creds._svid = svid
    signature, used = creds.sign(b"hop")
    public = used.leaf.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"hop", ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"tampered", ec.ECDSA(hashes.SHA256()))


def test_renewal_is_half_of_what_was_left_on_receipt(tmp_path: Path) -> None:
    ca = make_ca(TD)
    svid = issue(ca, AGENT, now=NOW, ttl=timedelta(seconds=6))  # notBefore backdated 30 s
    creds = _creds(tmp_path)
    creds._svid, creds._received_at = svid, NOW
    assert creds.renew_at() == NOW + (svid.not_after - NOW) / 2
    assert creds.renew_at() > NOW
