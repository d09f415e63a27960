"""The verifier's fast path (a cached prefix plus one new hop) decides exactly as the
full path does, and its byte-level reading of a chain agrees with protobuf's.

`split_canonical` cuts a chain without protobuf; it may only ever say "not
canonical" (None) or agree with `split_chain`. The verifier then decides every input
the same way with a warm cache (fast path) as with an empty one (full path).
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_delegation_fuzz import SETTINGS, SNAPSHOT, SVIDS, VALID, VERIFIER, decide, sid

from trustmesh.delegation import ChainCache, extend_chain, verify_chain
from trustmesh.delegation_format import encode_chain
from trustmesh.delegation_parse import ChainFormatError, split_canonical, split_chain
from trustmesh.v1 import delegation_pb2 as dpb

from certs import NOW

METHOD = "/demo.Tool/Invoke"


def _pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(h.body, h.signature) for h in split_chain(data).hops()]


def _canonical(prefix: bytes) -> bool:
    """Whether `prefix` is the canonical encoding of some hops (what the prefix cache
    stores, so the only prefix the fast path ever goes on with)."""
    try:
        return encode_chain(_pairs(prefix)) == prefix
    except ChainFormatError:
        return False


def _agrees(data: bytes) -> bool:
    """Whenever `split_canonical` reads `data` and its prefix is canonical,
    `split_chain` reads the same chain. True when the fast reading applied."""
    fast = split_canonical(data)
    if fast is None or (fast.depth > 1 and not _canonical(data[: fast.cut])):
        return False
    split = split_chain(data)  # must not raise: the fast reading claimed a chain
    assert split.count == fast.depth
    last = split.hop(split.count - 1)
    assert (last.body, last.signature) == (fast.body, fast.signature)
    if split.count > 1:
        assert split.region(split.count - 2) == data[: fast.cut]
    assert encode_chain(_pairs(data)) == data
    return True


@SETTINGS
@given(st.sets(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=4))
def test_canonical_reading_agrees_after_bit_flips(bits: set[int]) -> None:
    data = bytearray(VALID)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    _agrees(bytes(data))


@SETTINGS
@given(st.integers(0, len(VALID)), st.binary(max_size=40))
def test_canonical_reading_agrees_after_truncation_and_junk(cut: int, junk: bytes) -> None:
    _agrees(VALID[:cut] + junk)


@SETTINGS
@given(
    st.lists(st.tuples(st.binary(max_size=300), st.binary(max_size=170)), min_size=1,
             max_size=9),
)  # fmt: skip
def test_canonical_encodings_are_read_and_agree(hops: list[tuple[bytes, bytes]]) -> None:
    data = encode_chain(hops)
    applied = _agrees(data)
    if hops[-1][0] and len(hops[-1][1]) <= 160 and len(hops) <= 8:
        assert applied


def _last_reencoded(swap: bool = False, overlong: bool = False) -> bytes:
    """VALID with its last hop in a valid but non-canonical encoding."""
    split = split_chain(VALID)
    last = split.hop(split.count - 1)
    if swap:  # signature (field 2) before body (field 1): protobuf reads the same
        inner = (dpb.SignedHop(signature=last.signature).SerializeToString()
                 + dpb.SignedHop(body=last.body).SerializeToString())  # fmt: skip
    else:
        inner = dpb.SignedHop(body=last.body, signature=last.signature).SerializeToString()
    size = len(inner)
    # An overlong varint: a third byte that adds nothing (protobuf accepts it).
    length = bytes([size & 0x7F | 0x80, size >> 7 | 0x80, 0x00]) if overlong else _varint(size)
    return split.region(split.count - 2) + b"\x12" + length + inner


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@pytest.mark.parametrize(
    "name, data",
    [
        ("fields of the last hop swapped", _last_reencoded(swap=True)),
        ("overlong length varint of the last hop", _last_reencoded(overlong=True)),
    ],
)
def test_non_canonical_encodings_take_the_full_path_and_verify(name: str, data: bytes) -> None:
    assert data != VALID
    assert _pairs(data) == _pairs(VALID)
    assert split_canonical(data) is None, name
    warm = ChainCache()
    assert decide(VALID, warm).allowed
    assert decide(data, warm).allowed, name
    assert decide(data, ChainCache()).allowed, name


def _mutations() -> list[tuple[str, bytes]]:
    split = split_chain(VALID)
    prefix = split.region(split.count - 2)
    last = split.hop(split.count - 1)
    other = extend_chain(
        split_chain(VALID).region(0),
        svid=SVIDS["planner"],
        audience=sid("helper"),
        method=METHOD,
        now=NOW,
        nonce=b"m" * 16,
    )
    assert other is not None
    forged = bytearray(last.signature)
    forged[-1] ^= 1
    return [
        ("valid", VALID),
        ("last signature forged", prefix + encode_chain([(last.body, bytes(forged))])[2:]),
        ("last hop unsigned", prefix + encode_chain([(last.body, b"")])[2:]),
        ("last hop dropped", prefix),
        ("last hop twice", VALID + encode_chain([(last.body, last.signature)])[2:]),
        ("another chain's last hop", prefix + split_chain(other).data[len(prefix) :]),
        ("last body truncated", prefix + encode_chain([(last.body[:-1], last.signature)])[2:]),
    ]


@pytest.mark.parametrize("name, data", _mutations(), ids=[n for n, _ in _mutations()])
def test_warm_and_cold_caches_decide_alike(name: str, data: bytes) -> None:
    warm = ChainCache()
    assert decide(VALID, warm).allowed  # every hop but the last is now a stored prefix
    fast, full = decide(data, warm), decide(data, ChainCache())
    assert (fast.allowed, fast.reason) == (full.allowed, full.reason), name
    assert fast.allowed == (name == "valid"), (name, fast.message)


@SETTINGS
@given(st.sets(st.integers(0, len(VALID) * 8 - 1), min_size=1, max_size=3))
def test_warm_and_cold_caches_decide_alike_after_bit_flips(bits: set[int]) -> None:
    data = bytearray(VALID)
    for bit in bits:
        data[bit // 8] ^= 1 << (bit % 8)
    warm = ChainCache()
    assert decide(VALID, warm).allowed
    fast, full = decide(bytes(data), warm), decide(bytes(data), ChainCache())
    assert (fast.allowed, fast.reason) == (full.allowed, full.reason)


def test_a_hit_never_outlives_the_chain() -> None:
    warm = ChainCache()
    assert decide(VALID, warm).allowed
    result = verify_chain(VALID, peer=sid("helper"), local=sid("tool"), method=METHOD,
                          snapshot=SNAPSHOT, verifier=VERIFIER, cache=warm,
                          now=NOW + timedelta(seconds=61))  # fmt: skip
    assert result.reason.value == "chain_expired", result.message


def test_split_canonical_refuses_what_split_chain_refuses() -> None:
    for data in (b"", b"\x08\x01", b"\x08\x02\x12\x02\x0a\x00", b"\x12\x00"):
        assert split_canonical(data) is None
        with pytest.raises(ChainFormatError):
            split_chain(data)
