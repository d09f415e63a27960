from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AgentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGENT_STATE_UNSPECIFIED: _ClassVar[AgentState]
    AGENT_STATE_ACTIVE: _ClassVar[AgentState]
    AGENT_STATE_DISABLED: _ClassVar[AgentState]

class PathWildcard(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PATH_WILDCARD_UNSPECIFIED: _ClassVar[PathWildcard]
    PATH_WILDCARD_ONE: _ClassVar[PathWildcard]
    PATH_WILDCARD_ANY: _ClassVar[PathWildcard]
AGENT_STATE_UNSPECIFIED: AgentState
AGENT_STATE_ACTIVE: AgentState
AGENT_STATE_DISABLED: AgentState
PATH_WILDCARD_UNSPECIFIED: PathWildcard
PATH_WILDCARD_ONE: PathWildcard
PATH_WILDCARD_ANY: PathWildcard

class Selector(_message.Message):
    __slots__ = ("spiffe_id", "name", "blueprint", "attributes")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    name: str
    blueprint: str
    attributes: AttributeMatch
    def __init__(self, spiffe_id: _Optional[str] = ..., name: _Optional[str] = ..., blueprint: _Optional[str] = ..., attributes: _Optional[_Union[AttributeMatch, _Mapping]] = ...) -> None: ...

class AttributeMatch(_message.Message):
    __slots__ = ("match",)
    class MatchEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MATCH_FIELD_NUMBER: _ClassVar[int]
    match: _containers.ScalarMap[str, str]
    def __init__(self, match: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Agent(_message.Message):
    __slots__ = ("name", "spiffe_id", "blueprint", "sponsor", "owners", "attributes", "expires_at", "state", "disabled_reason")
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    SPONSOR_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DISABLED_REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    spiffe_id: str
    blueprint: str
    sponsor: str
    owners: _containers.RepeatedScalarFieldContainer[str]
    attributes: _containers.ScalarMap[str, str]
    expires_at: int
    state: AgentState
    disabled_reason: str
    def __init__(self, name: _Optional[str] = ..., spiffe_id: _Optional[str] = ..., blueprint: _Optional[str] = ..., sponsor: _Optional[str] = ..., owners: _Optional[_Iterable[str]] = ..., attributes: _Optional[_Mapping[str, str]] = ..., expires_at: _Optional[int] = ..., state: _Optional[_Union[AgentState, str]] = ..., disabled_reason: _Optional[str] = ...) -> None: ...

class AgentBlueprint(_message.Message):
    __slots__ = ("name", "description", "default_attributes", "allowed_methods")
    class DefaultAttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_METHODS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    default_attributes: _containers.ScalarMap[str, str]
    allowed_methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., default_attributes: _Optional[_Mapping[str, str]] = ..., allowed_methods: _Optional[_Iterable[str]] = ...) -> None: ...

class AccessPolicy(_message.Message):
    __slots__ = ("name", "callers", "callees", "methods")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALLERS_FIELD_NUMBER: _ClassVar[int]
    CALLEES_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    name: str
    callers: _containers.RepeatedCompositeFieldContainer[Selector]
    callees: _containers.RepeatedCompositeFieldContainer[Selector]
    methods: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., callers: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., callees: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., methods: _Optional[_Iterable[str]] = ...) -> None: ...

class DelegationPolicy(_message.Message):
    __slots__ = ("name", "callees", "allowed_origins", "allowed_paths", "max_depth", "required_scopes", "require_user_origin")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CALLEES_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_ORIGINS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_PATHS_FIELD_NUMBER: _ClassVar[int]
    MAX_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_SCOPES_FIELD_NUMBER: _ClassVar[int]
    REQUIRE_USER_ORIGIN_FIELD_NUMBER: _ClassVar[int]
    name: str
    callees: _containers.RepeatedCompositeFieldContainer[Selector]
    allowed_origins: _containers.RepeatedCompositeFieldContainer[OriginMatch]
    allowed_paths: _containers.RepeatedCompositeFieldContainer[DelegationPath]
    max_depth: int
    required_scopes: _containers.RepeatedScalarFieldContainer[str]
    require_user_origin: bool
    def __init__(self, name: _Optional[str] = ..., callees: _Optional[_Iterable[_Union[Selector, _Mapping]]] = ..., allowed_origins: _Optional[_Iterable[_Union[OriginMatch, _Mapping]]] = ..., allowed_paths: _Optional[_Iterable[_Union[DelegationPath, _Mapping]]] = ..., max_depth: _Optional[int] = ..., required_scopes: _Optional[_Iterable[str]] = ..., require_user_origin: _Optional[bool] = ...) -> None: ...

class OriginMatch(_message.Message):
    __slots__ = ("agent", "user")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    agent: Selector
    user: UserMatch
    def __init__(self, agent: _Optional[_Union[Selector, _Mapping]] = ..., user: _Optional[_Union[UserMatch, _Mapping]] = ...) -> None: ...

class UserMatch(_message.Message):
    __slots__ = ("issuer", "subject", "claims")
    class ClaimsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ISSUER_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CLAIMS_FIELD_NUMBER: _ClassVar[int]
    issuer: str
    subject: str
    claims: _containers.ScalarMap[str, str]
    def __init__(self, issuer: _Optional[str] = ..., subject: _Optional[str] = ..., claims: _Optional[_Mapping[str, str]] = ...) -> None: ...

class DelegationPath(_message.Message):
    __slots__ = ("elements",)
    ELEMENTS_FIELD_NUMBER: _ClassVar[int]
    elements: _containers.RepeatedCompositeFieldContainer[PathElement]
    def __init__(self, elements: _Optional[_Iterable[_Union[PathElement, _Mapping]]] = ...) -> None: ...

class PathElement(_message.Message):
    __slots__ = ("agent", "wildcard")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    WILDCARD_FIELD_NUMBER: _ClassVar[int]
    agent: Selector
    wildcard: PathWildcard
    def __init__(self, agent: _Optional[_Union[Selector, _Mapping]] = ..., wildcard: _Optional[_Union[PathWildcard, str]] = ...) -> None: ...

class Endpoint(_message.Message):
    __slots__ = ("spiffe_id", "instance_id", "address")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    instance_id: str
    address: str
    def __init__(self, spiffe_id: _Optional[str] = ..., instance_id: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class TrustBundle(_message.Message):
    __slots__ = ("trust_domain", "x509_authorities")
    TRUST_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    X509_AUTHORITIES_FIELD_NUMBER: _ClassVar[int]
    trust_domain: str
    x509_authorities: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, trust_domain: _Optional[str] = ..., x509_authorities: _Optional[_Iterable[bytes]] = ...) -> None: ...
