"""Delegation chains under attack, through real sidecars (docs/delegation.md §7, §12).

The mesh: orchestrator -> planner -> tool, plus carol, registered but no part of the
orchestration. AccessPolicy lets each call every other, so every denial here comes
from the chain check. The tool accepts chains from the orchestrator or an analyst
user via the planner; the planner accepts user origins from the orchestrator.

Honest chains come from real calls: the test plays the apps, relaying the
`trustmesh-delegation-bin` an app received. Crafted chains go straight to a callee's
inbound port over mTLS with a peer's own sidecar SVID (what a stolen sidecar key
gives), signed with the keys the test holds.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.trace import SpanKind

from trustmesh.channels import MeshChannels
from trustmesh.delegation import METADATA_KEY, extend_chain
from trustmesh.delegation_format import AgentOrigin, encode_chain, encode_hop, signing_input, to_ms
from trustmesh.delegation_parse import split_chain
from trustmesh.demo.idp import AUDIENCE, ISSUER, DemoIdp
from trustmesh.errors import parse_details
from trustmesh.x509svid import X509Svid

from harness import (
    ECHO,
    Mesh,
    agent,
    agent_id,
    blueprint,
    delegation_policy,
    policy,
    trust_user_tokens,
    unary,
)

UNARY = f"/{ECHO}/Unary"
WAIT = 5.0
NAMES = ("orchestrator", "planner", "tool", "carol")
ANALYST = "alice@example.com"
Hop = tuple[bytes, bytes]

MANIFEST = [
    *(blueprint(b) for b in ("orchestrator", "planner", "tool", "any")),
    agent("orchestrator", "orchestrator"), agent("planner", "planner"), agent("tool", "tool"),
    agent("carol"),
    policy("everyone-echoes", list(NAMES), list(NAMES), [f"/{ECHO}/*"]),
    delegation_policy(
        "tool-via-planner", [{"blueprint": "tool"}],
        [{"blueprint": "orchestrator"},
         {"user": {"issuer": ISSUER, "claims": {"groups": "analysts"}}}],
        [[{"blueprint": "orchestrator"}, {"blueprint": "planner"}]],
    ),
    delegation_policy(
        "planner-serves-users", [{"blueprint": "planner"}],
        [{"user": {"issuer": ISSUER}}], [[{"blueprint": "orchestrator"}]],
    ),
]  # fmt: skip


class Idp(DemoIdp):
    """The demo IdP, able to mint tokens with any claims (wrong audience, expired...)."""

    def mint(self, **claims: Any) -> str:
        now = int(time.time())
        doc = {"iss": ISSUER, "aud": AUDIENCE, "sub": ANALYST, "groups": ["analysts"],
               "iat": now, "exp": now + 300} | claims  # fmt: skip
        return jwt.encode(doc, self._key, algorithm="ES256", headers={"kid": self.kid})


@pytest.fixture
async def dm(mesh: Mesh) -> AsyncIterator[Mesh]:
    await mesh.apply(*MANIFEST)
    for name in NAMES:
        await mesh.add(name)
    await mesh.wait_endpoints(*NAMES)
    yield mesh


@pytest.fixture
def idp(dm: Mesh, tmp_path: Path) -> Idp:
    issuer = Idp(tmp_path / "idp")
    trust_user_tokens(dm.nodes["orchestrator"], issuer.config_path)
    return issuer


def svid(m: Mesh, name: str) -> X509Svid:
    state = m.nodes[name].sidecar.state
    assert state is not None
    return state.svid


def chain_text(*names: str) -> str:
    return " > ".join(str(agent_id(n)) for n in names)


def reason(details: str) -> str:
    parsed = parse_details(details)
    assert parsed is not None, details
    return parsed[0]


async def refusal(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value.code(), err.value.details() or ""


async def send(
    m: Mesh,
    app: str,
    target: str,
    *,
    chain: bytes | None = None,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    """`app` calls `target` through its own sidecar, relaying `chain` if given."""
    md: list[tuple[str, str | bytes]] = [*metadata, *([(METADATA_KEY, chain)] if chain else [])]
    await unary(m.nodes[app].outbound, target, metadata=md)


def received_chain(m: Mesh, name: str) -> bytes:
    data = m.nodes[name].app.received[-1][METADATA_KEY]
    assert isinstance(data, bytes)
    return data


async def chain_at_planner(m: Mesh) -> bytes:
    """A real chain: what the planner's app got from the orchestrator (hop 0 signed)."""
    await send(m, "orchestrator", "planner")
    return received_chain(m, "planner")


async def chain_at_tool(m: Mesh) -> bytes:
    """A real depth-2 chain: orchestrator > planner > tool, as the tool's app got it."""
    await send(m, "planner", "tool", chain=await chain_at_planner(m))
    return received_chain(m, "tool")


# -- crafting chains -------------------------------------------------------------------------


def relay(
    chain: bytes | None,
    by: X509Svid,
    to: str,
    *,
    now: datetime | None = None,
    ttl: timedelta | None = None,
    scopes: list[str] | None = None,
) -> bytes:
    """A signed hop appended by `extend_chain`, with all its checks."""
    return extend_chain(chain, svid=by, audience=agent_id(to), method=UNARY,
                        now=now or datetime.now(UTC), nonce=secrets.token_bytes(16), ttl=ttl,
                        scopes=scopes)  # fmt: skip


def hops(chain: bytes) -> list[Hop]:
    return [(h.body, h.signature) for h in split_chain(chain).hops()]


def forge(chain: bytes | None, by: X509Svid, to: str, *, scopes: list[str]) -> bytes:
    """A hop appended with none of `extend_chain`'s checks: anything `by`'s key can sign."""
    prefix = split_chain(chain).hops() if chain else ()
    now = to_ms(datetime.now(UTC))
    body = encode_hop(
        issuer=by.spiffe_id, audience=agent_id(to), method=UNARY, scopes=scopes,
        issued_at_ms=now, expires_at_ms=now + 60_000, nonce=secrets.token_bytes(16),
        trace_id=b"", prev_digest=prefix[-1].digest if prefix else b"",
        cert_chain=[c.public_bytes(Encoding.DER) for c in by.cert_chain],
        origin=None if prefix else AgentOrigin(by.spiffe_id),
    )  # fmt: skip
    signature = by.private_key.sign(signing_input(body), ec.ECDSA(hashes.SHA256()))
    return encode_chain([*((h.body, h.signature) for h in prefix), (body, signature)])


def flip(signature: bytes) -> bytes:
    """The last byte (inside the DER integer s) flipped: well-formed, and wrong."""
    return signature[:-1] + bytes([signature[-1] ^ 0x01])


async def forged_origin_signature(m: Mesh) -> bytes:
    [(body, sig)] = hops(await chain_at_planner(m))
    return relay(encode_chain([(body, flip(sig))]), svid(m, "planner"), "tool")


async def forged_last_signature(m: Mesh) -> bytes:
    *prefix, (body, sig) = hops(relay(await chain_at_planner(m), svid(m, "planner"), "tool"))
    return encode_chain([*prefix, (body, flip(sig))])


async def spliced(m: Mesh) -> bytes:
    first, second = await chain_at_planner(m), await chain_at_planner(m)
    return encode_chain([hops(first)[0], hops(relay(second, svid(m, "planner"), "tool"))[1]])


async def detour(m: Mesh) -> list[Hop]:
    """orchestrator > planner > carol > planner > tool, every hop honestly signed."""
    chain = await chain_at_planner(m)
    for by, to in (("planner", "carol"), ("carol", "planner"), ("planner", "tool")):
        chain = relay(chain, svid(m, by), to)
    return hops(chain)


def rearranged(*order: int) -> Callable[[Mesh], Awaitable[bytes]]:
    """The detour's hops, reordered or with some dropped."""

    async def build(m: Mesh) -> bytes:
        h = await detour(m)
        return encode_chain([h[i] for i in order])

    return build


async def expired(m: Mesh) -> bytes:
    """Issued 15 s ago for 5 s (the SVIDs were valid then: notBefore is 30 s back)."""
    past, ttl = datetime.now(UTC) - timedelta(seconds=15), timedelta(seconds=5)
    chain = relay(None, svid(m, "orchestrator"), "planner", now=past, ttl=ttl)
    return relay(chain, svid(m, "planner"), "tool", now=past, ttl=ttl)


async def widened(m: Mesh) -> bytes:
    chain = relay(None, svid(m, "orchestrator"), "planner", scopes=["read"])
    return forge(chain, svid(m, "planner"), "tool", scopes=["admin", "read"])


async def too_deep(m: Mesh) -> bytes:
    """Eight honest hops orchestrator > planner > carol > ... > carol, then a ninth."""
    chain = await chain_at_planner(m)
    for i in range(7):
        by, to = ("planner", "carol") if i % 2 == 0 else ("carol", "planner")
        chain = relay(chain, svid(m, by), to)
    assert len(hops(chain)) == 8
    return forge(chain, svid(m, "carol"), "tool", scopes=[])


async def outside_path(m: Mesh) -> bytes:
    """Authentic and alive, but the path orchestrator > carol is not an allowed one."""
    return relay(relay(None, svid(m, "orchestrator"), "carol"), svid(m, "carol"), "tool")


CRAFTED = [
    # (case, build, peer presenting it, callee, reason, what the message names)
    ("forged-origin-signature", forged_origin_signature, "planner", "tool", "chain_bad_signature",
     "hop 0: the signature does not verify"),
    ("forged-last-signature", forged_last_signature, "planner", "tool", "chain_bad_signature",
     "hop 1: the signature does not verify"),
    ("spliced-hop", spliced, "planner", "tool", "chain_broken_link", "hop 1 does not link to hop 0"),
    ("hops-reordered", rearranged(0, 2, 1, 3), "planner", "tool", "chain_broken_link",
     "hop 1 does not link to hop 0"),
    ("middle-hop-dropped", rearranged(0, 1, 3), "planner", "tool", "chain_broken_link",
     "hop 2 does not link to hop 1"),
    ("first-hop-dropped", rearranged(1, 2, 3), "planner", "tool", "chain_malformed",
     "hop 0 has a prev_digest"),
    ("replayed-after-expiry", expired, "planner", "tool", "chain_expired", "hop 0 by "),
    ("replayed-to-other-audience", chain_at_tool, "planner", "carol", "chain_wrong_audience",
     f"addressed to '{agent_id('tool')}'"),
    ("relayed-by-non-audience", chain_at_tool, "carol", "tool", "chain_issuer_not_peer",
     f"the call comes from '{agent_id('carol')}'"),
    ("widened-scope", widened, "planner", "tool", "chain_scope_escalation", "did not have: admin"),
    ("nine-hops", too_deep, "carol", "tool", "chain_too_deep", "9 hops"),
    ("path-not-allowed", outside_path, "carol", "tool", "chain_path_not_allowed",
     f"not the path {chain_text('orchestrator', 'carol')}"),
]  # fmt: skip


async def present(m: Mesh, peer: str, callee: str, chain: bytes) -> str:
    """Call `callee`'s inbound port straight, as `peer` over mTLS, carrying `chain`;
    the status details ('' when allowed)."""
    state, target = m.nodes[peer].sidecar.state, m.nodes[callee]
    assert state is not None
    channels = MeshChannels(lambda: (state.svid, state.bundles))
    try:
        channel = await channels.get(target.sidecar.inbound_address, target.spiffe_id)
        await channel.unary_unary(UNARY)(b"x", metadata=((METADATA_KEY, chain),), timeout=WAIT)
        return ""
    except grpc.aio.AioRpcError as e:
        details: str = e.details() or e.code().name
        return details
    finally:
        await channels.close()


@pytest.mark.parametrize(("build", "peer", "callee", "expected", "why"),
                         [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])  # fmt: skip
async def test_crafted_chain_is_refused_before_the_app(
    dm: Mesh,
    build: Callable[[Mesh], Awaitable[bytes]],
    peer: str,
    callee: str,
    expected: str,
    why: str,
) -> None:
    chain = await build(dm)
    app = dm.nodes[callee].app
    seen = len(app.received)
    details = await present(dm, peer, callee, chain)
    assert reason(details) == expected and why in details, details
    assert len(app.received) == seen


async def test_garbage_chains_never_crash_the_inbound(dm: Mesh) -> None:
    loop = asyncio.get_running_loop()
    valid = relay(await chain_at_planner(dm), svid(dm, "planner"), "tool")  # every hop signed
    assert await present(dm, "planner", "tool", valid) == ""
    seen = len(dm.nodes["tool"].app.received)

    @settings(max_examples=25, deadline=None, database=None)
    @given(st.one_of(st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),
                     st.binary(max_size=1024)))  # fmt: skip
    def attack(data: bytes) -> None:
        done = asyncio.run_coroutine_threadsafe(present(dm, "planner", "tool", data), loop)
        details = done.result(timeout=2 * WAIT)
        assert reason(details).startswith("chain_"), details

    await loop.run_in_executor(None, attack)
    assert len(dm.nodes["tool"].app.received) == seen
    await send(dm, "planner", "tool", chain=await chain_at_planner(dm))  # still serving
    assert dm.nodes["tool"].app.received[-1]["trustmesh-chain"] == chain_text(
        "orchestrator", "planner", "tool"
    )


# -- through the sidecars --------------------------------------------------------------------


async def test_spoofed_origin_and_chain_headers_never_reach_the_app(dm: Mesh) -> None:
    spoofed = (("trustmesh-origin", '{"user":{"issuer":"https://evil","subject":"root"}}'),
               ("trustmesh-chain", "spiffe://test.local/agents/root"),
               ("trustmesh-caller", "spiffe://test.local/agents/root"))  # fmt: skip
    await send(dm, "orchestrator", "planner", metadata=spoofed)
    seen = dm.nodes["planner"].app.received[-1]
    assert seen["trustmesh-origin"] == json.dumps({"agent": str(agent_id("orchestrator"))},
                                                  separators=(",", ":"))  # fmt: skip
    assert seen["trustmesh-chain"] == chain_text("orchestrator", "planner")
    await send(dm, "planner", "tool", chain=received_chain(dm, "planner"), metadata=spoofed)
    seen = dm.nodes["tool"].app.received[-1]
    assert seen["trustmesh-chain"] == chain_text("orchestrator", "planner", "tool")
    assert seen["trustmesh-caller"] == str(agent_id("planner"))
    await send(dm, "carol", "tool", metadata=spoofed)  # direct: the tool can't forward, no chain
    seen = dm.nodes["tool"].app.received[-1]
    assert "trustmesh-origin" not in seen and "trustmesh-chain" not in seen
    assert seen["trustmesh-caller"] == str(agent_id("carol"))


async def test_delegation_policy_refuses_an_origin_it_does_not_list(dm: Mesh, idp: Idp) -> None:
    await send(dm, "carol", "planner")  # carol may call the planner; its chain is signed
    code, details = await refusal(send(dm, "planner", "tool", chain=received_chain(dm, "planner")))
    assert (code, reason(details)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "chain_origin_not_allowed",
    )
    bearer = (("authorization", f"Bearer {idp.mint(groups=['interns'])}"),)
    await send(dm, "orchestrator", "planner", metadata=bearer)  # the planner serves any user
    code, details = await refusal(send(dm, "planner", "tool", chain=received_chain(dm, "planner")))
    assert reason(details) == "chain_origin_not_allowed", details
    assert dm.nodes["tool"].app.received == []


async def test_a_disabled_agent_ends_open_streams_and_voids_its_chains(dm: Mesh) -> None:
    chain = await chain_at_planner(dm)
    tool = dm.nodes["tool"]
    md = (("trustmesh-target", "tool"), (METADATA_KEY, chain))
    async with grpc.aio.insecure_channel(dm.nodes["planner"].outbound) as ch:
        hold = ch.unary_stream(f"/{ECHO}/Hold")(b"", metadata=md, timeout=15)
        assert await asyncio.wait_for(hold.read(), WAIT) == b"0"
        assert tool.app.received[-1]["trustmesh-chain"] == chain_text(
            "orchestrator", "planner", "tool"
        )
        await dm.disable("orchestrator", reason="incident 7")

        async def drain() -> None:
            while await hold.read() is not grpc.aio.EOF:
                pass

        code, details = await refusal(asyncio.wait_for(drain(), WAIT))
    assert (code, reason(details)) == (grpc.StatusCode.PERMISSION_DENIED, "chain_agent_inactive")
    assert "incident 7" in details
    seen = len(tool.app.received)
    code, details = await refusal(send(dm, "planner", "tool", chain=chain))  # relayed later
    assert reason(details) == "chain_agent_inactive", details
    assert len(tool.app.received) == seen


def _tokens(idp: Idp, tmp: Path) -> dict[str, tuple[str, str]]:
    """Token and the part of the refusal that says why."""
    now = int(time.time())
    return {
        "wrong-signing-key": (Idp(tmp / "rogue").mint(), "signature does not verify"),
        "wrong-audience": (idp.mint(aud="another-mesh"), "audience is not one of"),
        "expired": (idp.mint(iat=now - 600, exp=now - 120), "expired at"),
        "alg-none": (jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x"}, "",
                                algorithm="none"), "algorithm 'none' is not accepted"),
        "garbage": ("garbage", "not a compact JWS"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["wrong-signing-key", "wrong-audience", "expired", "alg-none",
                                  "garbage"])  # fmt: skip
@pytest.mark.parametrize("header", ["authorization", "trustmesh-user-token"])
async def test_bad_user_token_is_refused_at_the_first_sidecar(
    dm: Mesh, idp: Idp, tmp_path: Path, case: str, header: str
) -> None:
    token, why = _tokens(idp, tmp_path)[case]
    value = f"Bearer {token}" if header == "authorization" else token
    code, details = await refusal(send(dm, "orchestrator", "planner", metadata=((header, value),)))
    assert (code, reason(details)) == (grpc.StatusCode.UNAUTHENTICATED, "user_token_invalid")
    assert why in details and token not in details, details
    assert dm.nodes["planner"].app.received == []


@pytest.mark.parametrize(
    "headers",
    [("authorization",), ("trustmesh-user-token",), ("authorization", "trustmesh-user-token")],
    ids=["bearer", "user-token-header", "both"],
)  # fmt: skip
async def test_user_origin_travels_end_to_end_and_the_token_stops_at_the_first_sidecar(
    dm: Mesh, idp: Idp, headers: tuple[str, ...]
) -> None:
    token = idp.token(ANALYST, ["analysts"])
    md = tuple((h, f"Bearer {token}" if h == "authorization" else token) for h in headers)
    await send(dm, "orchestrator", "planner", metadata=md)
    at_planner = dm.nodes["planner"].app.received[-1]
    assert "trustmesh-user-token" not in at_planner
    assert "authorization" not in at_planner
    assert all(token not in str(v) for v in at_planner.values())
    await send(dm, "planner", "tool", chain=received_chain(dm, "planner"))
    seen = dm.nodes["tool"].app.received[-1]
    user = {"issuer": ISSUER, "subject": ANALYST, "claims": {"groups": ["analysts"]}}
    assert json.loads(seen["trustmesh-origin"]) == {"user": user}
    assert seen["trustmesh-chain"] == chain_text("orchestrator", "planner", "tool")
    assert len(hops(received_chain(dm, "tool"))) == 2

    def server_span() -> Any:
        spans = [s for s in dm.nodes["tool"].spans.get_finished_spans()
                 if s.kind == SpanKind.SERVER and s.attributes
                 and "trustmesh.chain.depth" in s.attributes]  # fmt: skip
        return spans[-1] if spans else None

    async with asyncio.timeout(WAIT):
        while (span := server_span()) is None:
            await asyncio.sleep(0.02)
    assert span.attributes["trustmesh.origin"] == f"user:{ANALYST}@{ISSUER}"
    assert span.attributes["trustmesh.chain.depth"] == 2
    events = [e for e in span.events if e.name == "trustmesh.delegation.hop"]
    assert [(e.attributes["trustmesh.hop.issuer"], e.attributes["trustmesh.hop.audience"])
            for e in events] == [(str(agent_id("orchestrator")), str(agent_id("planner"))),
                                 (str(agent_id("planner")), str(agent_id("tool")))]  # fmt: skip
