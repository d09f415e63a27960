"""Bootstrap against a real registry: join tokens, CSRs and trust in the registry.

Every Join here is a real gRPC call over the bootstrap listener's TLS, verified
against the real bundle and the registry's exact SPIFFE ID.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.channels import MeshChannels
from trustmesh.errors import BootstrapError, MeshError, PeerAuthenticationError
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.x509svid import BundleSet, TrustBundle, ca_fingerprint, generate_key, make_csr
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig
from trustmesh_sidecar.credentials import RegistryCredentials

from harness import TD, Mesh, agent_id

REGISTRY_ID = SpiffeId.parse(f"spiffe://{TD}/trustmesh/registry")
USED_UP = "trustmesh: join_token_invalid: join token is unknown, expired or used up"


def _now() -> datetime:
    return datetime.now(UTC)


def _bundles(mesh: Mesh) -> BundleSet:
    return BundleSet({}).with_bundle(
        TrustBundle.from_pem(TrustDomain.parse(TD), mesh.bundle_path.read_bytes())
    )


async def _join_many(mesh: Mesh, requests: list[tuple[str, bytes]]) -> list[object]:
    """Join concurrently over one verified bootstrap channel; results or AioRpcErrors."""
    assert mesh.registry is not None
    bundles = _bundles(mesh)
    channels = MeshChannels(lambda: (None, bundles))
    try:
        stub = rgrpc.BootstrapStub(await channels.get(mesh.registry.bootstrap_address, REGISTRY_ID))
        calls = [stub.Join(rpb.JoinRequest(token=t, csr=c), timeout=10) for t, c in requests]
        return list(await asyncio.gather(*calls, return_exceptions=True))
    finally:
        await channels.close()


async def _join(mesh: Mesh, token: str, csr: bytes) -> rpb.SvidResponse:
    (result,) = await _join_many(mesh, [(token, csr)])
    if isinstance(result, BaseException):
        raise result
    assert isinstance(result, rpb.SvidResponse)
    return result


def _csr(key: ec.EllipticCurvePrivateKey, sid: SpiffeId) -> bytes:
    return make_csr(key, sid)


def _outcomes(results: list[object]) -> tuple[int, list[str]]:
    ok = sum(isinstance(r, rpb.SvidResponse) for r in results)
    errors = [r.details() or "" for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert ok + len(errors) == len(results), results
    return ok, errors


# -- 1. token uses -------------------------------------------------------------------------


async def test_token_used_twice_fails_the_second_time(mesh: Mesh) -> None:
    sid = agent_id("alice")
    token = await mesh.token(sid)
    first = await _join(mesh, token, _csr(generate_key(), sid))
    assert first.cert_chain
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _join(mesh, token, _csr(generate_key(), sid))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == USED_UP


@pytest.mark.parametrize(("uses", "attempts"), [(1, 8), (3, 8)], ids=["uses-1", "uses-3"])
async def test_concurrent_joins_spend_exactly_the_uses(
    mesh: Mesh, uses: int, attempts: int
) -> None:
    sid = agent_id("replica")
    token = await mesh.token(sid, uses=uses)
    results = await _join_many(mesh, [(token, _csr(generate_key(), sid)) for _ in range(attempts)])
    ok, errors = _outcomes(results)
    assert ok == uses
    assert errors == [USED_UP] * (attempts - uses)


# -- 2. the CSR asks; the token decides ----------------------------------------------------


def _hostile_csr(key: ec.EllipticCurvePrivateKey, case: str) -> bytes:
    bound = str(agent_id("alice"))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(bound)]
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "admin")])
    )
    if case == "other-id":
        sans = [x509.UniformResourceIdentifier(f"spiffe://{TD}/operators/admin")]
    elif case == "dns-san":
        sans.append(x509.DNSName("registry.test.local"))
    elif case == "extra-uri-sans":
        sans += [
            x509.UniformResourceIdentifier(str(REGISTRY_ID)),
            x509.UniformResourceIdentifier("https://evil.example/"),
        ]
    elif case == "ca-true":
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True
        )
    builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize("case", ["other-id", "dns-san", "extra-uri-sans", "ca-true"])
async def test_issued_cert_carries_only_the_bound_id(mesh: Mesh, case: str) -> None:
    sid = agent_id("alice")
    key = generate_key()
    resp = await _join(mesh, await mesh.token(sid), _hostile_csr(key, case))
    assert len(resp.cert_chain) == 1
    cert = x509.load_der_x509_certificate(resp.cert_chain[0])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(sid)]
    assert san.get_values_for_type(x509.DNSName) == []
    assert len(list(san)) == 1
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert cert.public_key() == key.public_key()
    assert mesh.registry is not None
    cert.verify_directly_issued_by(mesh.registry.ca.cert)


async def test_csr_with_forged_signature_is_refused(mesh: Mesh) -> None:
    sid = agent_id("alice")
    csr = bytearray(_csr(generate_key(), sid))
    csr[-1] ^= 0x01  # the last byte of the ECDSA signature's s
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _join(mesh, await mesh.token(sid), bytes(csr))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == (
        "trustmesh: bad_csr: CSR signature does not verify with the CSR's own public key"
    )


# -- 4. reserved IDs and expiry --------------------------------------------------------------


@pytest.mark.parametrize(
    "spiffe_id",
    [
        f"spiffe://{TD}/operators/admin",
        f"spiffe://{TD}/operators/team/bob",
        f"spiffe://{TD}/operators",
        str(REGISTRY_ID),
    ],
    ids=["operator", "nested-operator", "operators-root", "registry"],
)
async def test_no_tokens_for_reserved_ids(mesh: Mesh, spiffe_id: str) -> None:
    with pytest.raises(MeshError) as err:
        await mesh.token(SpiffeId.parse(spiffe_id))
    assert err.value.reason == "invalid_config"
    assert err.value.message == f"join tokens are never issued for {spiffe_id}: it is reserved"


async def test_expired_token_is_refused(mesh: Mesh) -> None:
    sid = agent_id("alice")
    token = await mesh.token(sid, ttl=1)
    await asyncio.sleep(1.5)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await _join(mesh, token, _csr(generate_key(), sid))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == USED_UP


# -- 5. trust in the registry ------------------------------------------------------------------


@dataclass
class Impostor:
    server: RegistryServer
    seen_tokens: list[str]


@pytest.fixture
async def impostor(tmp_path: Path) -> AsyncIterator[Impostor]:
    """A second registry for the same trust domain, with its own CA; records tokens it sees."""
    data = tmp_path / "impostor"
    DataDir(data).init(TrustDomain.parse(TD), now=_now(), registry_address="127.0.0.1:0")
    server = RegistryServer(ServeConfig(data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0"))
    seen: list[str] = []
    attest = server.attestor.attest

    def recording(evidence: str, *, now: datetime) -> SpiffeId:
        seen.append(evidence)
        return attest(evidence, now=now)

    server.attestor.attest = recording  # type: ignore[method-assign]
    await server.start()
    try:
        yield Impostor(server, seen)
    finally:
        await server.stop(0.2)


def _credentials(
    tmp_path: Path, target: RegistryServer, token: str, **trust: object
) -> RegistryCredentials:
    return RegistryCredentials(
        agent_id("alice"),
        registry=target.address,
        bootstrap=target.bootstrap_address,
        data_dir=tmp_path / "sc",
        clock=_now,
        join_token=token,
        **trust,  # type: ignore[arg-type]
    )


async def test_pinned_fingerprint_refuses_an_impostor(
    mesh: Mesh, impostor: Impostor, tmp_path: Path
) -> None:
    assert mesh.registry is not None
    pin = ca_fingerprint(mesh.registry.ca.cert)
    assert pin != ca_fingerprint(impostor.server.ca.cert)
    token = await mesh.token(agent_id("alice"))
    creds = _credentials(tmp_path, impostor.server, token, ca_fingerprint=pin)
    with pytest.raises(PeerAuthenticationError) as err:
        await asyncio.wait_for(creds.obtain(), 15)
    assert err.value.reason == "registry_untrusted"
    assert f"does not match the pinned fingerprint {pin}" in err.value.message
    assert impostor.seen_tokens == []
    assert not (tmp_path / "sc" / "svid.key").exists()


async def test_control_pinning_the_impostor_hands_it_the_token(
    mesh: Mesh, impostor: Impostor, tmp_path: Path
) -> None:
    """The recorder works: with the impostor's own pin the token does reach it."""
    token = await mesh.token(agent_id("alice"))
    creds = _credentials(
        tmp_path, impostor.server, token, ca_fingerprint=ca_fingerprint(impostor.server.ca.cert)
    )
    with pytest.raises(BootstrapError):
        await asyncio.wait_for(creds.obtain(), 15)
    assert impostor.seen_tokens == [token]


async def test_pinned_fingerprint_accepts_the_real_registry(mesh: Mesh, tmp_path: Path) -> None:
    assert mesh.registry is not None
    pin = ca_fingerprint(mesh.registry.ca.cert).upper().replace("SHA256:", "sha256:")
    creds = _credentials(
        tmp_path, mesh.registry, await mesh.token(agent_id("alice")), ca_fingerprint=pin
    )
    svid = await asyncio.wait_for(creds.obtain(), 15)
    assert svid.spiffe_id == agent_id("alice")


async def test_bundle_file_refuses_an_impostor(
    mesh: Mesh, impostor: Impostor, tmp_path: Path
) -> None:
    token = await mesh.token(agent_id("alice"))
    creds = _credentials(tmp_path, impostor.server, token, bundle_file=mesh.bundle_path)
    with pytest.raises(PeerAuthenticationError) as err:
        await asyncio.wait_for(creds.obtain(), 15)
    assert f"join at {impostor.server.bootstrap_address} failed: TLS handshake" in err.value.message
    assert "CERTIFICATE_VERIFY_FAILED" in err.value.message
    assert impostor.seen_tokens == []


# -- 6. what stays where -------------------------------------------------------------------------


def _pem_body(pem: bytes) -> bytes:
    return b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))


def _registry_bytes(mesh: Mesh) -> bytes:
    """Every file of the registry's data dir that is not the CA or operator material."""
    root = mesh.root / "registry"
    return b"".join(p.read_bytes() for p in sorted(root.glob("registry.db*")))


async def test_private_key_stays_with_the_sidecar(
    mesh: Mesh, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert mesh.registry is not None
    caplog.set_level(logging.DEBUG)
    creds = _credentials(
        tmp_path, mesh.registry, await mesh.token(agent_id("alice")), bundle_file=mesh.bundle_path
    )
    svid = await asyncio.wait_for(creds.obtain(), 15)
    key_file = tmp_path / "sc" / "svid.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "sc").stat().st_mode) == 0o700
    key_pem = key_file.read_bytes()
    assert key_pem == svid.key_pem()
    body = _pem_body(key_pem)
    scalar = svid.private_key.private_numbers().private_value.to_bytes(32, "big")
    stored = _registry_bytes(mesh)
    assert stored  # the database is where we look
    secrets: list[tuple[str, bytes]] = [("pem", body), ("scalar", scalar)]
    secrets += [(f"pem-line-{i}", line) for i, line in enumerate(key_pem.splitlines()[1:-1])]
    for what, secret in secrets:
        assert secret not in stored, what
        assert secret.decode("latin-1") not in caplog.text, what


async def test_join_tokens_are_stored_hashed(mesh: Mesh) -> None:
    token = await mesh.token(agent_id("alice"), uses=2)
    stored = _registry_bytes(mesh)
    assert (
        hashlib.sha256(token.encode()).hexdigest().encode() in stored
    )  # we look in the right place
    assert token.encode() not in stored
    assert token.removeprefix("tmjt.").encode() not in stored
