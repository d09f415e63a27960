from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("spiffe_id", "svid_serial", "svid_expires_at", "snapshot_epoch", "snapshot_revision", "registry_connected", "inbound_address", "outbound_address", "calls_allowed", "calls_denied")
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    SVID_SERIAL_FIELD_NUMBER: _ClassVar[int]
    SVID_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_REVISION_FIELD_NUMBER: _ClassVar[int]
    REGISTRY_CONNECTED_FIELD_NUMBER: _ClassVar[int]
    INBOUND_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    OUTBOUND_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CALLS_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    CALLS_DENIED_FIELD_NUMBER: _ClassVar[int]
    spiffe_id: str
    svid_serial: str
    svid_expires_at: int
    snapshot_epoch: str
    snapshot_revision: int
    registry_connected: bool
    inbound_address: str
    outbound_address: str
    calls_allowed: int
    calls_denied: int
    def __init__(self, spiffe_id: _Optional[str] = ..., svid_serial: _Optional[str] = ..., svid_expires_at: _Optional[int] = ..., snapshot_epoch: _Optional[str] = ..., snapshot_revision: _Optional[int] = ..., registry_connected: _Optional[bool] = ..., inbound_address: _Optional[str] = ..., outbound_address: _Optional[str] = ..., calls_allowed: _Optional[int] = ..., calls_denied: _Optional[int] = ...) -> None: ...
