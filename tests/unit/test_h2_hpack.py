"""The h2 engine's HPACK caches and gRPC wire conventions.

The decoder is checked differentially against hpack's own `Decoder` (the reference)
over sequences of blocks, so that a cache entry surviving a table change would show
up as a mismatch; the encoder's output must decode, with the reference, to its input.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Callable
from typing import Any

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh.errors import Code
from trustmesh.resources import is_grpc_method
from trustmesh_sidecar.h2 import grpc_wire as wire
from trustmesh_sidecar.h2.call import MessageMeter
from trustmesh_sidecar.h2.hpack_cache import (
    SENSITIVE,
    VOLATILE,
    HeaderDecoder,
    HeaderEncoder,
    HeaderError,
    SplitBlock,
)

names = st.sampled_from(
    [
        b"content-type",
        b"x-a",
        b"x-b",
        b"grpc-timeout",
        b"traceparent",
        b":path",
        b"trustmesh-user-token",
        b"x-long-name-" + b"n" * 40,
    ]
)
values = st.sampled_from([b"", b"application/grpc", b"v", b"1000m", b"x" * 300, b"\x00\xff"])
header_lists = st.lists(st.tuples(names, values), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            header_lists, st.booleans(), st.sampled_from([None, 0, 64, 4096]), st.integers(1, 3)
        ),
        max_size=12,
    )
)
def test_decoder_matches_the_reference_across_blocks(
    blocks: list[tuple[list[tuple[bytes, bytes]], bool, int | None, int]],
) -> None:
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HeaderDecoder(hard_limit=1 << 20)
    for headers, huffman, table_size, repeat in blocks:
        if table_size is not None:
            encoder.header_table_size = table_size
        # Sending the same list again yields the same bytes once every field is
        # indexed: that is what the block cache serves, and where a stale entry would show.
        for _ in range(repeat):
            block = encoder.encode(headers, huffman=huffman)
            expected = tuple((bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True))
            got, size = ours.decode(block)
            assert got == expected
            assert size == sum(len(n) + len(v) + 32 for n, v in expected)


FORMS: dict[str, Callable[[list[tuple[bytes, bytes]]], Any]] = {
    "list": lambda headers: headers,
    "tuple": tuple,
    "split": lambda headers: SplitBlock(tuple(headers[: len(headers) // 2]), headers[len(headers) // 2 :]),
}  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            header_lists, st.sampled_from([None, 0, 256, 4096]), st.sampled_from(sorted(FORMS))
        ),
        max_size=12,
    )
)
def test_encoder_output_decodes_to_its_input(
    blocks: list[tuple[list[tuple[bytes, bytes]], int | None, str]],
) -> None:
    """Lists are encoded field by field; tuples are also cached whole (and so are the
    heads of split blocks), so a block remembered across a table change would decode
    to something else here."""
    ours, reference = HeaderEncoder(), hpack.Decoder()
    for headers, table_size, form in blocks:
        if table_size is not None:
            ours.set_table_size(table_size)
        for _ in range(2):
            block = ours.encode(FORMS[form](headers))
            got = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
            assert got == headers


X_A = ((b"x-a", b"v"),)
CACHED_BLOCKS = {
    # x-a is indexed by the first block; the second is then cached whole.
    "new-entry-shifts-indices": [X_A, X_A, ((b"x-b", b"w"),), X_A],
    "table-resized": [X_A, X_A, "resize", X_A],
    "entry-evicted": [X_A, X_A, tuple((b"x-%d" % i, b"b" * 100) for i in range(40)), X_A],
    "sensitive-never-cached": [((b"authorization", b"t"),)] * 3,
}


@pytest.mark.parametrize("sequence", list(CACHED_BLOCKS.values()), ids=list(CACHED_BLOCKS))
def test_a_block_cached_whole_is_not_reused_once_the_table_changed(
    sequence: list[tuple[tuple[bytes, bytes], ...] | str],
) -> None:
    ours, reference = HeaderEncoder(), hpack.Decoder()
    resized = False
    for headers in sequence:
        if headers == "resize":
            ours.set_table_size(0)
            resized = True
            continue
        assert isinstance(headers, tuple)
        block = ours.encode(headers)
        if resized:  # the next block starts with the table size update (RFC 7541 6.3)
            assert block[0] & 0xE0 == 0x20
            resized = False
        assert [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)] == list(headers)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_garbage_blocks_raise_only_header_errors(block: bytes) -> None:
    dec = HeaderDecoder(hard_limit=4096)
    with contextlib.suppress(HeaderError):
        dec.decode(block)


def test_hard_limit_counts_the_decoded_size() -> None:
    block = hpack.Encoder().encode([("x-big", "a" * 5000)])
    with pytest.raises(HeaderError, match="larger than 4096"):
        HeaderDecoder(hard_limit=4096).decode(block)


def test_volatile_fields_do_not_enter_the_table() -> None:
    enc = HeaderEncoder()
    first = enc.encode([(b"x-a", b"v"), (b"traceparent", b"00-1")])
    second = enc.encode([(b"x-a", b"v"), (b"traceparent", b"00-2")])
    assert len(second) < len(first)  # x-a is indexed now
    dec = hpack.Decoder()
    dec.decode(first)
    dec.decode(second)
    assert [n for n, _ in dec.header_table.dynamic_entries] == [b"x-a"]


@pytest.mark.parametrize("name", sorted(VOLATILE | SENSITIVE))
@pytest.mark.parametrize("length", [0, 1, 126, 127, 128, 255, 300, 20_000])
def test_volatile_and_sensitive_fields_are_never_indexed_literals(name: bytes, length: int) -> None:
    enc, dec = HeaderEncoder(), hpack.Decoder()
    dec.max_header_list_size = 1 << 20
    value = b"v" * length
    for _ in range(2):  # never served from a cache, never added to the table
        got = dec.decode(enc.encode([(name, value), (b"x-a", b"1")]), raw=True)
        assert [(bytes(n), bytes(v)) for n, v in got] == [(name, value), (b"x-a", b"1")]
        assert isinstance(got[0], hpack.NeverIndexedHeaderTuple)
    assert [n for n, _ in dec.header_table.dynamic_entries] == [b"x-a"]


@pytest.mark.parametrize(
    ("name", "length", "plain"),
    [
        (b"x-app", 128, False),  # at the bound: Huffman-coded and indexed as usual
        (b"x-app", 129, True),
        (b"x-app", 20_000, True),
        (b":path", 300, True),  # a name from the static table keeps its index
    ],
)
def test_long_values_are_plain_literals_outside_the_table(
    name: bytes, length: int, plain: bool
) -> None:
    enc, dec = HeaderEncoder(), hpack.Decoder()
    dec.max_header_list_size = 1 << 20
    value = bytes(range(97, 123)) * (length // 26) + b"a" * (length % 26)
    for _ in range(2):
        block = enc.encode([(name, value), (b"x-a", b"1")])
        got = dec.decode(block, raw=True)
        assert [(bytes(n), bytes(v)) for n, v in got] == [(name, value), (b"x-a", b"1")]
        assert (value in block) is plain  # not Huffman-coded: the bytes as they are
    in_table = [n for n, _ in dec.header_table.dynamic_entries]
    assert in_table == ([b"x-a"] if plain else [b"x-a", name])


def test_indexed_fields_beyond_the_table_are_compression_errors() -> None:
    dec = HeaderDecoder(hard_limit=4096)
    for block in (b"\x80", b"\xbe", b"\xff\x00", b"\xff\x80\x01"):  # 0, 62, 127, 255
        with pytest.raises(HeaderError):
            dec.decode(block)
    assert dec.decode(b"\xbd")[0] == ((b"www-authenticate", b""),)  # 61: last static entry


# -- gRPC wire ----------------------------------------------------------------------------

TIMEOUTS = {"100m": 0.1, "5S": 5.0, "1H": 3600.0, "7u": 7e-6, "12345678n": 0.012345678}


@pytest.mark.parametrize(("text", "seconds"), TIMEOUTS.items(), ids=TIMEOUTS.keys())
def test_parse_timeout(text: str, seconds: float) -> None:
    assert wire.parse_timeout(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "123456789S", "5s", "-5S", "5 S"])
def test_not_a_timeout(text: str) -> None:
    assert wire.parse_timeout(text) is None


@given(st.floats(min_value=1e-4, max_value=1e9))
def test_format_timeout_never_shortens(seconds: float) -> None:
    text = wire.format_timeout(seconds)
    back = wire.parse_timeout(text)
    assert back is not None and back >= seconds * (1 - 1e-12) and len(text) <= 9


@given(st.text(max_size=200))
def test_grpc_message_round_trips(text: str) -> None:
    encoded = wire.encode_message(text)
    assert all(0x20 <= b <= 0x7E for b in encoded)
    assert wire.decode_message(encoded) == text.encode("utf-8", "replace").decode(
        "utf-8", "replace"
    )


def test_binary_metadata_round_trips() -> None:
    blob = bytes(range(256))
    fields = wire.metadata_fields((("x-blob-bin", blob), ("x-text", "caf\xe9")))
    req = wire.parse_request(((b":method", b"POST"), (b":path", b"/a.B/C"), *fields))
    assert req.metadata == (("x-blob-bin", blob), ("x-text", "caf\xe9"))


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (b"\x00" + bytes(range(256)), bytes(range(256))),  # true binary: NUL, then the bytes
        (b"\x00", b""),
        (b"AAEC", b"\x00\x01\x02"),  # base64, as before
    ],
    ids=["true-binary", "true-binary-empty", "base64"],
)
def test_binary_metadata_in_either_form(value: bytes, want: bytes) -> None:
    req = wire.parse_request(((b":method", b"POST"), (b":path", b"/a.B/C"), (b"x-bin", value)))
    assert req.metadata == (("x-bin", want),)
    # Sent on in base64, whichever form it came in (the next peer may not take NULs).
    assert wire.metadata_fields(req.metadata) == [(b"x-bin", base64.b64encode(want).rstrip(b"="))]


def test_true_binary_status_details_go_on_as_base64() -> None:
    resp = wire.parse_response(
        ((b"grpc-status", b"3"), (b"grpc-status-details-bin", b"\x00\xff\x00")), trailers=True
    )
    assert resp.details_bin == base64.b64encode(b"\xff\x00").rstrip(b"=")


RESPONSE = ((b":status", b"200"), (b"content-type", b"application/grpc"), (b"x-a", b"v"))
TRAILERS = ((b"grpc-status", b"5"), (b"grpc-message", b"no%20such"), (b"x-t", b"w"))


@pytest.mark.parametrize(
    ("first", "then", "outcome"),
    [
        (
            (RESPONSE, False),
            (RESPONSE, False),
            (200, None, (("x-a", "v"),)),  # content-type is transport, not metadata
        ),
        ((TRAILERS, True), (TRAILERS, True), (None, 5, (("x-t", "w"),))),
        ((RESPONSE, False), (RESPONSE, True), "unexpected pseudo-header"),
        ((TRAILERS, True), (TRAILERS, False), "response without :status"),
    ],
    ids=["headers-again", "trailers-again", "headers-then-as-trailers", "trailers-then-as-headers"],
)
def test_a_remembered_response_is_remembered_per_kind(
    first: tuple[tuple[tuple[bytes, bytes], ...], bool],
    then: tuple[tuple[tuple[bytes, bytes], ...], bool],
    outcome: tuple[int | None, int | None, tuple[tuple[str, str], ...]] | str,
) -> None:
    wire.parse_response(first[0], trailers=first[1])
    if isinstance(outcome, str):
        with pytest.raises(wire.Malformed, match=outcome):
            wire.parse_response(then[0], trailers=then[1])
        return
    resp = wire.parse_response(then[0], trailers=then[1])
    assert (resp.status, resp.grpc_status, resp.metadata) == outcome


def test_only_small_responses_are_remembered() -> None:
    small = ((b"grpc-status", b"0"), (b"x-small", b"v"))
    large = ((b"grpc-status", b"0"), (b"x-large", b"v" * 2048))
    for raw in (small, large):
        wire.parse_response(raw, trailers=True)
    assert small in wire._TRAILERS and large not in wire._TRAILERS
    assert wire.parse_response(large, trailers=True).metadata == (("x-large", "v" * 2048),)


def test_requests_are_remembered_only_when_small_and_well_formed() -> None:
    head = ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"grpc-timeout", b"5S"))
    small = (*head, (b"x-small", b"v"))
    large = (*head, (b"x-large", b"v" * 2048))
    bad = (*head, (b"x-bad", b"a\r\nb: c"))
    first = wire.parse_request(small)
    assert wire.parse_request(small) is first  # the same block: the same shared value
    assert (first.metadata, first.timeout) == ((("x-small", "v"),), 5.0)
    wire.parse_request(large)
    assert small in wire._REQUESTS and large not in wire._REQUESTS
    assert wire.parse_request(large).metadata == (("x-large", "v" * 2048),)
    for _ in range(2):  # refused every time: nothing about it is remembered
        with pytest.raises(wire.Malformed):
            wire.parse_request(bad)
    assert bad not in wire._REQUESTS


MALFORMED = {
    "upper-case-name": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"X-A", b"v")),
    "pseudo-after-regular": ((b":method", b"POST"), (b"x-a", b"v"), (b":path", b"/a.B/C")),
    "unknown-pseudo": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b":status", b"200")),
    "repeated-pseudo": ((b":method", b"POST"), (b":path", b"/a"), (b":path", b"/b")),
    "not-post": ((b":method", b"GET"), (b":path", b"/a.B/C")),
    "no-path": ((b":method", b"POST"),),
    "connection-header": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"connection", b"x")),
    "te-not-trailers": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"te", b"gzip")),
    "newline-in-value": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"x-a", b"a\r\nb: c")),
    "nul-in-text-value": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"x-a", b"\x00ab")),
    "bad-base64": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"x-bin", b"!!")),
    # Transport fields are not metadata, but they are checked as strictly.
    "pseudo-after-transport": ((b":method", b"POST"), (b"te", b"trailers"), (b":path", b"/a")),
    "nul-in-user-agent": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"user-agent", b"a\x00")),
    "newline-in-timeout": ((b":method", b"POST"), (b":path", b"/a.B/C"), (b"grpc-timeout", b"1S\n")),
    "bad-base64-transport-bin": ((b":method", b"POST"), (b":path", b"/a"), (b"grpc-trace-bin", b"!!")),
}  # fmt: skip


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_requests(raw: tuple[tuple[bytes, bytes], ...]) -> None:
    with pytest.raises(wire.Malformed):
        wire.parse_request(raw)


def test_transport_fields_are_read_never_metadata() -> None:
    raw = (
        (b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/a.B/C"),
        (b":authority", b"localhost"), (b"grpc-timeout", b"250m"), (b"te", b"trailers"),
        (b"content-type", b"application/grpc+proto"), (b"user-agent", b"grpc-python/1"),
        (b"grpc-encoding", b"gzip"), (b"grpc-accept-encoding", b"identity,gzip"),
        (b"grpc-trace-bin", b"\x00\x01"), (b"x-app", b"1"), (b"trustmesh-target", b"bob"),
    )  # fmt: skip
    for _ in range(2):  # the second time from the caches
        req = wire.parse_request(raw)
        assert req.metadata == (("x-app", "1"), ("trustmesh-target", "bob"))
        assert (req.timeout, req.content_type) == (0.25, b"application/grpc+proto")
        assert (req.encoding, req.accept_encoding) == (b"gzip", b"identity,gzip")
    resp = wire.parse_response(
        ((b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-encoding", b"gzip"),
         (b"x-r", b"2")),
        trailers=False,
    )  # fmt: skip
    assert (resp.metadata, resp.content_type, resp.encoding) == (
        (("x-r", "2"),),
        b"application/grpc",
        b"gzip",
    )


@pytest.mark.parametrize(
    ("raw", "path"),
    [
        (b"/a.B/C\n", "/a.B/C\n"),
        ("/a.B/Uñ".encode(), "/a.B/Uñ"),
        (b"/a\x00\r", "/a\x00\r"),
        (b"/a.B/\xff", "/a.B/\ufffd"),
    ],
    ids=["newline", "utf-8", "nul-cr", "not-utf-8"],
)
def test_any_path_reaches_the_router_but_never_goes_upstream(raw: bytes, path: str) -> None:
    """The router answers a bad :path as bad_method (INVALID_ARGUMENT), as on grpcio."""
    for _ in range(2):  # the second time remembered
        req = wire.parse_request(((b":method", b"POST"), (b":path", raw)))
        assert req.path == path
        assert not wire.forwardable_path(req.path) and not req.forwardable
    good = wire.parse_request(((b":method", b"POST"), (b":path", b"/a.B/C")))
    assert good.forwardable


def test_other_pseudo_header_values_are_still_checked() -> None:
    with pytest.raises(wire.Malformed, match="illegal value for :authority"):
        wire.parse_request(((b":method", b"POST"), (b":path", b"/a.B/C"), (b":authority", b"a\nb")))


PATHS = {
    "/a.B/C": (True, True),
    "/a B/C": (False, False),
    "": (False, False),
    "a.B/C": (False, False),
    "/a.B/C\n": (False, False),
    "/a.B/C/D": (True, False),  # forwardable, but not a gRPC method
    "/" + "a" * 300 + ".B/C": (True, True),  # too long to be remembered
}


@pytest.mark.parametrize(("path", "answers"), list(PATHS.items()), ids=list(range(len(PATHS))))
def test_path_checks_give_the_same_answer_when_remembered(
    path: str, answers: tuple[bool, bool]
) -> None:
    for _ in range(2):  # the second time from the memo
        assert (wire.forwardable_path(path), is_grpc_method(path)) == answers


def test_status_mappings() -> None:
    assert wire.status_of_reset(0x8) is Code.CANCELLED
    assert wire.status_of_reset(0x7) is Code.UNAVAILABLE
    assert wire.status_of_reset(0xB) is Code.RESOURCE_EXHAUSTED
    assert wire.status_of_reset(0x1234) is Code.INTERNAL
    assert wire.status_of_http(404) is Code.UNIMPLEMENTED
    assert wire.grpc_code(99) is Code.UNKNOWN


# -- message metering --------------------------------------------------------------------------


def message(n: int) -> bytes:
    return b"\x00" + n.to_bytes(4, "big") + b"m" * n


@given(st.lists(st.integers(0, 300), max_size=10), st.data())
def test_meter_follows_prefixes_split_anywhere(sizes: list[int], data: st.DataObject) -> None:
    stream = b"".join(message(n) for n in sizes) + message(301)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    meter = MessageMeter(300)
    found = [meter.feed(stream[a:b]) for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert [x for x in found if x is not None] == [301]
