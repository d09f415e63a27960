"""Resources to protobuf (`trustmesh.v1.resources_pb2`) and back.

The registry turns resources into messages (`*_to_pb`); the sidecar turns them back
(`*_from_pb`) through the same validating constructors, so that a malformed record
raises `InvalidResourceError` / `InvalidSpiffeIdError` instead of entering a snapshot.

On the wire an agent carries its *effective* attributes (blueprint defaults overlaid
by its own), `expires_at` in Unix seconds with 0 for "never", and its operator state.
A state other than ACTIVE (including an unset one) reads as disabled: fail closed.
A DelegationPolicy's `max_depth` 0 means "not set", as does an empty user `subject`.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Hashable
from datetime import UTC, datetime
from typing import TypeVar

from trustmesh.delegation_policy import DelegationPolicy, PathElement, PathWildcard, UserMatch
from trustmesh.resources import (
    EMPTY_ATTRIBUTES,
    AccessPolicy,
    Agent,
    AgentBlueprint,
    AgentState,
    AgentView,
    Attributes,
    InvalidResourceError,
    MethodPattern,
    Selector,
    SelectorKind,
)
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import resources_pb2 as pb

__all__ = [
    "agent_from_pb",
    "agent_to_pb",
    "blueprint_from_pb",
    "blueprint_to_pb",
    "delegation_policy_from_pb",
    "delegation_policy_to_pb",
    "expires_to_pb",
    "policy_from_pb",
    "policy_to_pb",
    "selector_from_pb",
    "selector_to_pb",
]

# Decoding many records with one `pool` (a snapshot update does) makes equal
# attribute sets and method patterns one object each, and names are interned: the
# records of a 100,000-agent snapshot then share their small parts, so a decision
# touches less memory and a lookup compares by identity.
Pool = dict[Hashable, Hashable]
_H = TypeVar("_H", bound=Hashable)


def _share(pool: Pool | None, value: _H) -> _H:
    if pool is None:
        return value
    return pool.setdefault(value, value)  # type: ignore[return-value]


def expires_to_pb(expires_at: datetime | None) -> int:
    """Unix seconds, rounded down (an expiry never moves later); 0 for "never"."""
    return 0 if expires_at is None else math.floor(expires_at.timestamp())


def _expires_from_pb(seconds: int) -> datetime | None:
    if seconds == 0:
        return None
    try:
        if seconds < 0:
            raise ValueError("negative")
        return datetime.fromtimestamp(seconds, tz=UTC)
    except (ValueError, OverflowError, OSError) as e:
        raise InvalidResourceError("expires_at", f"{seconds} is not a valid time") from e


def agent_to_pb(
    agent: Agent, blueprint: AgentBlueprint | None, *, disabled: bool, disabled_reason: str
) -> pb.Agent:
    """The published record: effective attributes and operator state included."""
    defaults = blueprint.default_attributes if blueprint is not None else EMPTY_ATTRIBUTES
    return pb.Agent(
        name=agent.name,
        spiffe_id=str(agent.spiffe_id),
        blueprint=agent.blueprint,
        sponsor=agent.sponsor,
        owners=list(agent.owners),
        attributes=defaults.overlay(agent.attributes).to_dict(),
        expires_at=expires_to_pb(agent.expires_at),
        state=pb.AGENT_STATE_DISABLED if disabled else pb.AGENT_STATE_ACTIVE,
        disabled_reason=disabled_reason if disabled else "",
    )


def agent_from_pb(msg: pb.Agent, pool: Pool | None = None) -> AgentView:
    if msg.state == pb.AGENT_STATE_ACTIVE:
        state, reason = AgentState.ACTIVE, ""
    else:
        state = AgentState.DISABLED
        reason = msg.disabled_reason or (
            "" if msg.state == pb.AGENT_STATE_DISABLED else "the registry sent no state"
        )
    return AgentView(
        name=sys.intern(msg.name),
        spiffe_id=SpiffeId.parse(msg.spiffe_id),
        blueprint=sys.intern(msg.blueprint),
        sponsor=msg.sponsor,
        owners=tuple(msg.owners),
        attributes=_share(pool, Attributes(dict(msg.attributes))),
        expires_at=_expires_from_pb(msg.expires_at),
        state=state,
        disabled_reason=reason,
    )


def blueprint_to_pb(blueprint: AgentBlueprint) -> pb.AgentBlueprint:
    return pb.AgentBlueprint(
        name=blueprint.name,
        description=blueprint.description,
        default_attributes=blueprint.default_attributes.to_dict(),
        allowed_methods=[str(m) for m in blueprint.allowed_methods],
    )


def blueprint_from_pb(msg: pb.AgentBlueprint) -> AgentBlueprint:
    return AgentBlueprint(
        name=msg.name,
        allowed_methods=tuple(MethodPattern.parse(m) for m in msg.allowed_methods),
        description=msg.description,
        default_attributes=Attributes(dict(msg.default_attributes)),
    )


def selector_to_pb(selector: Selector) -> pb.Selector:
    value = selector.value
    if isinstance(value, Attributes):
        return pb.Selector(attributes=pb.AttributeMatch(match=value.to_dict()))
    if isinstance(value, SpiffeId):
        return pb.Selector(spiffe_id=str(value))
    if selector.kind is SelectorKind.NAME:
        return pb.Selector(name=value)
    return pb.Selector(blueprint=value)


def selector_from_pb(msg: pb.Selector, pool: Pool | None = None) -> Selector:
    which = msg.WhichOneof("by")
    if which == "spiffe_id":
        return Selector(SelectorKind.SPIFFE_ID, SpiffeId.parse(msg.spiffe_id))
    if which == "name":
        return Selector(SelectorKind.NAME, sys.intern(msg.name))
    if which == "blueprint":
        return _share(pool, Selector(SelectorKind.BLUEPRINT, sys.intern(msg.blueprint)))
    if which == "attributes":
        match = _share(pool, Attributes(dict(msg.attributes.match)))
        return _share(pool, Selector(SelectorKind.ATTRIBUTES, match))
    raise InvalidResourceError("selector", "no selector field is set")


def policy_to_pb(policy: AccessPolicy) -> pb.AccessPolicy:
    return pb.AccessPolicy(
        name=policy.name,
        callers=[selector_to_pb(s) for s in policy.callers],
        callees=[selector_to_pb(s) for s in policy.callees],
        methods=[str(m) for m in policy.methods],
    )


def policy_from_pb(msg: pb.AccessPolicy, pool: Pool | None = None) -> AccessPolicy:
    return AccessPolicy(
        name=sys.intern(msg.name),
        callers=tuple(selector_from_pb(s, pool) for s in msg.callers),
        callees=tuple(selector_from_pb(s, pool) for s in msg.callees),
        methods=_share(pool, tuple(_share(pool, MethodPattern.parse(m)) for m in msg.methods)),
    )


_WILDCARDS = {
    PathWildcard.ONE: pb.PATH_WILDCARD_ONE,
    PathWildcard.ANY: pb.PATH_WILDCARD_ANY,
}


def delegation_policy_to_pb(policy: DelegationPolicy) -> pb.DelegationPolicy:
    msg = pb.DelegationPolicy(
        name=policy.name,
        callees=[selector_to_pb(s) for s in policy.callees],
        max_depth=policy.max_depth or 0,
        required_scopes=list(policy.required_scopes),
        require_user_origin=policy.require_user_origin,
    )
    for origin in policy.allowed_origins:
        if isinstance(origin, UserMatch):
            msg.allowed_origins.add(
                user=pb.UserMatch(
                    issuer=origin.issuer, subject=origin.subject or "", claims=dict(origin.claims)
                )
            )
        else:
            msg.allowed_origins.add(agent=selector_to_pb(origin))
    for path in policy.allowed_paths:
        elements = msg.allowed_paths.add().elements
        for e in path:
            if isinstance(e, PathWildcard):
                elements.add(wildcard=_WILDCARDS[e])
            else:
                elements.add(agent=selector_to_pb(e))
    return msg


def _path_element_from_pb(msg: pb.PathElement) -> PathElement:
    which = msg.WhichOneof("by")
    if which == "agent":
        return selector_from_pb(msg.agent)
    if which == "wildcard":
        for wildcard, value in _WILDCARDS.items():
            if msg.wildcard == value:
                return wildcard
        raise InvalidResourceError("path element", f"unknown wildcard {msg.wildcard}")
    raise InvalidResourceError("path element", "no path element field is set")


def delegation_policy_from_pb(msg: pb.DelegationPolicy) -> DelegationPolicy:
    origins: list[Selector | UserMatch] = []
    for o in msg.allowed_origins:
        which = o.WhichOneof("by")
        if which == "agent":
            origins.append(selector_from_pb(o.agent))
        elif which == "user":
            origins.append(
                UserMatch(
                    issuer=o.user.issuer,
                    subject=o.user.subject or None,
                    claims=tuple(sorted(o.user.claims.items())),
                )
            )
        else:
            raise InvalidResourceError("allowed_origins", "no origin field is set")
    return DelegationPolicy(
        name=msg.name,
        callees=tuple(selector_from_pb(s) for s in msg.callees),
        allowed_origins=tuple(origins),
        allowed_paths=tuple(
            tuple(_path_element_from_pb(e) for e in p.elements) for p in msg.allowed_paths
        ),
        max_depth=msg.max_depth or None,
        required_scopes=tuple(msg.required_scopes),
        require_user_origin=msg.require_user_origin,
    )
