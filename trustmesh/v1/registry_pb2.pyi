from trustmesh.v1 import resources_pb2 as _resources_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("token", "csr")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    token: str
    csr: bytes
    def __init__(self, token: _Optional[str] = ..., csr: _Optional[bytes] = ...) -> None: ...

class SvidResponse(_message.Message):
    __slots__ = ("cert_chain", "bundles", "registry_spiffe_id")
    CERT_CHAIN_FIELD_NUMBER: _ClassVar[int]
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    cert_chain: _containers.RepeatedScalarFieldContainer[bytes]
    bundles: _containers.RepeatedCompositeFieldContainer[_resources_pb2.TrustBundle]
    registry_spiffe_id: str
    def __init__(self, cert_chain: _Optional[_Iterable[bytes]] = ..., bundles: _Optional[_Iterable[_Union[_resources_pb2.TrustBundle, _Mapping]]] = ..., registry_spiffe_id: _Optional[str] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BundleResponse(_message.Message):
    __slots__ = ("bundles", "registry_spiffe_id")
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[_resources_pb2.TrustBundle]
    registry_spiffe_id: str
    def __init__(self, bundles: _Optional[_Iterable[_Union[_resources_pb2.TrustBundle, _Mapping]]] = ..., registry_spiffe_id: _Optional[str] = ...) -> None: ...

class ManifestDocument(_message.Message):
    __slots__ = ("source", "json")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    source: str
    json: str
    def __init__(self, source: _Optional[str] = ..., json: _Optional[str] = ...) -> None: ...

class ApplyRequest(_message.Message):
    __slots__ = ("documents", "dry_run")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[ManifestDocument]
    dry_run: bool
    def __init__(self, documents: _Optional[_Iterable[_Union[ManifestDocument, _Mapping]]] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class ApplyResponse(_message.Message):
    __slots__ = ("applied", "revision")
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    applied: _containers.RepeatedScalarFieldContainer[str]
    revision: int
    def __init__(self, applied: _Optional[_Iterable[str]] = ..., revision: _Optional[int] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, json: _Optional[_Iterable[str]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("kind", "name")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: str
    name: str
    def __init__(self, kind: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class CreateJoinTokenRequest(_message.Message):
    __slots__ = ("spiffe_id", "ttl_seconds", "uses")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    USES_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    ttl_seconds: int
    uses: int
    def __init__(self, spiffe_id: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., uses: _Optional[int] = ...) -> None: ...

class CreateJoinTokenResponse(_message.Message):
    __slots__ = ("token", "expires_at")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    token: str
    expires_at: int
    def __init__(self, token: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SetAgentStateRequest(_message.Message):
    __slots__ = ("agent", "disabled", "reason")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    DISABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent: str
    disabled: bool
    reason: str
    def __init__(self, agent: _Optional[str] = ..., disabled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetAgentStateResponse(_message.Message):
    __slots__ = ("revision",)
    REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    def __init__(self, revision: _Optional[int] = ...) -> None: ...

class RenewSvidRequest(_message.Message):
    __slots__ = ("csr",)
    CSR_FIELD_NUMBER: _ClassVar[int]
    csr: bytes
    def __init__(self, csr: _Optional[bytes] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("instance_id", "inbound_address", "epoch", "revision")
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    INBOUND_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    inbound_address: str
    epoch: str
    revision: int
    def __init__(self, instance_id: _Optional[str] = ..., inbound_address: _Optional[str] = ..., epoch: _Optional[str] = ..., revision: _Optional[int] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("put_agent", "delete_agent", "put_blueprint", "delete_blueprint", "put_policy", "delete_policy", "put_endpoint", "delete_endpoint", "put_bundle", "put_delegation_policy", "delete_delegation_policy")
    PUT_AGENT_FIELD_NUMBER: _ClassVar[int]
    DELETE_AGENT_FIELD_NUMBER: _ClassVar[int]
    PUT_BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    DELETE_BLUEPRINT_FIELD_NUMBER: _ClassVar[int]
    PUT_POLICY_FIELD_NUMBER: _ClassVar[int]
    DELETE_POLICY_FIELD_NUMBER: _ClassVar[int]
    PUT_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DELETE_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    PUT_BUNDLE_FIELD_NUMBER: _ClassVar[int]
    PUT_DELEGATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    DELETE_DELEGATION_POLICY_FIELD_NUMBER: _ClassVar[int]
    put_agent: _resources_pb2.Agent
    delete_agent: str
    put_blueprint: _resources_pb2.AgentBlueprint
    delete_blueprint: str
    put_policy: _resources_pb2.AccessPolicy
    delete_policy: str
    put_endpoint: _resources_pb2.Endpoint
    delete_endpoint: _resources_pb2.Endpoint
    put_bundle: _resources_pb2.TrustBundle
    put_delegation_policy: _resources_pb2.DelegationPolicy
    delete_delegation_policy: str
    def __init__(self, put_agent: _Optional[_Union[_resources_pb2.Agent, _Mapping]] = ..., delete_agent: _Optional[str] = ..., put_blueprint: _Optional[_Union[_resources_pb2.AgentBlueprint, _Mapping]] = ..., delete_blueprint: _Optional[str] = ..., put_policy: _Optional[_Union[_resources_pb2.AccessPolicy, _Mapping]] = ..., delete_policy: _Optional[str] = ..., put_endpoint: _Optional[_Union[_resources_pb2.Endpoint, _Mapping]] = ..., delete_endpoint: _Optional[_Union[_resources_pb2.Endpoint, _Mapping]] = ..., put_bundle: _Optional[_Union[_resources_pb2.TrustBundle, _Mapping]] = ..., put_delegation_policy: _Optional[_Union[_resources_pb2.DelegationPolicy, _Mapping]] = ..., delete_delegation_policy: _Optional[str] = ...) -> None: ...

class SnapshotUpdate(_message.Message):
    __slots__ = ("epoch", "revision", "base_revision", "full", "changes")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    BASE_REVISION_FIELD_NUMBER: _ClassVar[int]
    FULL_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    epoch: str
    revision: int
    base_revision: int
    full: bool
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, epoch: _Optional[str] = ..., revision: _Optional[int] = ..., base_revision: _Optional[int] = ..., full: _Optional[bool] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...
