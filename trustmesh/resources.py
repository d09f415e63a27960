"""Typed resource models (`apiVersion: trustmesh.dev/v1alpha1`) that can't be built invalid.

Three kinds come from operators' YAML: `AgentBlueprint`, `Agent` and `AccessPolicy`.
A fourth, `DelegationPolicy`, lives in `trustmesh.delegation_policy` (it builds on the
`Selector` defined here); `Kind` names all four.
`AgentView` is what a sidecar knows about an agent: the registry's record, with the
effective attributes (blueprint defaults overlaid by the agent's own) and the
operator state, which is never part of the YAML.

Invariants:
* Every constructor validates; a bad value raises `InvalidResourceError`, whose
  `field` is the YAML path (`spec.sponsor`) or, for parts such as `Selector` and
  `MethodPattern`, the path inside the part. `trustmesh.manifest` prefixes it with
  the document's source.
* Values are frozen and hashable; mappings are `Attributes`, lists are tuples.
* An empty selector list or an empty `attributes` selector is rejected: a rule that
  matches everyone must be written as such, never happen by omission.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import ClassVar

from trustmesh.errors import ConfigError
from trustmesh.spiffe_id import SpiffeId

__all__ = [
    "API_VERSION",
    "EMPTY_ATTRIBUTES",
    "AccessPolicy",
    "Agent",
    "AgentBlueprint",
    "AgentState",
    "AgentView",
    "Attributes",
    "InvalidResourceError",
    "Kind",
    "MethodPattern",
    "Resource",
    "Selector",
    "SelectorKind",
    "check_name",
    "is_grpc_method",
]

API_VERSION = "trustmesh.dev/v1alpha1"
MAX_NAME_LEN = 253
MAX_VALUE_LEN = 253

_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?")
_ATTR_KEY_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_./]*[A-Za-z0-9])?")
_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_SERVICE_RE = re.compile(rf"{_IDENT}(\.{_IDENT})*")
_METHOD_NAME_RE = re.compile(_IDENT)
_GRPC_METHOD_RE = re.compile(rf"/({_IDENT}(?:\.{_IDENT})*)/({_IDENT})")
_PATTERN_HELP = "expected '/package.Service/Method', '/package.Service/*' or '*'"


class InvalidResourceError(ConfigError, ValueError):
    """A resource value is wrong; `field` says where (relative to the value being built)."""

    reason = "invalid_resource"

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}" if field else problem)
        self.field = field
        self.problem = problem


class Kind(enum.StrEnum):
    AGENT_BLUEPRINT = "AgentBlueprint"
    AGENT = "Agent"
    ACCESS_POLICY = "AccessPolicy"
    DELEGATION_POLICY = "DelegationPolicy"


def check_name(value: object, field: str = "metadata.name") -> str:
    """A DNS-label-ish resource name; returns it, or raises naming `field`."""
    if not isinstance(value, str):
        raise InvalidResourceError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise InvalidResourceError(field, "must not be empty")
    if len(value) > MAX_NAME_LEN:
        raise InvalidResourceError(field, f"{value[:64]!r}... is longer than {MAX_NAME_LEN}")
    if not _NAME_RE.fullmatch(value):
        raise InvalidResourceError(
            field,
            f"invalid name {value!r}: use lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
        )
    return value


def _check_text(value: object, field: str, *, required: bool) -> str:
    if not isinstance(value, str):
        raise InvalidResourceError(field, f"must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise InvalidResourceError(field, "is required and must not be empty")
    if len(value) > MAX_VALUE_LEN:
        raise InvalidResourceError(field, f"{value[:64]!r}... is longer than {MAX_VALUE_LEN}")
    if not value.isprintable():
        raise InvalidResourceError(field, f"{value!r} contains control characters")
    return value


class RememberedMatch:
    """Whether `pattern` matches all of a text, remembered per text: a sidecar checks
    the same few method paths on every call. Bounded (emptied when full), and texts
    longer than `max_len` are not remembered (callers choose them)."""

    __slots__ = ("_answers", "_max_entries", "_max_len", "_pattern")

    def __init__(
        self, pattern: re.Pattern[str], *, max_entries: int = 1024, max_len: int = 256
    ) -> None:
        self._pattern = pattern
        self._answers: dict[str, bool] = {}
        self._max_entries = max_entries
        self._max_len = max_len

    def __call__(self, text: str) -> bool:
        known = self._answers.get(text)
        if known is None:
            known = self._pattern.fullmatch(text) is not None
            if len(text) <= self._max_len:
                if len(self._answers) >= self._max_entries:
                    self._answers.clear()
                self._answers[text] = known
        return known


_is_grpc_method = RememberedMatch(_GRPC_METHOD_RE)


def is_grpc_method(method: str) -> bool:
    """True for a well-formed gRPC path, `/package.Service/Method`."""
    return _is_grpc_method(method)


class Attributes(Mapping[str, str]):
    """An immutable, hashable str -> str mapping with validated keys and values."""

    __slots__ = ("_data", "_hash")

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()):
        data = dict(items)
        for key, value in data.items():
            if not isinstance(key, str) or not _ATTR_KEY_RE.fullmatch(key) or len(key) > 253:
                raise InvalidResourceError(
                    "", f"invalid attribute key {key!r}: use letters, digits, '-', '_', '.', '/'"
                )
            _check_text(value, key, required=False)
        self._data = data
        self._hash = hash(frozenset(data.items()))

    def __getitem__(self, key: str) -> str:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attributes):
            return self._data == other._data
        return NotImplemented

    def __repr__(self) -> str:
        return f"Attributes({self._data!r})"

    def overlay(self, top: Attributes) -> Attributes:
        """These attributes with `top`'s keys replacing or adding to them."""
        return Attributes({**self._data, **top._data})

    def within(self, other: Mapping[str, str]) -> bool:
        """True when every key of this mapping is in `other` with the same value."""
        return all(other.get(k) == v for k, v in self._data.items())

    def to_dict(self) -> dict[str, str]:
        return dict(self._data)


EMPTY_ATTRIBUTES = Attributes()


@dataclass(frozen=True, slots=True)
class MethodPattern:
    """`/pkg.Service/Method`, `/pkg.Service/*` (service=..., method=None) or `*` (both None)."""

    service: str | None
    method: str | None

    def __post_init__(self) -> None:
        if self.service is None and self.method is not None:
            raise InvalidResourceError("", f"method {self.method!r} needs a service")
        if self.service is not None and not _SERVICE_RE.fullmatch(self.service):
            raise InvalidResourceError("", f"invalid service name {self.service!r}")
        if self.method is not None and not _METHOD_NAME_RE.fullmatch(self.method):
            raise InvalidResourceError("", f"invalid method name {self.method!r}")

    @classmethod
    def parse(cls, text: object) -> MethodPattern:
        if not isinstance(text, str):
            raise InvalidResourceError(
                "", f"invalid method pattern {text!r}: must be a string; {_PATTERN_HELP}"
            )
        if text == "*":
            return cls(None, None)
        if text.startswith("/") and text.count("/") == 2:
            service, method = text[1:].split("/")
            if _SERVICE_RE.fullmatch(service):
                if method == "*":
                    return cls(service, None)
                if _METHOD_NAME_RE.fullmatch(method):
                    return cls(service, method)
        raise InvalidResourceError("", f"invalid method pattern {text!r}: {_PATTERN_HELP}")

    def matches(self, method: str) -> bool:
        """True when the gRPC path `method` is well formed and within this pattern."""
        if self.service is None:
            return is_grpc_method(method)
        if self.method is not None:
            return method == f"/{self.service}/{self.method}"
        prefix = f"/{self.service}/"
        return method.startswith(prefix) and bool(_METHOD_NAME_RE.fullmatch(method, len(prefix)))

    def __str__(self) -> str:
        if self.service is None:
            return "*"
        return f"/{self.service}/{self.method or '*'}"


class SelectorKind(enum.StrEnum):
    """The YAML key of each selector form."""

    SPIFFE_ID = "spiffeId"
    NAME = "name"
    BLUEPRINT = "blueprint"
    ATTRIBUTES = "attributes"


@dataclass(frozen=True, slots=True)
class Selector:
    """Selects agents by one of: SPIFFE ID, agent name, blueprint name, or attributes."""

    kind: SelectorKind
    value: SpiffeId | str | Attributes

    def __post_init__(self) -> None:
        field_ = str(self.kind)
        if self.kind is SelectorKind.SPIFFE_ID:
            if not isinstance(self.value, SpiffeId):
                raise InvalidResourceError(field_, "must be a SpiffeId")
        elif self.kind is SelectorKind.ATTRIBUTES:
            if not isinstance(self.value, Attributes):
                raise InvalidResourceError(field_, "must be Attributes")
            if not self.value:
                raise InvalidResourceError(
                    field_, "must list at least one attribute (an empty match would select all)"
                )
        else:
            check_name(self.value, field_)

    def matches(self, agent: AgentView) -> bool:
        if self.kind is SelectorKind.SPIFFE_ID:
            return self.value == agent.spiffe_id
        if self.kind is SelectorKind.NAME:
            return self.value == agent.name
        if self.kind is SelectorKind.BLUEPRINT:
            return self.value == agent.blueprint
        assert isinstance(self.value, Attributes)
        return self.value.within(agent.attributes)


def _methods(patterns: tuple[MethodPattern, ...], field_: str) -> None:
    if not isinstance(patterns, tuple) or not patterns:
        raise InvalidResourceError(field_, "must list at least one method pattern")
    for i, p in enumerate(patterns):
        if not isinstance(p, MethodPattern):
            raise InvalidResourceError(f"{field_}[{i}]", "must be a MethodPattern")


def _attributes(value: object, field_: str) -> None:
    if not isinstance(value, Attributes):
        raise InvalidResourceError(field_, "must be Attributes")


@dataclass(frozen=True, slots=True)
class AgentBlueprint:
    kind: ClassVar[Kind] = Kind.AGENT_BLUEPRINT

    name: str
    allowed_methods: tuple[MethodPattern, ...]
    description: str = ""
    default_attributes: Attributes = field(default=EMPTY_ATTRIBUTES)

    def __post_init__(self) -> None:
        check_name(self.name)
        _methods(self.allowed_methods, "spec.allowedMethods")
        if not isinstance(self.description, str):
            raise InvalidResourceError("spec.description", "must be a string")
        _attributes(self.default_attributes, "spec.defaultAttributes")

    def allows_method(self, method: str) -> bool:
        return any(p.matches(method) for p in self.allowed_methods)


def _check_expiry(value: datetime | None, field_: str) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime) or value.utcoffset() is None:
        raise InvalidResourceError(field_, "must be a datetime with a timezone")
    # 0 means "never" on the wire, so an expiry must lie after it.
    if value.timestamp() < 1:
        raise InvalidResourceError(field_, "must be after 1970-01-01T00:00:01Z")
    return value


@dataclass(frozen=True, slots=True)
class Agent:
    """An agent as an operator declares it; `attributes` are the agent's own."""

    kind: ClassVar[Kind] = Kind.AGENT

    name: str
    spiffe_id: SpiffeId
    blueprint: str
    sponsor: str
    owners: tuple[str, ...] = ()
    attributes: Attributes = field(default=EMPTY_ATTRIBUTES)
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.spiffe_id, SpiffeId):
            raise InvalidResourceError("spec.spiffeId", "must be a SpiffeId")
        check_name(self.blueprint, "spec.blueprint")
        _check_text(self.sponsor, "spec.sponsor", required=True)
        if not isinstance(self.owners, tuple):
            raise InvalidResourceError("spec.owners", "must be a tuple of strings")
        for i, owner in enumerate(self.owners):
            _check_text(owner, f"spec.owners[{i}]", required=True)
        _attributes(self.attributes, "spec.attributes")
        _check_expiry(self.expires_at, "spec.expiresAt")


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """Callers matching any of `callers` may call callees matching any of `callees`."""

    kind: ClassVar[Kind] = Kind.ACCESS_POLICY

    name: str
    callers: tuple[Selector, ...]
    callees: tuple[Selector, ...]
    methods: tuple[MethodPattern, ...]

    def __post_init__(self) -> None:
        check_name(self.name)
        for field_, selectors in (("spec.callers", self.callers), ("spec.callees", self.callees)):
            if not isinstance(selectors, tuple) or not selectors:
                raise InvalidResourceError(field_, "must list at least one selector")
            for i, s in enumerate(selectors):
                if not isinstance(s, Selector):
                    raise InvalidResourceError(f"{field_}[{i}]", "must be a Selector")
        _methods(self.methods, "spec.methods")

    def allows(self, caller: AgentView, callee: AgentView, method: str) -> bool:
        return (
            any(s.matches(caller) for s in self.callers)
            and any(s.matches(callee) for s in self.callees)
            and self.allows_method(method)
        )

    def allows_method(self, method: str) -> bool:
        return any(p.matches(method) for p in self.methods)


# The kinds defined in this module. `trustmesh.manifest.AnyResource` adds
# `DelegationPolicy`.
Resource = AgentBlueprint | Agent | AccessPolicy


class AgentState(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class AgentView:
    """A registered agent as the registry publishes it (effective attributes, state)."""

    name: str
    spiffe_id: SpiffeId
    blueprint: str
    sponsor: str
    owners: tuple[str, ...] = ()
    attributes: Attributes = field(default=EMPTY_ATTRIBUTES)
    expires_at: datetime | None = None
    state: AgentState = AgentState.ACTIVE
    disabled_reason: str = ""

    def __post_init__(self) -> None:
        check_name(self.name)
        if not isinstance(self.spiffe_id, SpiffeId):
            raise InvalidResourceError("spec.spiffeId", "must be a SpiffeId")
        check_name(self.blueprint, "spec.blueprint")
        _attributes(self.attributes, "spec.attributes")
        _check_expiry(self.expires_at, "spec.expiresAt")
        if not isinstance(self.state, AgentState):
            raise InvalidResourceError("state", "must be an AgentState")

    @property
    def disabled(self) -> bool:
        return self.state is AgentState.DISABLED

    def expired(self, now: datetime) -> bool:
        """True once `now` reaches `expires_at`; `now` must carry a timezone."""
        return self.expires_at is not None and now >= self.expires_at
