"""HPACK (RFC 7541) for the engine: one decoder and one encoder per connection.

Header blocks are never copied from one connection to another: each connection has
its own dynamic table, so every block is decoded on the way in and encoded again on
the way out.

Both directions are cached, and a cache entry is only ever valid for one state of
the dynamic table. `_VersionedTable` counts every change to the table; an entry keeps
the version it was made at and is used only while the table still has it.

* Decoding: a whole block is cached only when decoding it left the table unchanged
  (the common case once a connection is warm: all fields indexed). Otherwise the
  block is walked field by field here, over hpack's table and Huffman decoder, and
  Huffman-coded strings are cached by their bytes (a pure function).
* Encoding: each field's bytes are cached when encoding it did not change the table.
  Values that change on every call (`VOLATILE`) are sent as never-indexed literals,
  so they neither churn the table nor defeat the caches of the fields around them.
  A block given as a tuple (one the engine sends again and again, e.g. the response
  headers an app answers every call with) is cached whole, the same way, unless it
  holds a volatile or sensitive field.

Limits: a block that inflates beyond `hard_limit` bytes (RFC 9113 header list size)
is a connection error (`HeaderError`), since the table may now be out of step. The
soft per-call limit is checked by the caller on the decoded list.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from hpack import Encoder, HPACKError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

__all__ = [
    "VOLATILE",
    "HeaderDecoder",
    "HeaderEncoder",
    "HeaderError",
    "RawHeaders",
    "SplitBlock",
]

RawHeaders = tuple[tuple[bytes, bytes], ...]

# Fields whose values differ per call: never indexed, never cached. (A delegation
# chain is new on every call: each hop carries a nonce.)
VOLATILE = frozenset({
    b"grpc-timeout", b"traceparent", b"tracestate", b"grpc-message",
    b"trustmesh-delegation-bin",
})  # fmt: skip
# Fields whose values must not enter a compression context (RFC 7541 7.1.3).
SENSITIVE = frozenset({b"authorization", b"cookie", b"trustmesh-user-token"})

# Neither cached nor indexed: sent as never-indexed literals (RFC 7541 6.2.3).
_LITERAL = VOLATILE | SENSITIVE
_STATIC = HeaderTable.STATIC_TABLE
_STATIC_LEN = len(_STATIC)

_CACHE_ENTRIES = 512
_BLOCK_ENTRIES = 256
_HUFFMAN_ENTRIES = 2048
_HUFFMAN_MAX_BYTES = 256  # longer strings are rare and decoded each time
# Values longer than this are sent as literals without indexing and without Huffman:
# Huffman-coding 2.4 KB of base64 in Python costs ~800 us for ~20% fewer bytes, and a
# long value would push the useful entries out of the 4 KiB table.
_PLAIN_VALUE_BYTES = 128


class SplitBlock(NamedTuple):
    """A header block in two parts: `head`, the same tuple on call after call (encoded
    once per table state, as a tuple block is), then `tail`, this call's fields."""

    head: tuple[tuple[bytes, bytes], ...]
    tail: list[tuple[bytes, bytes]]


class HeaderError(Exception):
    """The block can't be decoded (COMPRESSION_ERROR) or is over the hard limit."""


class _VersionedTable(HeaderTable):
    """hpack's table, counting changes so that caches know when they went stale."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.version += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.version += 1
        HeaderTable.maxsize.fset(self, newmax)  # type: ignore[attr-defined]


def _integer(block: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    """An HPACK integer at `block[i]`; returns (value, next index). At most 5 bytes."""
    mask = (1 << prefix_bits) - 1
    value = block[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    for _ in range(4):
        if i >= len(block):
            raise HeaderError("truncated integer")
        byte = block[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
    raise HeaderError("integer representation too long")


class HeaderDecoder:
    def __init__(self, *, hard_limit: int, max_table_size: int = 4096) -> None:
        self._table = _VersionedTable()
        self._hard_limit = hard_limit
        self._max_table = max_table_size
        self._blocks: dict[bytes, tuple[int, RawHeaders, int]] = {}
        self._huffman: dict[bytes, bytes] = {}

    def decode(self, block: bytes) -> tuple[RawHeaders, int]:
        """The block's fields, and their size as RFC 9113 counts it (+32 per field)."""
        table = self._table
        hit = self._blocks.get(block)
        if hit is not None and hit[0] == table.version:
            return hit[1], hit[2]
        before = table.version
        try:
            headers, size = self._walk(block)
        except HeaderError:
            raise
        except (HPACKError, IndexError, ValueError) as e:
            raise HeaderError(f"undecodable header block: {e}") from e
        if table.version == before:
            if len(self._blocks) >= _CACHE_ENTRIES:
                self._blocks.clear()
            self._blocks[block] = (before, headers, size)
        return headers, size

    def _walk(self, block: bytes) -> tuple[RawHeaders, int]:
        table = self._table
        out: list[tuple[bytes, bytes]] = []
        size = 0
        i, n = 0, len(block)
        while i < n:
            first = block[i]
            if first & 0x80:  # indexed field
                index = first & 0x7F
                if index == 0x7F:
                    index, i = _integer(block, i, 7)
                else:
                    i += 1
                if index <= _STATIC_LEN:
                    if index == 0:
                        raise HeaderError("indexed field with index 0")
                    field = _STATIC[index - 1]
                else:
                    dynamic = index - _STATIC_LEN - 1
                    if dynamic >= len(table.dynamic_entries):
                        raise HeaderError(f"invalid table index {index}")
                    field = table.dynamic_entries[dynamic]
            elif first & 0xE0 == 0x20:  # dynamic table size update
                if out:
                    raise HeaderError("table size update after a field")
                new_size, i = _integer(block, i, 5)
                if new_size > self._max_table:
                    raise HeaderError("table size update beyond the advertised maximum")
                table.maxsize = new_size
                continue
            else:
                indexing = bool(first & 0x40)
                index, i = _integer(block, i, 6 if indexing else 4)
                if index:
                    name = table.get_by_index(index)[0]
                else:
                    name, i = self._string(block, i)
                value, i = self._string(block, i)
                field = (name, value)
                if indexing:
                    table.add(name, value)
            size += len(field[0]) + len(field[1]) + 32
            if size > self._hard_limit:
                raise HeaderError(f"header list larger than {self._hard_limit} bytes")
            out.append(field)
        return tuple(out), size

    def _string(self, block: bytes, i: int) -> tuple[bytes, int]:
        if i >= len(block):
            raise HeaderError("truncated string")
        huffman = block[i] & 0x80
        length, i = _integer(block, i, 7)
        if length > self._hard_limit or i + length > len(block):
            raise HeaderError("truncated string")
        raw = block[i : i + length]
        i += length
        if not huffman:
            return raw, i
        cached = self._huffman.get(raw)
        if cached is None:
            cached = decode_huffman(raw)
            if length <= _HUFFMAN_MAX_BYTES:
                if len(self._huffman) >= _HUFFMAN_ENTRIES:
                    self._huffman.clear()
                self._huffman[raw] = cached
        return cached, i


class HeaderEncoder:
    def __init__(self) -> None:
        self._enc = Encoder()
        self._table = _VersionedTable()
        self._enc.header_table = self._table
        self._fields: dict[tuple[bytes, bytes], tuple[int, bytes]] = {}
        # Whole blocks by the identity of their tuple (the engine sends the same tuple
        # objects again and again; hashing one means hashing every field in it). Each
        # entry keeps its tuple alive, so an id is never reused while it is here.
        self._blocks: dict[int, tuple[tuple[tuple[bytes, bytes], ...], int, bytes]] = {}

    def set_table_size(self, size: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE; we never use more than 4096."""
        self._enc.header_table_size = min(size, 4096)

    def encode(
        self,
        headers: Iterable[tuple[bytes, bytes]] | Sequence[tuple[bytes, bytes]] | SplitBlock,
    ) -> bytes:
        """One header block. A tuple is cached whole; a `SplitBlock` (a `head` tuple and
        a `tail`) is encoded as its head, cached whole, followed by its tail."""
        # Narrowed without `cast` (a function call, and this runs per block).
        if isinstance(headers, SplitBlock):
            return self._whole(headers.head) + self._encode(headers.tail)
        if type(headers) is tuple:
            return self._whole(headers)
        return self._encode(headers)

    def _whole(self, headers: tuple[tuple[bytes, bytes], ...]) -> bytes:
        table = self._table
        hit = self._blocks.get(id(headers))
        if hit is not None and hit[0] is headers and hit[1] == table.version and not table.resized:
            return hit[2]
        before = table.version
        block = self._encode(headers)
        if table.version == before and not any(name in _LITERAL for name, _ in headers):
            if len(self._blocks) >= _BLOCK_ENTRIES:
                self._blocks.clear()
            self._blocks[id(headers)] = (headers, before, block)
        return block

    def _encode(
        self, headers: Iterable[tuple[bytes, bytes]] | Sequence[tuple[bytes, bytes]]
    ) -> bytes:
        enc, table, cache = self._enc, self._table, self._fields
        out: list[bytes] = []
        if table.resized:
            out.append(enc.encode([]))  # emits the pending table size update(s)
        for field in headers:
            # Volatile and sensitive fields are never put in the cache, so a hit is
            # always a field that may be cached.
            hit = cache.get(field)
            if hit is not None and hit[0] == table.version:
                out.append(hit[1])
                continue
            if field[0] in _LITERAL:
                out.append(_never_indexed(field[0], field[1]))
                continue
            if len(field[1]) > _PLAIN_VALUE_BYTES:
                out.append(_not_indexed(field[0], field[1]))
                continue
            before = table.version
            encoded = enc.add(field, False, huffman=True)
            out.append(encoded)
            if table.version == before:
                if len(cache) >= _CACHE_ENTRIES:
                    cache.clear()
                cache[field] = (before, encoded)
        return b"".join(out)


def _encode_int(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) with `flags` in the first byte's high bits."""
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes((flags | value,))
    out = bytearray((flags | mask,))
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _name_prefix(name: bytes, flags: int = 0x10) -> bytes:
    """The start of a literal that is never indexed (`flags` 0x10) or not indexed (0x00):
    the static table's index for the name if it has one (the dynamic table is not
    consulted), else the name itself."""
    for i, (static_name, _) in enumerate(_STATIC):
        if static_name == name:
            return _encode_int(i + 1, 4, flags)
    return bytes((flags,)) + _encode_int(len(name), 7, 0) + name


_NAME_PREFIXES = {name: _name_prefix(name) for name in _LITERAL}


def _never_indexed(name: bytes, value: bytes) -> bytes:
    """Literal header field never indexed (RFC 7541 6.2.3), strings without Huffman."""
    prefix = _NAME_PREFIXES.get(name) or _name_prefix(name)
    return prefix + _encode_int(len(value), 7, 0) + value


_PLAIN_PREFIXES: dict[bytes, bytes] = {}


def _not_indexed(name: bytes, value: bytes) -> bytes:
    """Literal header field without indexing (RFC 7541 6.2.2), strings without Huffman."""
    prefix = _PLAIN_PREFIXES.get(name)
    if prefix is None:
        prefix = _name_prefix(name, 0x00)
        if len(_PLAIN_PREFIXES) < _CACHE_ENTRIES:
            _PLAIN_PREFIXES[name] = prefix
    return prefix + _encode_int(len(value), 7, 0) + value
