"""The per-chain caller cache never answers where `PeerVerifier` would refuse."""

from __future__ import annotations

from datetime import timedelta

import pytest

from trustmesh.errors import MeshError
from trustmesh.peer_verify import PeerVerifier
from trustmesh_sidecar.callers import Callers

from certs import NOW, TD, bundles, der, forge_leaf, make_ca, uri

CA = make_ca(ttl=timedelta(days=1))
LEAF, _ = forge_leaf(CA, [uri(f"spiffe://{TD}/agents/a")], not_after=NOW + timedelta(days=7))
JUNK = make_ca("junk.example", ttl=timedelta(days=3650))  # unrelated, self-signed


@pytest.mark.parametrize(
    "chain",
    [der(LEAF), der(LEAF, JUNK.cert)],
    ids=["leaf", "leaf-with-an-unrelated-certificate-appended"],
)
def test_a_remembered_caller_ends_with_the_anchor(chain: tuple[bytes, ...]) -> None:
    verifier, callers = PeerVerifier(bundles(CA)), Callers()
    assert str(callers.verify(verifier, chain, NOW)) == f"spiffe://{TD}/agents/a"
    assert str(callers.verify(verifier, chain, NOW + timedelta(hours=1))) == (
        f"spiffe://{TD}/agents/a"
    )
    later = NOW + timedelta(days=2)  # the bundle CA has expired; the leaf has not
    with pytest.raises(MeshError):
        PeerVerifier(bundles(CA)).verify(chain, now=later, role="client")
    with pytest.raises(MeshError):
        callers.verify(verifier, chain, later)
