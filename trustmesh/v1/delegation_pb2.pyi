from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DelegationChain(_message.Message):
    __slots__ = ("version", "hops")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HOPS_FIELD_NUMBER: _ClassVar[int]
    version: int
    hops: _containers.RepeatedCompositeFieldContainer[SignedHop]
    def __init__(self, version: _Optional[int] = ..., hops: _Optional[_Iterable[_Union[SignedHop, _Mapping]]] = ...) -> None: ...

class SignedHop(_message.Message):
    __slots__ = ("body", "signature")
    BODY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    body: bytes
    signature: bytes
    def __init__(self, body: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Hop(_message.Message):
    __slots__ = ("issuer", "audience", "method", "scopes", "issued_at_ms", "expires_at_ms", "nonce", "trace_id", "prev_digest", "cert_chain", "cert_ref", "origin")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    PREV_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    CERT_REF_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    audience: str
    method: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at_ms: int
    expires_at_ms: int
    nonce: bytes
    trace_id: bytes
    prev_digest: bytes
    cert_chain: CertChain
    cert_ref: int
    origin: Origin
    def __init__(self, issuer: _Optional[str] = ..., audience: _Optional[str] = ..., method: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at_ms: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., nonce: _Optional[bytes] = ..., trace_id: _Optional[bytes] = ..., prev_digest: _Optional[bytes] = ..., cert_chain: _Optional[_Union[CertChain, _Mapping]] = ..., cert_ref: _Optional[int] = ..., origin: _Optional[_Union[Origin, _Mapping]] = ...) -> None: ...

class CertChain(_message.Message):
    __slots__ = ("der",)
    DER_FIELD_NUMBER: _ClassVar[int]
    der: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, der: _Optional[_Iterable[bytes]] = ...) -> None: ...

class Origin(_message.Message):
    __slots__ = ("agent", "user")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    agent: AgentOrigin
    user: UserOrigin
    def __init__(self, agent: _Optional[_Union[AgentOrigin, _Mapping]] = ..., user: _Optional[_Union[UserOrigin, _Mapping]] = ...) -> None: ...

class AgentOrigin(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class UserOrigin(_message.Message):
    __slots__ = ("issuer", "subject", "claims")
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    claims: _containers.RepeatedCompositeFieldContainer[Claim]
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., claims: _Optional[_Iterable[_Union[Claim, _Mapping]]] = ...) -> None: ...

class Claim(_message.Message):
    __slots__ = ("name", "values")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    name: str
    values: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., values: _Optional[_Iterable[str]] = ...) -> None: ...
