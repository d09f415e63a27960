"""The delegation chain cases for scripts/gen_delegation_vectors.py. TEST KEYS ONLY.

One case per valid chain and per denial reason: honest chains built with the real
`extend_chain`, and forged ones built hop by hop for the shapes it refuses to make.
The fixed clock `NOW` and the names here are shared with the generator.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from trustmesh.delegation import AgentOrigin, UserOrigin, extend_chain
from trustmesh.delegation_format import encode_chain, encode_hop, hop_digest, signing_input
from trustmesh.delegation_parse import split_chain
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import delegation_pb2 as dpb
from trustmesh.x509svid import X509Svid

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
TD = "example.org"
IDP = "https://idp.example"
METHOD = "/demo.Tool/Invoke"


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TD}/agents/{name}")


# -- chains -----------------------------------------------------------------------------


def _nonce(case: str, i: int) -> bytes:
    return hashlib.sha256(f"{case}/{i}".encode()).digest()[:16]


TRACE = bytes.fromhex("4bf92f3577b34da6a3ce929d0e0e4736")


def honest(
    svids: dict[str, X509Svid],
    case: str,
    path: Sequence[str],
    callee: str,
    *,
    scopes: Sequence[str] = ("tools:invoke",),
    user: UserOrigin | None = None,
    sign_last: bool = True,
    issued: datetime = NOW - timedelta(seconds=5),
) -> bytes:
    """A chain built with the real `extend_chain`: path[0] -> ... -> path[-1] -> callee."""
    chain: bytes | None = None
    names = [*path, callee]
    for i, issuer in enumerate(path):
        last = i == len(path) - 1
        chain = extend_chain(
            chain,
            svid=svids[issuer],
            audience=sid(names[i + 1]),
            method=METHOD if last else f"/demo.Step/Hop{i}",
            now=issued,
            nonce=_nonce(case, i),
            scopes=scopes if i == 0 else None,
            trace_id=TRACE,
            origin_user=user if i == 0 else None,
            sign=sign_last or not last,
        )
    assert chain is not None
    return chain


@dataclass
class Forged:
    """One hop built by hand, for the shapes `extend_chain` refuses to make."""

    issuer: str
    audience: str
    scopes: Sequence[str] = ("tools:invoke",)
    method: str = METHOD
    issued: datetime = NOW - timedelta(seconds=5)
    ttl: timedelta = timedelta(seconds=60)
    signer: str | None = None  # the SVID that signs; default the issuer's; "" = unsigned
    cert: str | None = None  # the SVID whose chain is carried; default the signer's
    cert_ref: int | None = None
    prev_digest: bytes | None = None  # default: the previous hop's real digest
    origin: UserOrigin | None = None
    extra: bytes = b""  # appended to the body (e.g. an unknown field)
    flip_signature: bool = False
    fields: dict[str, Any] = field(default_factory=dict)


def forge(svids: dict[str, X509Svid], case: str, hops: Sequence[Forged]) -> bytes:
    out: list[tuple[bytes, bytes]] = []
    for i, h in enumerate(hops):
        signer = h.issuer if h.signer is None else h.signer
        cert_svid = svids[h.cert or signer] if signer else None
        prev = b"" if i == 0 else (h.prev_digest or hop_digest(*out[-1]))
        issued_ms = int(h.issued.timestamp() * 1000)
        body = (
            encode_hop(
                issuer=sid(h.issuer),
                audience=sid(h.audience),
                method=h.method,
                scopes=h.scopes,
                issued_at_ms=issued_ms,
                expires_at_ms=issued_ms + int(h.ttl.total_seconds() * 1000),
                nonce=_nonce(case, i),
                trace_id=TRACE,
                prev_digest=prev,
                cert_chain=cert_svid.chain_der() if cert_svid and h.cert_ref is None else None,
                cert_ref=h.cert_ref,
                origin=(h.origin or AgentOrigin(sid(h.issuer))) if i == 0 else None,
            )
            + h.extra
        )
        signature = b""
        if signer:
            key = svids[signer].private_key
            signature = key.sign(
                signing_input(body), ec.ECDSA(hashes.SHA256(), deterministic_signing=True)
            )
            if h.flip_signature:
                signature = signature[:-1] + bytes([signature[-1] ^ 0x01])
        out.append((body, signature))
    return encode_chain(out)


def _drop_last(chain: bytes) -> bytes:
    raw = split_chain(chain).hops()
    return encode_chain((r.body, r.signature) for r in raw[:-1])


def _with_version(chain: bytes, version: int) -> bytes:
    msg = dpb.DelegationChain.FromString(chain)
    msg.version = version
    return msg.SerializeToString()


ANALYST = UserOrigin(IDP, "alice", (("groups", ("analysts", "staff")),))
VIEWER = UserOrigin(IDP, "bob", (("groups", ("viewers",)),))
_ = "planner"


def chain_cases(svids: dict[str, X509Svid]) -> list[dict[str, Any]]:
    """(name, description, chain, peer, local, now, expected reason, expected policy)."""
    h = Callable[..., bytes]
    good: h = lambda case, path, callee="tool", **kw: honest(svids, case, path, callee, **kw)  # noqa: E731
    f: h = lambda case, *hops: forge(svids, case, hops)  # noqa: E731
    ow = ("orchestrator", "planner", "w1", "w2", "w3", "w4", "w5", "w6")
    later = NOW + timedelta(seconds=61)
    # One case per row, as the table reads best.
    # fmt: off
    rows: list[tuple[str, str, bytes, str, str, datetime, str, str | None]] = [
        ("valid-depth-1-direct", "orchestrator calls tool directly: AccessPolicy alone decides",
         good("valid-depth-1-direct", ow[:1]), "orchestrator", "tool", NOW, "allowed", ""),
        ("valid-depth-2", "orchestrator -> planner -> tool",
         good("valid-depth-2", ow[:2]), _, "tool", NOW, "allowed", "tools-via-planner"),
        ("valid-depth-3", "orchestrator -> planner -> w1 -> tool ('**' after planner)",
         good("valid-depth-3", ow[:3]), "w1", "tool", NOW, "allowed", "tools-via-planner"),
        ("valid-depth-4", "four distinct agents",
         good("valid-depth-4", ow[:4]), "w2", "tool", NOW, "allowed", "tools-via-planner"),
        ("valid-depth-8", "the mesh's depth limit, eight distinct agents",
         good("valid-depth-8", ow), "w6", "tool", NOW, "allowed", "tools-via-planner"),
        ("valid-user-origin", "a user in group analysts, through orchestrator",
         good("valid-user-origin", ow[:1], user=ANALYST), "orchestrator", "tool", NOW, "allowed",
         "tools-via-planner"),
        ("valid-user-vault", "vault accepts only user origins; this one has one",
         good("valid-user-vault", ow[:2], "vault", user=VIEWER), _, "vault", NOW, "allowed",
         "vault-users-only"),
        ("valid-unsigned-last-hop", "the last hop is unsigned: its mTLS connection vouches",
         good("valid-unsigned-last-hop", ow[:2], sign_last=False), _, "tool", NOW, "allowed",
         "tools-via-planner"),
        ("valid-cert-ref", "orchestrator appears twice; hop 2 refers to hop 0's certificate",
         good("valid-cert-ref", ("orchestrator", "planner", "orchestrator")), "orchestrator",
         "tool", NOW, "allowed", "tools-via-planner"),
        ("valid-rotated-cert", "hop 0's certificate expired since, but was valid at issued_at",
         f("valid-rotated-cert",
           Forged("orchestrator", "planner", signer="orchestrator-old",
                  issued=NOW - timedelta(minutes=3), ttl=timedelta(seconds=300)),
           Forged("planner", "tool")), _, "tool", NOW, "allowed", "tools-via-planner"),
        # -- chain_malformed
        ("malformed-garbage", "bytes that are no protobuf message",
         b"\xff\xfe not a chain", _, "tool", NOW, "chain_malformed", None),
        ("malformed-version", "a chain of version 2",
         _with_version(good("malformed-version", ow[:2]), 2), _, "tool", NOW, "chain_malformed",
         None),
        ("malformed-unknown-field", "a signed hop body with a field this version does not know",
         f("malformed-unknown-field", Forged("orchestrator", "planner", extra=b"\xa8\x06\x01"),
           Forged("planner", "tool")), _, "tool", NOW, "chain_malformed", None),
        ("malformed-hop-body", "a hop body that does not parse",
         encode_chain([(b"\x0a\xff", b"")]), _, "tool", NOW, "chain_malformed", None),
        # -- chain_too_deep
        ("too-deep-limit", "nine hops, over the mesh limit of eight",
         f("too-deep-limit", *(Forged(a, b) for a, b in zip(
             ["orchestrator", *(["planner", "orchestrator"] * 4)],
             [*(["planner", "orchestrator"] * 4), "tool"], strict=True))),
         _, "tool", NOW, "chain_too_deep", None),
        ("too-deep-policy", "four hops to gadget, whose policy allows three",
         good("too-deep-policy", ow[:4], "gadget"), "w2", "gadget", NOW, "chain_too_deep",
         "gadget-shallow"),
        # -- binding to the call
        ("issuer-not-peer", "a valid chain presented by another agent",
         good("issuer-not-peer", ow[:2]), "orchestrator", "tool", NOW, "chain_issuer_not_peer",
         None),
        ("truncated", "the last hop cut off: its issuer is no longer the peer",
         _drop_last(good("truncated", ow[:2])), _, "tool", NOW, "chain_issuer_not_peer", None),
        ("wrong-audience", "a chain addressed to tool, replayed to gadget",
         good("wrong-audience", ow[:2]), _, "gadget", NOW, "chain_wrong_audience", None),
        ("wrong-method", "the last hop authorizes /demo.Tool/Invoke, not /demo.Tool/Delete",
         good("wrong-method", ow[:2]), _, "tool", NOW, "chain_wrong_audience", None),
        # -- links
        ("broken-link-splice", "hop 1 of one chain spliced onto hop 0 of another",
         f("broken-link-splice", Forged("orchestrator", "planner"),
           Forged("planner", "tool", prev_digest=hashlib.sha256(b"another hop").digest())),
         _, "tool", NOW, "chain_broken_link", None),
        ("broken-link-audience", "hop 0 is addressed to helper, hop 1 is issued by planner",
         f("broken-link-audience", Forged("orchestrator", "helper"), Forged("planner", "tool")),
         _, "tool", NOW, "chain_broken_link", None),
        # -- time
        ("expired", "verified 61 s after the hops were issued with a 60 s lifetime",
         good("expired", ow[:2]), _, "tool", later, "chain_expired", None),
        ("issued-in-future", "hop 0 claims to be issued a minute from now",
         f("issued-in-future", Forged("orchestrator", "planner", issued=NOW + timedelta(minutes=1)),
           Forged("planner", "tool")), _, "tool", NOW, "chain_expired", None),
        ("lifetime-over-cap", "hop 0 claims a 10-minute lifetime; the cap is 5",
         f("lifetime-over-cap", Forged("orchestrator", "planner", ttl=timedelta(minutes=10)),
           Forged("planner", "tool")), _, "tool", NOW, "chain_expired", None),
        # -- scopes
        ("scope-escalation", "planner grants 'admin', which orchestrator never granted",
         f("scope-escalation", Forged("orchestrator", "planner"),
           Forged("planner", "tool", scopes=("tools:invoke", "admin"))), _, "tool", NOW,
         "chain_scope_escalation", None),
        ("required-scope-missing", "tools-via-planner requires tools:invoke; the chain has read",
         good("required-scope-missing", ow[:2], scopes=("read",)), _, "tool", NOW,
         "chain_scope_escalation", "tools-via-planner"),
        # -- signatures
        ("bad-signature", "one bit of hop 0's signature flipped",
         f("bad-signature", Forged("orchestrator", "planner", flip_signature=True),
           Forged("planner", "tool")), _, "tool", NOW, "chain_bad_signature", None),
        ("untrusted-cert", "hop 1 signed with a planner SVID from a CA outside the bundle",
         f("untrusted-cert", Forged("orchestrator", "planner"),
           Forged("planner", "w1", signer="planner-rogue"), Forged("w1", "tool")),
         "w1", "tool", NOW, "chain_bad_signature", None),
        ("cert-not-issuer", "hop 0 names orchestrator but is signed by helper's SVID",
         f("cert-not-issuer", Forged("orchestrator", "planner", signer="helper"),
           Forged("planner", "tool")), _, "tool", NOW, "chain_bad_signature", None),
        ("unsigned-middle-hop", "hop 0 is unsigned but is not the last hop",
         f("unsigned-middle-hop", Forged("orchestrator", "planner", signer=""),
           Forged("planner", "tool")), _, "tool", NOW, "chain_bad_signature", None),
        ("cert-expired-at-issue", "hop 0 signed at NOW-10s with a certificate expired at NOW-2min",
         f("cert-expired-at-issue",
           Forged("orchestrator", "planner", signer="orchestrator-old",
                  issued=NOW - timedelta(seconds=10)),
           Forged("planner", "tool")), _, "tool", NOW, "chain_bad_signature", None),
        # -- agents
        ("agent-disabled", "the chain passes through a disabled agent",
         good("agent-disabled", ("orchestrator", "planner", "disabled-worker")),
         "disabled-worker", "tool", NOW, "chain_agent_inactive", None),
        ("agent-unregistered", "the chain passes through an SVID holder with no Agent record",
         good("agent-unregistered", ("orchestrator", "planner", "ghost")), "ghost", "tool", NOW,
         "chain_agent_inactive", None),
        ("agent-expired", "the chain passes through an agent whose expiresAt has passed",
         good("agent-expired", ("orchestrator", "planner", "expired-worker")), "expired-worker",
         "tool", NOW, "chain_agent_inactive", None),
        # -- policy
        ("origin-not-allowed", "planner is not an allowed origin for tool",
         good("origin-not-allowed", ("planner", "w1")), "w1", "tool", NOW,
         "chain_origin_not_allowed", "tools-via-planner"),
        ("origin-no-policy", "no DelegationPolicy selects auditor: default deny",
         good("origin-no-policy", ow[:2], "auditor"), _, "auditor", NOW,
         "chain_origin_not_allowed", None),
        ("origin-user-wrong-group", "a user outside group analysts",
         good("origin-user-wrong-group", ow[:1], user=VIEWER), "orchestrator", "tool", NOW,
         "chain_origin_not_allowed", "tools-via-planner"),
        ("origin-requires-user", "vault requires a user origin; this chain is autonomous",
         good("origin-requires-user", ow[:2], "vault"), _, "vault", NOW,
         "chain_origin_not_allowed", "vault-users-only"),
        ("path-not-allowed", "orchestrator -> helper -> tool: helper is not planner",
         good("path-not-allowed", ("orchestrator", "helper")), "helper", "tool", NOW,
         "chain_path_not_allowed", "tools-via-planner"),
    ]
    # fmt: on
    out = []
    for name, description, chain, peer, local, now, reason, policy in rows:
        case: dict[str, Any] = {
            "name": name,
            "description": description,
            "chain": base64.b64encode(chain).decode(),
            "peer": str(sid(peer)),
            "local": str(sid(local)),
            "method": "/demo.Tool/Delete" if name == "wrong-method" else METHOD,
            "now": now.isoformat().replace("+00:00", "Z"),
            "expect": {"reason": reason},
        }
        if policy is not None:
            case["expect"]["policy"] = policy
        out.append(case)
    return out
