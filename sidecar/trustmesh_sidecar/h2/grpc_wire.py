"""gRPC over HTTP/2 (PROTOCOL-HTTP2.md): header fields <-> metadata, timeouts, status.

Pure functions over decoded header lists; nothing here does I/O.

* Metadata keys ending in `-bin` carry base64 on the wire and bytes above the seam;
  other values are kept as latin-1 text, so every byte survives a round trip.
* A request is malformed (RFC 9113 8.2, 8.3) when a field name has upper-case letters
  or is connection-specific, a pseudo-header is unknown, repeated or after a regular
  field, or a value holds NUL, CR or LF. The message says which.
* Transport fields (`headers.TRANSPORT`: content-type, te, grpc-timeout, user-agent,
  ...) are checked and read here, and never become metadata: the routers would drop
  them, and every pass over a call's metadata is shorter without them.
* Except `:path`: like a gRPC server, which looks any path up as a method name, the
  engine hands it (UTF-8) to the router, which refuses a malformed one as `bad_method`
  (INVALID_ARGUMENT, as on the grpcio engine). `forwardable_path` is the engine's own
  last check before a path goes upstream.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TypeVar

from trustmesh.errors import Code
from trustmesh.resources import RememberedMatch
from trustmesh_sidecar.engine import Header, Headers
from trustmesh_sidecar.h2.frames import ErrorCode
from trustmesh_sidecar.h2.hpack_cache import RawHeaders
from trustmesh_sidecar.headers import TRANSPORT

__all__ = [
    "Malformed",
    "Request",
    "Response",
    "decode_message",
    "encode_message",
    "format_timeout",
    "forwardable_path",
    "grpc_code",
    "headers_out",
    "metadata_fields",
    "parse_request",
    "parse_response",
    "parse_timeout",
    "response_fields",
    "status_fields",
    "status_of_http",
    "status_of_reset",
    "trailers_out",
]

_CONNECTION_SPECIFIC = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
_REQUEST_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_NAME_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")
_FORWARDABLE_PATH_RE = re.compile(r"/[\x21-\x7e]+")
# Checked fields, both ways, keyed by the field itself; per-call values are not kept.
_UNCACHED = frozenset({b"grpc-timeout", b"traceparent", b"tracestate", b"grpc-message",
                       b"trustmesh-delegation-bin"})  # fmt: skip
_CACHE_ENTRIES = 4096
_IN: dict[tuple[bytes, bytes], Header] = {}
_OUT: dict[Header, tuple[bytes, bytes] | None] = {}
# Request pseudo-header fields (other than :path) whose values were checked, and
# transport fields (other than those new on every call).
_PSEUDO_OK: set[tuple[bytes, bytes]] = set()
_TRANSPORT_OK: set[tuple[bytes, bytes]] = set()
_TRANSPORT_NAMES = frozenset(name.encode() for name in TRANSPORT)
_TIMEOUT_RE = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNIT = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


# Never changed once built (and shared when remembered): plain slots classes (a frozen
# dataclass's __init__ goes through object.__setattr__ for every field).
@dataclass(slots=True)
class Request:
    path: str
    authority: str
    metadata: Headers  # every non-pseudo field, as metadata
    content_type: bytes
    timeout: float | None
    encoding: bytes | None  # grpc-encoding: the message bytes depend on it
    accept_encoding: bytes | None
    forwardable: bool  # `forwardable_path(path)`, worked out with the rest


@dataclass(slots=True)
class Response:
    status: int | None  # :status of an initial HEADERS; None for trailers
    metadata: Headers
    grpc_status: int | None
    grpc_message: str
    details_bin: bytes | None  # grpc-status-details-bin, raw (base64) as received
    content_type: bytes | None
    encoding: bytes | None
    accept_encoding: bytes | None
    # The fields sent downstream for it, as `headers_out` and `trailers_out` made them.
    # Remembered responses are shared: so are these, and the encoder caches tuples.
    headers_fields: tuple[tuple[bytes, bytes], ...] | None = dataclasses.field(
        default=None, compare=False
    )
    trailers_fields: tuple[tuple[bytes, bytes], ...] | None = dataclasses.field(
        default=None, compare=False
    )


class Malformed(ValueError):
    pass


def _value_ok(value: bytes) -> bool:
    return b"\x00" not in value and b"\r" not in value and b"\n" not in value


def _to_metadata(name: bytes, value: bytes) -> Header:
    key = name.decode("ascii")
    if key.endswith("-bin"):
        try:
            return key, base64.b64decode(value + b"=" * (-len(value) % 4), validate=True)
        except (binascii.Error, ValueError) as e:
            raise Malformed(f"metadata {key!r} is not base64") from e
    return key, value.decode("latin-1")


def _regular(name: bytes, value: bytes) -> Header:
    """A regular field checked and turned into metadata (cached: calls repeat fields)."""
    field = (name, value)
    header = _IN.get(field)
    if header is not None:
        return header
    if not _NAME_RE.fullmatch(name):
        raise Malformed(f"illegal header key {name[:64].decode('latin-1')!r}")
    if name in _CONNECTION_SPECIFIC:
        raise Malformed(f"connection-specific header {name.decode()!r}")
    if value[:1] == b"\x00" and name.endswith(b"-bin"):
        # gRPC true binary metadata (we advertise SETTINGS 0xFE03): NUL, then the bytes.
        # Base64 never starts with NUL, so the two forms can't be confused.
        header = name.decode("ascii"), value[1:]
    elif not _value_ok(value):
        raise Malformed(f"illegal value for header {name.decode()!r}")
    else:
        header = _to_metadata(name, value)
    if name not in _UNCACHED and name not in _TRANSPORT_NAMES:
        if len(_IN) >= _CACHE_ENTRIES:
            _IN.clear()
        _IN[field] = header
    return header


def _check_transport(name: bytes, value: bytes) -> None:
    """A transport field's value is checked as a metadata value would be."""
    if name.endswith(b"-bin"):
        _regular(name, value)  # true binary or valid base64
    elif not _value_ok(value):
        raise Malformed(f"illegal value for header {name.decode()!r}")


def parse_request(raw: RawHeaders) -> Request:
    """The request's fields; raises `Malformed` with a message for a bad header list.

    Remembered as responses are (`_REQUESTS`, below): an agent sends the same header
    list call after call (its deadline too: grpc-core reuses the table entry of a
    recent timeout), and the HPACK decoder hands a block it has seen before back as
    the same tuple. A `Request` is shared and never changed; a malformed list is never
    remembered, so it raises every time.
    """
    found = _REQUESTS.get(raw)
    return found if found is not None else _remember(_REQUESTS, raw, _parse_request(raw))


def _parse_request(raw: RawHeaders) -> Request:
    pseudo: dict[bytes, bytes] = {}
    metadata: list[Header] = []
    regular = False
    content_type = timeout = encoding = accept = None
    for field in raw:
        name = field[0]
        if name[:1] == b":":
            if regular:
                raise Malformed("pseudo-header after a regular header")
            if name not in _REQUEST_PSEUDO or name in pseudo:
                raise Malformed(f"unexpected pseudo-header {name[:32]!r}")
            value = field[1]
            if name != b":path" and field not in _PSEUDO_OK:
                if not _value_ok(value):
                    raise Malformed(f"illegal value for {name.decode()}")
                if len(_PSEUDO_OK) >= _CACHE_ENTRIES:
                    _PSEUDO_OK.clear()
                _PSEUDO_OK.add(field)
            pseudo[name] = value
            continue
        regular = True
        header = _IN.get(field)  # metadata checked before (never a transport field)
        if header is not None:
            metadata.append(header)
            continue
        if name not in _TRANSPORT_NAMES:
            metadata.append(_regular(name, field[1]))
            continue
        value = field[1]
        if name == b"grpc-timeout":  # new on every call: checked by parse_timeout below
            timeout = value
            continue
        if field not in _TRANSPORT_OK:
            _check_transport(name, value)
            if name == b"te" and value != b"trailers":
                raise Malformed("te other than 'trailers'")
            if not name.endswith(b"-bin") and name not in _UNCACHED:
                if len(_TRANSPORT_OK) >= _CACHE_ENTRIES:
                    _TRANSPORT_OK.clear()
                _TRANSPORT_OK.add(field)
        if name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name == b"grpc-accept-encoding":
            accept = value
    if pseudo.get(b":method") != b"POST":
        raise Malformed("gRPC requires :method POST")
    path = pseudo.get(b":path")
    if not path:
        raise Malformed("missing :path")
    seconds = None
    if timeout is not None:
        seconds = parse_timeout(timeout.decode("latin-1"))
        if seconds is None:
            _check_transport(b"grpc-timeout", timeout)  # else not a timeout: none is set
    text = path.decode("utf-8", "replace")
    return Request(
        text,
        pseudo.get(b":authority", b"").decode("latin-1"),
        tuple(metadata),
        content_type or b"application/grpc",
        seconds,
        encoding,
        accept,
        forwardable_path(text),
    )


_forwardable = RememberedMatch(_FORWARDABLE_PATH_RE)


def forwardable_path(path: str) -> bool:
    """A path we would put on the wire upstream: printable ASCII, no spaces."""
    return _forwardable(path)


# Parsed request header lists, response header lists and trailers, by their fields: an
# agent sends the same request fields call after call, an upstream answers every call
# of a method with the same fields, and the HPACK decoder hands a block it has seen
# before back as the same tuple, so a hit is one probe matched by identity. The values
# are shared and never changed. Bounded in entries and in the size of what is kept
# (fields varied per call, a trace context or a delegation chain, would only churn it).
_REQUESTS: dict[RawHeaders, Request] = {}
_RESPONSES: dict[RawHeaders, Response] = {}
_TRAILERS: dict[RawHeaders, Response] = {}
_MEMO_ENTRIES = 256
_Parsed = TypeVar("_Parsed", Request, Response)
_MEMO_MAX_BYTES = 1024


def parse_response(raw: RawHeaders, *, trailers: bool) -> Response:
    """An upstream's response headers (`trailers=False`) or trailers."""
    memo = _TRAILERS if trailers else _RESPONSES
    found = memo.get(raw)
    return found if found is not None else _remember(memo, raw, _parse_response(raw, trailers))


def _remember(memo: dict[RawHeaders, _Parsed], raw: RawHeaders, parsed: _Parsed) -> _Parsed:
    """`parsed`, kept in `memo` under `raw` if the list is small enough (bounded)."""
    if sum(len(name) + len(value) for name, value in raw) <= _MEMO_MAX_BYTES:
        if len(memo) >= _MEMO_ENTRIES:
            memo.clear()
        memo[raw] = parsed
    return parsed


def _parse_response(raw: RawHeaders, trailers: bool) -> Response:
    status: int | None = None
    metadata: list[Header] = []
    grpc_status: int | None = None
    message = ""
    details = content_type = encoding = accept = None
    for field in raw:
        name, value = field
        if name[:1] == b":":
            if trailers or metadata or name != b":status" or status is not None:
                raise Malformed(f"unexpected pseudo-header {name[:32]!r} in a response")
            if not value.isdigit() or len(value) != 3:
                raise Malformed("bad :status")
            status = int(value)
            continue
        header = _IN.get(field)
        if header is not None:
            metadata.append(header)  # metadata checked before (never a transport field)
            continue
        if name not in _TRANSPORT_NAMES:
            metadata.append(_regular(name, value))
            continue
        _check_transport(name, value)
        if name == b"grpc-status":
            grpc_status = int(value) if value.isdigit() and len(value) <= 3 else Code.UNKNOWN.value
            continue
        if name == b"grpc-message":
            message = decode_message(value)
            continue
        if name == b"grpc-status-details-bin":
            # Kept as base64, whichever form it came in: it goes on as it is.
            details = base64.b64encode(value[1:]).rstrip(b"=") if value[:1] == b"\x00" else value
            continue
        if name == b"content-type":
            content_type = value
        elif name == b"grpc-encoding":
            encoding = value
        elif name == b"grpc-accept-encoding":
            accept = value
    if not trailers and status is None:
        raise Malformed("response without :status")
    return Response(
        status, tuple(metadata), grpc_status, message, details, content_type, encoding, accept
    )


def response_fields(resp: Response, metadata: Headers) -> list[tuple[bytes, bytes]]:
    """The response headers sent downstream for `resp`, with `metadata`."""
    fields = [
        (b":status", b"200"),
        (b"content-type", resp.content_type or b"application/grpc"),
    ]
    if resp.encoding is not None:
        fields.append((b"grpc-encoding", resp.encoding))
    if resp.accept_encoding is not None:
        fields.append((b"grpc-accept-encoding", resp.accept_encoding))
    fields += metadata_fields(metadata)
    return fields


def status_fields(
    code: Code, details: str, metadata: Headers = (), details_bin: bytes | None = None
) -> list[tuple[bytes, bytes]]:
    """A call's status as trailer fields."""
    fields = [(b"grpc-status", b"%d" % code.value)]
    if details:
        fields.append((b"grpc-message", encode_message(details)))
    fields += metadata_fields(metadata)
    if details_bin is not None:
        fields.append((b"grpc-status-details-bin", details_bin))
    return fields


def headers_out(resp: Response) -> tuple[tuple[bytes, bytes], ...]:
    """`response_fields` for `resp` with its own metadata, made once per `resp`."""
    out = resp.headers_fields
    if out is None:
        out = resp.headers_fields = tuple(response_fields(resp, resp.metadata))
    return out


def trailers_out(resp: Response) -> tuple[tuple[bytes, bytes], ...]:
    """`status_fields` for the trailers `resp` (after response headers) with its own
    status, message and metadata, made once per `resp`."""
    out = resp.trailers_fields
    if out is None:
        code = grpc_code(resp.grpc_status)
        fields = status_fields(code, resp.grpc_message, resp.metadata, resp.details_bin)
        out = resp.trailers_fields = tuple(fields)
    return out


_MISSING = (b"?", b"")  # compared by identity: not cached yet


def metadata_fields(headers: Headers) -> list[tuple[bytes, bytes]]:
    """Metadata as header fields. Names a peer could not have sent us are dropped."""
    out: list[tuple[bytes, bytes]] = []
    for header in headers:
        field = _OUT.get(header, _MISSING)
        if field is _MISSING:
            field = _field(header[0], header[1])
            if header[0] not in _UNCACHED_KEYS:
                if len(_OUT) >= _CACHE_ENTRIES:
                    _OUT.clear()
                _OUT[header] = field
        if field is not None:
            out.append(field)
    return out


_UNCACHED_KEYS = frozenset(k.decode() for k in _UNCACHED)


def _field(key: str, value: str | bytes) -> tuple[bytes, bytes] | None:
    name = key.encode("ascii", "replace")
    if not _NAME_RE.fullmatch(name) or name in _CONNECTION_SPECIFIC or name == b"te":
        return None
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return name, base64.b64encode(raw).rstrip(b"=")
    if isinstance(value, str):
        try:
            data = value.encode("latin-1")
        except UnicodeEncodeError:
            data = value.encode()
    else:
        data = value
    return (name, data) if _value_ok(data) else None


def parse_timeout(value: str) -> float | None:
    """Seconds from a grpc-timeout value; None when it is not one."""
    match = _TIMEOUT_RE.fullmatch(value)
    if match is None:
        return None
    return int(match.group(1)) * _UNIT[match.group(2)]


def format_timeout(seconds: float) -> str:
    """A grpc-timeout value (at most 8 digits) no shorter than `seconds`."""
    count = max(1, math.ceil(seconds / 1e-3))
    if count < 100_000_000:  # under ~27 hours: milliseconds (the loop's first answer)
        return f"{count}m"
    for unit, scale in (("m", 1e-3), ("S", 1.0), ("M", 60.0), ("H", 3600.0)):
        count = max(1, math.ceil(seconds / scale))
        if count < 100_000_000:
            return f"{count}{unit}"
    return "99999999H"


def encode_message(text: str) -> bytes:
    """grpc-message: UTF-8, percent-encoding every byte outside 0x20-0x7E and '%'."""
    out = bytearray()
    for byte in text.encode():
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def decode_message(value: bytes) -> str:
    if b"%" not in value:
        return value.decode("utf-8", "replace")
    out = bytearray()
    i = 0
    while i < len(value):
        if value[i] == 0x25 and _is_hex(value[i + 1 : i + 3]):
            out.append(int(value[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return out.decode("utf-8", "replace")


def _is_hex(pair: bytes) -> bool:
    return len(pair) == 2 and all(c in b"0123456789abcdefABCDEF" for c in pair)


_RESET_STATUS = {
    ErrorCode.REFUSED_STREAM: Code.UNAVAILABLE,
    ErrorCode.CANCEL: Code.CANCELLED,
    ErrorCode.ENHANCE_YOUR_CALM: Code.RESOURCE_EXHAUSTED,
    ErrorCode.INADEQUATE_SECURITY: Code.PERMISSION_DENIED,
}

_HTTP_STATUS = {
    400: Code.INTERNAL,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.UNIMPLEMENTED,
    429: Code.UNAVAILABLE,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.UNAVAILABLE,
}


def status_of_reset(code: int) -> Code:
    """The gRPC status a client reports for RST_STREAM(code) (PROTOCOL-HTTP2.md)."""
    for error, status in _RESET_STATUS.items():
        if error == code:
            return status
    return Code.INTERNAL


def status_of_http(status: int) -> Code:
    return _HTTP_STATUS.get(status, Code.UNKNOWN)


_CODES = {code.value: code for code in Code}


def grpc_code(value: int | None) -> Code:
    if value is None:
        return Code.UNKNOWN
    return _CODES.get(value, Code.UNKNOWN)
