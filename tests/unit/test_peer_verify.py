"""Peer chain verification: what proves an identity, and every way it must not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.ca import CertificateAuthority
from trustmesh.errors import Code, PeerAuthenticationError
from trustmesh.peer_verify import MAX_CERT_BYTES, MAX_CHAIN_LENGTH, PeerVerifier, Role
from trustmesh.x509svid import BundleSet

from certs import (
    HOUR,
    NOW,
    OTHER_TD,
    TD,
    bundles,
    der,
    forge_leaf,
    issue,
    make_ca,
    make_intermediate,
    raises,
    sid,
    uri,
)

AGENT = sid("spiffe://example.org/agent")
ROLES: tuple[Role, ...] = ("client", "server")


@dataclass(frozen=True)
class World:
    """Our trust domain (root with room for an intermediate) and a federated one."""

    ca: CertificateAuthority
    other: CertificateAuthority
    bundles: BundleSet


@pytest.fixture(scope="module")
def world() -> World:
    ca = make_ca(TD, path_length=1)
    other = make_ca(OTHER_TD, path_length=1)
    return World(ca, other, bundles(ca, other))


def verifier(world: World, **kw: int) -> PeerVerifier:
    return PeerVerifier(world.bundles, **kw)


# -- what verifies ------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_issued_svid_verifies(world: World, role: Role) -> None:
    svid = issue(world.ca, AGENT)
    assert verifier(world).verify(svid.chain_der(), now=NOW, role=role) == AGENT


@pytest.mark.parametrize("role", ROLES)
def test_spire_shaped_chain_with_intermediate_verifies(world: World, role: Role) -> None:
    inter = make_intermediate(world.ca)
    svid = issue(inter, AGENT, intermediates=(inter.cert,))
    assert len(svid.chain_der()) == 2
    assert verifier(world).verify(svid.chain_der(), now=NOW, role=role) == AGENT


def test_federated_ca_vouches_for_its_own_trust_domain(world: World) -> None:
    svid = issue(world.other, "spiffe://other.org/partner")
    assert verifier(world).verify(svid.chain_der(), now=NOW, role="client") == sid(
        "spiffe://other.org/partner"
    )


def test_server_role_accepts_server_only_eku(world: World) -> None:
    cert, _ = forge_leaf(world.ca, [uri(str(AGENT))], ekus=[ExtendedKeyUsageOID.SERVER_AUTH])
    assert verifier(world).verify(der(cert), now=NOW, role="server") == AGENT


# -- what must not ------------------------------------------------------------------

Attack = Callable[[World], tuple[bytes, ...]]


def _impostor_ca(w: World) -> tuple[bytes, ...]:
    # Same trust domain name, same subject, different key: not in the bundle.
    return issue(make_ca(TD), AGENT).chain_der()


def _federated_ca_signs_our_id(w: World) -> tuple[bytes, ...]:
    cert, _ = forge_leaf(w.other, [uri(str(AGENT))])
    return der(cert)


def _federated_intermediate(w: World) -> tuple[bytes, ...]:
    inter = make_intermediate(w.other)
    cert, _ = forge_leaf(inter, [uri(str(AGENT))])
    return der(cert, inter.cert)


def _intermediate_under_pathlen_zero_root(w: World) -> tuple[bytes, ...]:
    root = make_ca(TD)  # path_length=0
    inter = make_intermediate(root)
    cert, _ = forge_leaf(inter, [uri(str(AGENT))])
    # Even a bundle that trusts this root must not accept the intermediate.
    return der(cert, inter.cert)


def _missing_intermediate(w: World) -> tuple[bytes, ...]:
    inter = make_intermediate(w.ca)
    return issue(inter, AGENT).chain_der()


@dataclass(frozen=True)
class _LeafAsSigner:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _leaf_signed_by_leaf(w: World) -> tuple[bytes, ...]:
    svid = issue(w.ca, "spiffe://example.org/honest")
    cert, _ = forge_leaf(_LeafAsSigner(svid.leaf, svid.private_key), [uri(str(AGENT))])
    return der(cert, svid.leaf)


def _forged(**kw: object) -> Attack:
    def build(w: World) -> tuple[bytes, ...]:
        cert, _ = forge_leaf(w.ca, **kw)  # type: ignore[arg-type]
        return der(cert)

    return build


NOT_CHAINED = "certificate for spiffe://example.org/agent does not chain to the trust bundle of "

ATTACKS: dict[str, tuple[Attack, Role, str, str]] = {
    "impostor-ca-claims-our-id": (_impostor_ca, "client", "peer_unauthenticated", NOT_CHAINED),
    "federated-ca-signs-our-id": (
        _federated_ca_signs_our_id,
        "client",
        "peer_unauthenticated",
        NOT_CHAINED + "example.org: validation failed",
    ),
    "federated-intermediate": (
        _federated_intermediate,
        "server",
        "peer_unauthenticated",
        NOT_CHAINED,
    ),
    "pathlen-0-root-with-intermediate": (
        _intermediate_under_pathlen_zero_root,
        "client",
        "peer_unauthenticated",
        NOT_CHAINED,
    ),
    "missing-intermediate": (_missing_intermediate, "client", "peer_unauthenticated", NOT_CHAINED),
    "leaf-signed-by-a-leaf": (_leaf_signed_by_leaf, "client", "peer_unauthenticated", NOT_CHAINED),
    "leaf-is-ca": (
        _forged(sans=[uri(str(AGENT))], is_ca=True),
        "client",
        "peer_unauthenticated",
        "basicConstraints.cA must not be asserted in an EE certificate",
    ),
    "expired": (
        _forged(sans=[uri(str(AGENT))], not_before=NOW - 2 * HOUR, not_after=NOW - HOUR),
        "client",
        "peer_unauthenticated",
        "certificate for spiffe://example.org/agent expired at 2025-06-01T11:00:00+00:00",
    ),
    "not-yet-valid": (
        _forged(sans=[uri(str(AGENT))], not_before=NOW + HOUR, not_after=NOW + 2 * HOUR),
        "server",
        "peer_unauthenticated",
        "certificate for spiffe://example.org/agent is not valid before 2025-06-01T13:00:00+00:00",
    ),
    "two-uri-sans": (
        _forged(sans=[uri(str(AGENT)), uri("spiffe://example.org/admin")]),
        "client",
        "peer_unauthenticated",
        "certificate has 2 URI SANs; an SVID has exactly one",
    ),
    "non-spiffe-uri": (
        _forged(sans=[uri("https://example.org/agent")]),
        "client",
        "peer_unauthenticated",
        "certificate URI SAN is not a SPIFFE ID",
    ),
    "no-san": (
        _forged(sans=None),
        "client",
        "peer_unauthenticated",
        "certificate has no subjectAltName",
    ),
    "unknown-trust-domain": (
        _forged(sans=[uri("spiffe://unknown.org/agent")]),
        "client",
        "peer_untrusted",
        "no trust bundle for trust domain unknown.org; cannot verify spiffe://unknown.org/agent",
    ),
    "trust-domain-id-as-peer": (
        lambda w: der(w.ca.cert),
        "client",
        "peer_unauthenticated",
        "peer certificate names the trust domain spiffe://example.org itself",
    ),
    "server-only-eku-as-client": (
        _forged(sans=[uri(str(AGENT))], ekus=[ExtendedKeyUsageOID.SERVER_AUTH]),
        "client",
        "peer_unauthenticated",
        "required EKU not found",
    ),
    "client-only-eku-as-server": (
        _forged(sans=[uri(str(AGENT))], ekus=[ExtendedKeyUsageOID.CLIENT_AUTH]),
        "server",
        "peer_unauthenticated",
        "certificate lacks the serverAuth extended key usage",
    ),
    "no-eku-as-server": (
        _forged(sans=[uri(str(AGENT))], ekus=None),
        "server",
        "peer_unauthenticated",
        NOT_CHAINED,
    ),
    "empty-chain": (
        lambda w: (),
        "client",
        "peer_unauthenticated",
        "peer presented no certificate",
    ),
    "garbage-der": (
        lambda w: (b"\x30\x03\x02\x01\x00",),
        "client",
        "peer_unauthenticated",
        "peer certificate #0 is not DER X.509",
    ),
    "garbage-intermediate": (
        lambda w: (*issue(w.ca, AGENT).chain_der(), b"junk"),
        "client",
        "peer_unauthenticated",
        "peer certificate #1 is not DER X.509",
    ),
    "chain-too-long": (
        lambda w: issue(w.ca, AGENT).chain_der() * (MAX_CHAIN_LENGTH + 1),
        "client",
        "peer_unauthenticated",
        f"peer presented {MAX_CHAIN_LENGTH + 1} certificates; at most {MAX_CHAIN_LENGTH}",
    ),
    "oversized-cert": (
        lambda w: (b"\x30" * (MAX_CERT_BYTES + 1),),
        "client",
        "peer_unauthenticated",
        f"at most {MAX_CERT_BYTES} are accepted",
    ),
}


@pytest.mark.parametrize(
    ("attack", "role", "reason", "message"), ATTACKS.values(), ids=ATTACKS.keys()
)
def test_attack_rejected(
    world: World, attack: Attack, role: Role, reason: str, message: str
) -> None:
    chain = attack(world)
    with raises(PeerAuthenticationError, message) as info:
        verifier(world).verify(chain, now=NOW, role=role)
    assert info.value.reason == reason
    assert info.value.code is Code.UNAUTHENTICATED


def test_chain_errors_wrap_the_cryptography_exception(world: World) -> None:
    with raises(PeerAuthenticationError, NOT_CHAINED) as info:
        verifier(world).verify(_impostor_ca(world), now=NOW, role="client")
    assert info.value.__cause__ is not None


def test_bundle_only_for_other_trust_domain_is_untrusted(world: World) -> None:
    # A verifier that trusts only other.org: our own IDs are untrusted there, even
    # though other.org's CA would be happy to sign anything.
    only_other = PeerVerifier(bundles(world.other))
    cert, _ = forge_leaf(world.other, [uri(str(AGENT))])
    with raises(PeerAuthenticationError, "no trust bundle for trust domain example.org") as info:
        only_other.verify(der(cert), now=NOW, role="client")
    assert info.value.reason == "peer_untrusted"


_FUZZ_CA = make_ca(TD)


@settings(max_examples=60, deadline=None)
@given(position=st.integers(min_value=0), flip=st.integers(min_value=1, max_value=255))
def test_corrupted_leaf_never_escapes_as_a_raw_exception(position: int, flip: int) -> None:
    ca = _FUZZ_CA
    chain = issue(ca, AGENT).chain_der()
    leaf = bytearray(chain[0])
    leaf[position % len(leaf)] ^= flip
    try:
        got = PeerVerifier(bundles(ca)).verify([bytes(leaf)], now=NOW, role="client")
    except PeerAuthenticationError:
        return
    # Flips inside unsigned framing can leave the signed content intact.
    assert got == AGENT


# -- expect -------------------------------------------------------------------------


def test_expect(world: World) -> None:
    chain = issue(world.ca, AGENT).chain_der()
    v = verifier(world)
    v.expect(chain, AGENT, now=NOW, role="server")
    with raises(
        PeerAuthenticationError,
        "expected spiffe://example.org/billing, peer presented spiffe://example.org/agent",
    ) as info:
        v.expect(chain, sid("spiffe://example.org/billing"), now=NOW, role="server")
    assert info.value.reason == "peer_identity_mismatch"


def test_expect_on_intermediate_chain_with_wrong_identity(world: World) -> None:
    inter = make_intermediate(world.ca)
    chain = issue(inter, AGENT, intermediates=(inter.cert,)).chain_der()
    with raises(PeerAuthenticationError, "peer presented spiffe://example.org/agent") as info:
        verifier(world).expect(chain, sid("spiffe://other.org/agent"), now=NOW, role="client")
    assert info.value.reason == "peer_identity_mismatch"


# -- the cache ----------------------------------------------------------------------


def test_cache_hits_within_validity(world: World) -> None:
    v = verifier(world)
    chain = issue(world.ca, AGENT, ttl=HOUR).chain_der()
    for _ in range(3):
        assert v.verify(chain, now=NOW, role="client") == AGENT
    info = v.cache_info()
    assert (info.hits, info.misses, info.size) == (2, 1, 1)
    # The other role is a separate entry: EKU rules differ.
    v.verify(chain, now=NOW, role="server")
    assert v.cache_info().misses == 2


@pytest.mark.parametrize(
    ("later", "message"),
    [
        (HOUR + timedelta(seconds=1), "expired at 2025-06-01T13:00:00+00:00"),
        (-timedelta(minutes=5), "is not valid before 2025-06-01T11:59:30+00:00"),
    ],
    ids=["after-expiry", "before-not-before"],
)
def test_cache_hit_not_honoured_outside_validity(
    world: World, later: timedelta, message: str
) -> None:
    v = verifier(world)
    chain = issue(world.ca, AGENT, ttl=HOUR).chain_der()
    v.verify(chain, now=NOW, role="client")
    with raises(PeerAuthenticationError, message):
        v.verify(chain, now=NOW + later, role="client")
    assert v.cache_info().hits == 0


def test_cache_window_includes_the_intermediate(world: World) -> None:
    # A leaf that outlives its intermediate (sign_csr would cap it; forge it).
    inter = make_intermediate(world.ca, ttl=timedelta(minutes=10))
    leaf, _ = forge_leaf(inter, [uri(str(AGENT))], not_after=NOW + HOUR)
    chain = der(leaf, inter.cert)
    v = verifier(world)
    v.verify(chain, now=NOW, role="client")
    with raises(PeerAuthenticationError, NOT_CHAINED):
        v.verify(chain, now=NOW + timedelta(minutes=20), role="client")
    assert v.cache_info().hits == 0


def test_cache_is_lru_bounded(world: World) -> None:
    v = verifier(world, cache_size=2)
    a, b, c = (issue(world.ca, AGENT).chain_der() for _ in range(3))
    for chain in (a, b, a, c):  # touching `a` makes `b` the least recently used
        v.verify(chain, now=NOW, role="client")
    assert v.cache_info().size == 2
    v.verify(a, now=NOW, role="client")
    assert v.cache_info().hits == 2
    v.verify(b, now=NOW, role="client")
    assert v.cache_info().misses == 4


def test_cache_can_be_disabled(world: World) -> None:
    v = verifier(world, cache_size=0)
    chain = issue(world.ca, AGENT).chain_der()
    v.verify(chain, now=NOW, role="client")
    v.verify(chain, now=NOW, role="client")
    assert (v.cache_info().hits, v.cache_info().size) == (0, 0)


def test_new_bundles_mean_a_new_verifier(world: World) -> None:
    chain = issue(world.ca, AGENT).chain_der()
    old = verifier(world)
    old.verify(chain, now=NOW, role="client")
    rotated = PeerVerifier(world.bundles.with_bundle(make_ca(TD).bundle()))
    with raises(PeerAuthenticationError, NOT_CHAINED + "example.org"):
        rotated.verify(chain, now=NOW, role="client")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda v, c: v.verify(c, now=NOW.replace(tzinfo=None), role="client"), "timezone-aware"),
        (lambda v, c: v.verify(c, now=NOW, role="peer"), "role must be 'client' or 'server'"),
        (lambda v, c: v.verify(c[0], now=NOW, role="client"), "not one blob"),
        (lambda v, c: PeerVerifier(BundleSet(), cache_size=-1), "cache_size must be >= 0"),
    ],
    ids=["naive-now", "bad-role", "bytes-not-sequence", "negative-cache"],
)
def test_programming_errors(
    world: World, call: Callable[[PeerVerifier, tuple[bytes, ...]], object], message: str
) -> None:
    chain = issue(world.ca, AGENT).chain_der()
    with raises((ValueError, TypeError), message):
        call(verifier(world), chain)
