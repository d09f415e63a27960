"""Hostile bytes and metadata at a sidecar: it refuses them and keeps serving.

Every test ends with `still_serves`: a legitimate alice -> bob call through alice's
sidecar, and a fresh mTLS connection straight to bob's inbound port (the first rides
alice's pooled connection, so only the second proves that bob still accepts new
handshakes). Raw peers speak TLS with Python's `ssl` and HTTP/2 by hand, so that
they can send what no gRPC client would.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import hpack
import pytest

from trustmesh.ca import CertificateAuthority
from trustmesh.channels import MeshChannels
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr
from trustmesh_sidecar.engine_select import DEFAULT_ENGINE

from harness import ECHO, TD, Mesh, Node, agent_id, unary

WAIT = 5.0  # seconds: the bound on every network wait in this file
ALICE = "spiffe://test.local/agents/alice"
UNARY = "/test.Echo/Unary"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x7
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
JUNK = random.Random(0).randbytes(4096)
# Refusals that happen below the router are worded by the engine: grpc core's own
# words on the grpcio engine, `trustmesh: <reason>: ...` on the frame-level engine.
H2_ENGINE = os.environ.get("TRUSTMESH_TEST_ENGINE", DEFAULT_ENGINE) == "h2"


# -- peers -------------------------------------------------------------------------------


def alice_svid(mesh: Mesh) -> X509Svid:
    d, sid = mesh.root / "registry", SpiffeId.parse(ALICE)
    ca = CertificateAuthority.load((d / "ca.crt").read_bytes(), (d / "ca.key").read_bytes())
    key = generate_key()
    cert = ca.sign_csr(make_csr(key, sid), sid, now=datetime.now(UTC), ttl=timedelta(minutes=10))
    return X509Svid(sid, (cert,), key)


async def dial(
    mesh: Mesh, callee: Node, *, method: str = UNARY, metadata: Sequence[tuple[str, str]] = ()
) -> bytes:
    """One unary call as alice straight to `callee`'s inbound port, on a new connection."""
    svid = alice_svid(mesh)
    bundles = BundleSet.of(
        TrustBundle.from_pem(TrustDomain.parse(TD), mesh.bundle_path.read_bytes())
    )
    channels = MeshChannels(lambda: (svid, bundles))
    try:
        channel = await channels.get(callee.sidecar.inbound_address, callee.spiffe_id)
        call = channel.unary_unary(method)(b"ping", metadata=tuple(metadata), timeout=WAIT)
        return bytes(await call)
    finally:
        await channels.close()


async def still_serves(mesh: Mesh) -> None:
    bob = mesh.nodes["bob"]
    before = len(bob.app.received)
    assert (await unary(mesh.nodes["alice"].outbound, "bob", body=b"ok", timeout=WAIT))[0] == b"ok"
    assert await dial(mesh, bob) == b"ping"
    assert len(bob.app.received) == before + 2


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


@contextlib.asynccontextmanager
async def tls_to(
    mesh: Mesh, node: Node, tmp_path: Path
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A TLS connection to `node`'s inbound port as alice, with ALPN h2 agreed."""
    svid = alice_svid(mesh)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # URI SAN only; the chain is still verified
    ctx.load_verify_locations(cafile=str(mesh.bundle_path))
    ctx.set_alpn_protocols(["h2"])
    (tmp_path / "a.crt").write_bytes(svid.chain_pem())
    (tmp_path / "a.key").write_bytes(svid.key_pem())
    ctx.load_cert_chain(tmp_path / "a.crt", tmp_path / "a.key")
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(
            *_split(node.sidecar.inbound_address), ssl=ctx
        )
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
    try:
        yield reader, writer
    finally:
        writer.close()


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes; fails if it never does."""
    got = b""
    async with asyncio.timeout(WAIT):
        with contextlib.suppress(OSError):  # a reset or a TLS alert also closes
            while chunk := await reader.read(65536):
                got += chunk
    return got


# -- HTTP/2 by hand ------------------------------------------------------------------------


def frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big")
        + bytes([ftype, flags])
        + stream.to_bytes(4, "big")
        + payload
    )


def frame_types(data: bytes) -> list[int]:
    types, i = [], 0
    while i + 9 <= len(data):
        types.append(data[i + 3])
        i += 9 + int.from_bytes(data[i : i + 3], "big")
    return types


def literal(name: str, value: str) -> bytes:
    """HPACK literal without indexing, new name, no Huffman (RFC 7541 6.2.2); short strings."""
    n, v = name.encode(), value.encode()
    assert len(n) < 127 and len(v) < 127
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


async def raw_grpc(address: str, headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    """One plaintext gRPC unary call sent frame by frame; returns the decoded trailers.

    Every header block the server sends is decoded, in order, with one HPACK decoder:
    how a server encodes a field (indexed, literal, Huffman) is its own choice."""
    decoder = hpack.Decoder()
    block = b"".join(
        literal(k, v)
        for k, v in [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", UNARY),
            (":authority", "localhost"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *headers,
        ]
    )
    reader, writer = await asyncio.open_connection(*_split(address))
    writer.write(
        PREFACE
        + frame(SETTINGS, 0, 0, b"")
        + frame(HEADERS, END_HEADERS, 1, block)
        + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x04ping")
    )
    try:
        async with asyncio.timeout(WAIT):
            while True:
                head = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(head[:3], "big"))
                ftype, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big")
                if ftype == SETTINGS and not flags & ACK:
                    writer.write(frame(SETTINGS, ACK, 0, b""))
                if ftype in (RST_STREAM, GOAWAY):
                    return {":frame": "rst" if ftype == RST_STREAM else "goaway"}
                if ftype == HEADERS:
                    assert flags & END_HEADERS, "a short block in one frame"
                    fields = dict(decoder.decode(payload))
                    if stream == 1 and flags & END_STREAM:
                        return fields
    finally:
        writer.close()


# -- 1, 2: junk on the wire ----------------------------------------------------------------


@pytest.mark.parametrize(
    "junk",
    [
        JUNK,
        b"GET / HTTP/1.1\r\nHost: bob\r\n\r\n",
        PREFACE + frame(SETTINGS, 0, 0, b""),  # plaintext HTTP/2 on the TLS port
        b"\x16\x03\x01\x40\x00" + b"\x01" * 10,  # a ClientHello record cut short
        b"\x16\x03\x01\xff\xff" + bytes(65535),  # a record over the TLS maximum
    ],
    ids=["random-bytes", "http1-request", "plaintext-h2", "truncated-hello", "oversized-record"],
)
async def test_garbage_before_the_handshake_is_dropped(trio: Mesh, junk: bytes) -> None:
    bob = trio.nodes["bob"]
    async with asyncio.timeout(WAIT):
        reader, writer = await asyncio.open_connection(*_split(bob.sidecar.inbound_address))
    try:
        writer.write(junk)
        with contextlib.suppress(OSError):  # the server may hang up before we finish
            await writer.drain()
            writer.write_eof()
        got = await read_until_closed(reader)
    finally:
        writer.close()
    assert got == b"" or got[:1] == b"\x15", got[:64]  # a hang-up, or a TLS alert record
    assert bob.app.received == []
    await still_serves(trio)


@pytest.mark.parametrize(
    "junk",
    [
        JUNK,
        b"GET / HTTP/1.1\r\nHost: bob\r\n\r\n",
        PREFACE + b"\x40\x00\x00" + bytes([SETTINGS]) + bytes(5),  # a 4 MiB frame
        PREFACE + frame(SETTINGS, 0, 0, b"") + frame(HEADERS, END_HEADERS, 1, b"\xff" * 8),
    ],
    ids=["random-bytes", "http1-over-tls", "oversized-frame", "undecodable-hpack"],
)
async def test_junk_after_a_valid_handshake_closes_the_connection(
    trio: Mesh, tmp_path: Path, junk: bytes
) -> None:
    bob = trio.nodes["bob"]
    async with tls_to(trio, bob, tmp_path) as (reader, writer):
        writer.write(junk)
        with contextlib.suppress(OSError):  # ssl.SSLError is an OSError too
            await writer.drain()
        got = await read_until_closed(reader)  # the server hangs up; we never do
    assert DATA not in frame_types(got)  # no call got as far as an answer
    assert bob.app.received == []
    await still_serves(trio)


# -- 3: oversized metadata ----------------------------------------------------------------


async def roomy_app(node: Node) -> None:
    """Restart `node`'s app with a 1 MiB header limit: a refusal of large metadata then
    comes from a sidecar (Limits.max_metadata_bytes), not from the app's grpc defaults."""
    app, roomy = node.app, 1 << 20
    assert app.server is not None
    await app.server.stop(0)
    server = grpc.aio.server(
        options=[("grpc.max_metadata_size", roomy), ("grpc.absolute_max_metadata_size", roomy)]
    )
    handlers = {"Unary": grpc.unary_unary_rpc_method_handler(app._unary)}
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, handlers)])
    assert server.add_insecure_port(app.address) == _split(app.address)[1]
    await server.start()
    app.server = server


@pytest.mark.parametrize("route", ["via-alice-outbound", "direct-to-bob-inbound"])
@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ([("x-big", "a" * 20 * 1024)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([("x-big", "a" * 64 * 1024)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([(f"x-k{i}", "v" * 16) for i in range(2000)], grpc.StatusCode.RESOURCE_EXHAUSTED),
        ([("x-fits", "a" * 12 * 1024)], grpc.StatusCode.OK),
    ],
    ids=["20KiB-value", "64KiB-value", "2000-keys", "control-12KiB"],
)
async def test_oversized_metadata_is_refused_not_hung(
    trio: Mesh, route: str, metadata: list[tuple[str, str]], code: grpc.StatusCode
) -> None:
    alice, bob = trio.nodes["alice"], trio.nodes["bob"]
    await roomy_app(bob)
    try:
        if route == "via-alice-outbound":
            await unary(alice.outbound, "bob", metadata=list(metadata), timeout=WAIT)
        else:
            await dial(trio, bob, metadata=metadata)
        got = grpc.StatusCode.OK
    except grpc.aio.AioRpcError as e:
        got = e.code()  # details are grpc core's, and empty when they'd be too long
    assert got == code
    # grpc core still hands the refused call, with its header list cut short, to the
    # sidecar's handler before cancelling it (see the report), so "the router never
    # ran" does not hold; what must hold is that the app never gets the call.
    key = metadata[-1][0]
    assert [key in md for md in bob.app.received] == ([True] if code is grpc.StatusCode.OK else [])
    await still_serves(trio)


# -- 4: bad :path ------------------------------------------------------------------------


INVALID, MALFORMED = (
    grpc.StatusCode.INVALID_ARGUMENT,
    "trustmesh: bad_method: malformed method path ",
)
OVER_LIMIT = (
    "trustmesh: limit_exceeded: header list of " if H2_ENGINE else "received metadata size"
)  # grpc core refuses it before the sidecar


@pytest.mark.parametrize(
    ("path", "code", "details"),
    [
        ("/not-a-method", INVALID, MALFORMED + "'/not-a-method'"),
        ("/a/b/c", INVALID, MALFORMED + "'/a/b/c'"),
        ("/test.Echo/Unary/../Fail", INVALID, MALFORMED + "'/test.Echo/Unary/../Fail'"),
        ("/" + "a/" * 3000, INVALID, MALFORMED + repr(("/" + "a/" * 3000)[:128])),  # cut to 128
        ("/test.Echo/Unary\n", INVALID, MALFORMED + repr("/test.Echo/Unary\n")),
        ("/test.Echo/" + "x" * 4000, grpc.StatusCode.UNIMPLEMENTED, "Method not found!"),
        ("/test.Echo/" + "y" * 20000, grpc.StatusCode.RESOURCE_EXHAUSTED, OVER_LIMIT),
    ],
    ids=[
        "no-service",
        "three-segments",
        "dot-dot",
        "long-malformed",
        "trailing-newline",
        "long-well-formed",
        "over-header-limit",
    ],
)
async def test_bad_path_never_reaches_the_app(
    trio: Mesh, path: str, code: grpc.StatusCode, details: str
) -> None:
    bob = trio.nodes["bob"]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await dial(trio, bob, method=path)
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(details), err.value.details()
    assert bob.app.received == []  # a well-formed unknown name is the app's UNIMPLEMENTED
    await still_serves(trio)


@pytest.mark.parametrize(
    "path", ["/test.Echo/Unary\n", "/test.Echo/Uñary"], ids=["trailing-newline", "non-ascii"]
)
async def test_outbound_refuses_a_malformed_path_locally(trio: Mesh, path: str) -> None:
    bob = trio.nodes["bob"].sidecar.state
    assert bob is not None
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(trio.nodes["alice"].outbound, "bob", method=path, timeout=WAIT)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == MALFORMED + repr(path)
    assert bob.counters.denied == 0  # refused by alice's sidecar: it never crossed the mesh


# -- 5: reserved metadata from the agent -------------------------------------------------


def record_raw(monkeypatch: pytest.MonkeyPatch, node: Node) -> list[list[tuple[str, str]]]:
    """The app's metadata as a list (the harness keeps a dict, which hides duplicates)."""
    seen: list[list[tuple[str, str]]] = []
    original = node.app._seen  # the harness's own record is kept too (still_serves reads it)

    def record(context: grpc.aio.ServicerContext) -> None:
        seen.append(list(context.invocation_metadata() or ()))
        original(context)

    monkeypatch.setattr(node.app, "_seen", record)
    return seen


def reserved(metadata: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in metadata if k.lower().startswith("trustmesh-")]


async def test_agent_cannot_set_reserved_keys_for_the_callee(
    trio: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = record_raw(monkeypatch, trio.nodes["bob"])
    spoof: list[tuple[str, str | bytes]] = [
        ("trustmesh-caller", "spiffe://test.local/agents/carol"),
        ("trustmesh-caller", str(agent_id("bob"))),
        ("trustmesh-target", "carol"),  # a second target: the first one wins, and is dropped
        ("trustmesh-anything", "x"),
        ("trustmesh-caller-bin", b"\x01"),
    ]
    await unary(trio.nodes["alice"].outbound, "bob", metadata=spoof, timeout=WAIT)
    assert [reserved(md) for md in seen] == [[("trustmesh-caller", ALICE)]]
    assert trio.nodes["carol"].app.received == []
    await still_serves(trio)


@pytest.mark.parametrize(
    ("key", "value", "code", "details"),
    [
        (
            "trustmesh-delegation-bin",
            b"\x00junk",
            grpc.StatusCode.INVALID_ARGUMENT,
            "trustmesh: chain_malformed: ",
        ),
        (
            "trustmesh-user-token",
            "forged",
            grpc.StatusCode.UNAUTHENTICATED,
            "trustmesh: user_token_invalid: this sidecar trusts no user-token issuers",
        ),
    ],
    ids=["unverifiable-chain", "user-token-without-issuers"],
)
async def test_agent_claims_its_sidecar_cannot_back_are_refused_at_the_source(
    trio: Mesh,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value: str | bytes,
    code: grpc.StatusCode,
    details: str,
) -> None:
    """A chain or user token the agent asks for but its sidecar can't vouch for is
    refused, not silently dropped: dropping it would send a different claim."""
    seen = record_raw(monkeypatch, trio.nodes["bob"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await unary(trio.nodes["alice"].outbound, "bob", metadata=[(key, value)], timeout=WAIT)
    assert err.value.code() == code
    assert (err.value.details() or "").startswith(details), err.value.details()
    assert seen == []
    await still_serves(trio)


@pytest.mark.parametrize(
    ("key", "status", "message"),
    [
        ("trustmesh-caller", "0", ""),
        ("TrustMesh-Caller", "13", "Illegal header key: TrustMesh-Caller"),
        ("TRUSTMESH-CALLER", "13", "Illegal header key: TRUSTMESH-CALLER"),
    ],
    ids=["control-lowercase", "mixed-case", "upper-case"],
)
async def test_mixed_case_reserved_keys_sent_frame_by_frame(
    trio: Mesh, monkeypatch: pytest.MonkeyPatch, key: str, status: str, message: str
) -> None:
    """grpcio won't send upper-case keys, so this agent writes HTTP/2 itself. HTTP/2
    forbids them: the engine refuses the stream (INTERNAL) before the router sees it."""
    if message and H2_ENGINE:
        message = f"trustmesh: malformed_request: illegal header key {key!r}"
    seen = record_raw(monkeypatch, trio.nodes["bob"])
    trailers = await raw_grpc(
        trio.nodes["alice"].outbound,
        [("trustmesh-target", "bob"), (key, "spiffe://test.local/agents/carol")],
    )
    assert (trailers.get("grpc-status"), trailers.get("grpc-message", "")) == (status, message)
    assert [reserved(md) for md in seen] == (
        [[("trustmesh-caller", ALICE)]] if status == "0" else []
    )
    await still_serves(trio)
