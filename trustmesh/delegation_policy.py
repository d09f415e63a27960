"""The `DelegationPolicy` resource, its document form, and what it allows.

```yaml
apiVersion: trustmesh.dev/v1alpha1
kind: DelegationPolicy
metadata: {name: tools-via-planner}
spec:
  callees: [{blueprint: tool}]                      # required; selectors as AccessPolicy
  allowedOrigins:                                   # required; any of
    - {blueprint: orchestrator}                     #   an agent origin (hop 0's issuer)
    - {user: {issuer: "https://idp.example", subject: alice, claims: {groups: analysts}}}
  allowedPaths:                                     # required; any of
    - [{blueprint: orchestrator}, {blueprint: planner}]
    - [{blueprint: orchestrator}, "*", "**"]
  maxDepth: 4                                       # optional; the mesh limit applies anyway
  requiredScopes: ["tools:invoke"]                  # optional
  requireUserOrigin: false                          # optional
```

Semantics (docs/delegation.md has the full text):
* A path is an ordered pattern over the issuers of the chain's hops, origin agent
  first, anchored at both ends. A selector matches exactly one issuer, `"*"` any one
  issuer, `"**"` any run of issuers including none. The callee itself (the last
  audience) is not part of the path; `callees` selects it.
* A user origin matches `{user: ...}` when the issuer is equal, the subject (if
  given) is equal, and every listed claim holds the value (a list claim contains it).
  An agent origin matches an agent selector. `requireUserOrigin` refuses agent origins.
* A policy allows a chain when it selects the callee and allows the origin, one of
  the paths, the depth (`maxDepth`, if set) and has all `requiredScopes` among the
  last hop's scopes. No policy selecting the callee denies (default deny).

The YAML form is read and written by `trustmesh.delegation_manifest`.

Invariants: constructors validate (`InvalidResourceError` names the YAML field);
values are frozen and hashable; path patterns are bounded so matching is cheap.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from trustmesh.decision import Decision, Reason
from trustmesh.delegation_format import AgentOrigin, Origin, UserOrigin
from trustmesh.delegation_parse import check_scopes
from trustmesh.resources import (
    AgentView,
    InvalidResourceError,
    Kind,
    Selector,
    check_name,
)

__all__ = [
    "MAX_PATH_ELEMENTS",
    "DelegationPolicy",
    "OriginMatch",
    "PathElement",
    "PathWildcard",
    "UserMatch",
    "chain_policy_decision",
    "match_path",
]

MAX_PATH_ELEMENTS = 16
MAX_DEPTH_SETTING = 64
_MAX_TEXT = 2048


class PathWildcard(enum.StrEnum):
    ONE = "*"  # exactly one agent
    ANY = "**"  # any run of agents, including none


PathElement = Selector | PathWildcard


def _text(value: object, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidResourceError(field, "must be a non-empty string")
    if len(value) > _MAX_TEXT or not value.isprintable():
        raise InvalidResourceError(
            field, f"{value[:64]!r} must be printable and at most {_MAX_TEXT} characters"
        )
    return value


@dataclass(frozen=True, slots=True)
class UserMatch:
    """Matches a user origin by token issuer, optional subject and required claim values."""

    issuer: str
    subject: str | None = None
    # (claim name, required value), sorted by name, each name once.
    claims: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        _text(self.issuer, "user.issuer")
        if self.subject is not None:
            _text(self.subject, "user.subject")
        names = [n for n, _ in self.claims]
        if names != sorted(set(names)):
            raise InvalidResourceError("user.claims", "must be sorted by name, each name once")
        for name, value in self.claims:
            _text(name, "user.claims")
            _text(value, f"user.claims.{name}")

    def matches(self, origin: UserOrigin) -> bool:
        return (
            origin.issuer == self.issuer
            and (self.subject is None or origin.subject == self.subject)
            and all(value in origin.claim(name) for name, value in self.claims)
        )


OriginMatch = Selector | UserMatch


@dataclass(frozen=True, slots=True)
class DelegationPolicy:
    """Which delegated chains a callee accepts (see the module docstring)."""

    kind: ClassVar[Kind] = Kind.DELEGATION_POLICY

    name: str
    callees: tuple[Selector, ...]
    allowed_origins: tuple[OriginMatch, ...]
    allowed_paths: tuple[tuple[PathElement, ...], ...]
    max_depth: int | None = None
    required_scopes: tuple[str, ...] = ()
    require_user_origin: bool = False

    def __post_init__(self) -> None:
        check_name(self.name)
        _nonempty(self.callees, "spec.callees", "selector")
        for i, s in enumerate(self.callees):
            if not isinstance(s, Selector):
                raise InvalidResourceError(f"spec.callees[{i}]", "must be a Selector")
        _nonempty(self.allowed_origins, "spec.allowedOrigins", "origin")
        for i, o in enumerate(self.allowed_origins):
            if not isinstance(o, Selector | UserMatch):
                raise InvalidResourceError(
                    f"spec.allowedOrigins[{i}]", "must be a Selector or user"
                )
            if self.require_user_origin and isinstance(o, Selector):
                raise InvalidResourceError(
                    f"spec.allowedOrigins[{i}]",
                    "is an agent selector, but requireUserOrigin is true: it could never match",
                )
        _nonempty(self.allowed_paths, "spec.allowedPaths", "path")
        for i, path in enumerate(self.allowed_paths):
            field = f"spec.allowedPaths[{i}]"
            if not isinstance(path, tuple) or not path:
                raise InvalidResourceError(field, "must list at least one element")
            if len(path) > MAX_PATH_ELEMENTS:
                raise InvalidResourceError(field, f"has more than {MAX_PATH_ELEMENTS} elements")
            for j, e in enumerate(path):
                if not isinstance(e, Selector | PathWildcard):
                    raise InvalidResourceError(f"{field}[{j}]", "must be a selector, '*' or '**'")
        if self.max_depth is not None and (
            isinstance(self.max_depth, bool)
            or not isinstance(self.max_depth, int)
            or not 1 <= self.max_depth <= MAX_DEPTH_SETTING
        ):
            raise InvalidResourceError(
                "spec.maxDepth", f"must be an integer from 1 to {MAX_DEPTH_SETTING}"
            )
        if not isinstance(self.required_scopes, tuple):
            raise InvalidResourceError("spec.requiredScopes", "must be a tuple of scopes")
        try:
            scopes = check_scopes(self.required_scopes)
        except ValueError as e:
            raise InvalidResourceError("spec.requiredScopes", str(e)) from e
        if len(scopes) != len(self.required_scopes):
            raise InvalidResourceError("spec.requiredScopes", "lists a scope twice")
        if not isinstance(self.require_user_origin, bool):
            raise InvalidResourceError("spec.requireUserOrigin", "must be true or false")

    def selects_callee(self, callee: AgentView) -> bool:
        return any(s.matches(callee) for s in self.callees)

    def allows_origin(self, origin: Origin, origin_agent: AgentView | None) -> bool:
        if isinstance(origin, UserOrigin):
            return any(isinstance(m, UserMatch) and m.matches(origin) for m in self.allowed_origins)
        if self.require_user_origin or origin_agent is None:
            return False
        return any(
            isinstance(m, Selector) and m.matches(origin_agent) for m in self.allowed_origins
        )

    def allows_path(self, issuers: Sequence[AgentView]) -> bool:
        return any(match_path(p, issuers) for p in self.allowed_paths)

    def forwarders(self) -> tuple[bool, tuple[Selector, ...]]:
        """Who could issue a hop after the first under this policy: (anyone, selectors).

        Used to decide when a hop must be signed: only an agent that may forward a
        chain needs its incoming hop signed (docs/delegation.md, "When to sign").
        """
        if self.max_depth is not None and self.max_depth < 2:
            return False, ()
        anyone = any(
            e is PathWildcard.ANY or (j >= 1 and e is PathWildcard.ONE)
            for path in self.allowed_paths
            for j, e in enumerate(path)
        )
        selectors = tuple(
            e for path in self.allowed_paths for e in path[1:] if isinstance(e, Selector)
        )
        return anyone, selectors


def _nonempty(value: object, field: str, what: str) -> None:
    if not isinstance(value, tuple) or not value:
        raise InvalidResourceError(field, f"must list at least one {what}")


def match_path(pattern: Sequence[PathElement], issuers: Sequence[AgentView]) -> bool:
    """True when the issuers, in order, match the pattern (anchored at both ends)."""
    n = len(pattern)

    def closure(states: set[int]) -> set[int]:
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < n and pattern[i] is PathWildcard.ANY and i + 1 not in states:
                states.add(i + 1)
                todo.append(i + 1)
        return states

    states = closure({0})
    for agent in issuers:
        following: set[int] = set()
        for i in states:
            if i == n:
                continue
            e = pattern[i]
            if e is PathWildcard.ANY:
                following.add(i)
            elif e is PathWildcard.ONE or (isinstance(e, Selector) and e.matches(agent)):
                following.add(i + 1)
        states = closure(following)
        if not states:
            return False
    return n in states


# -- decisions ------------------------------------------------------------------------


class _Stage(enum.IntEnum):
    """How far a policy got with a chain; the best stage names the denial."""

    ORIGIN = 0
    PATH = 1
    DEPTH = 2
    SCOPES = 3
    ALLOWED = 4


_STAGE_REASONS = {
    _Stage.ORIGIN: Reason.CHAIN_ORIGIN_NOT_ALLOWED,
    _Stage.PATH: Reason.CHAIN_PATH_NOT_ALLOWED,
    _Stage.DEPTH: Reason.CHAIN_TOO_DEEP,
    _Stage.SCOPES: Reason.CHAIN_SCOPE_ESCALATION,
}


def _origin_text(origin: Origin) -> str:
    if isinstance(origin, AgentOrigin):
        return f"agent '{origin.spiffe_id}'"
    return f"user {origin.subject!r} of {origin.issuer!r}"


def _stage(
    policy: DelegationPolicy,
    origin: Origin,
    origin_agent: AgentView | None,
    issuers: Sequence[AgentView],
    scopes: frozenset[str],
) -> _Stage:
    if not policy.allows_origin(origin, origin_agent):
        return _Stage.ORIGIN
    if not policy.allows_path(issuers):
        return _Stage.PATH
    if policy.max_depth is not None and len(issuers) > policy.max_depth:
        return _Stage.DEPTH
    if not scopes.issuperset(policy.required_scopes):
        return _Stage.SCOPES
    return _Stage.ALLOWED


def chain_policy_decision(
    policies: Iterable[DelegationPolicy],
    callee: AgentView,
    origin: Origin,
    origin_agent: AgentView | None,
    issuers: Sequence[AgentView],
    scopes: frozenset[str],
) -> Decision:
    """Allowed by the first policy (by name) that allows the chain; otherwise the
    denial of the policy that got furthest (origin, path, depth, scopes)."""
    best: tuple[_Stage, DelegationPolicy] | None = None
    path = " > ".join(str(a.spiffe_id) for a in issuers)
    who = _origin_text(origin)
    for policy in sorted(policies, key=lambda p: p.name):
        if not policy.selects_callee(callee):
            continue
        stage = _stage(policy, origin, origin_agent, issuers, scopes)
        if stage is _Stage.ALLOWED:
            return Decision.allow(
                policy.name,
                f"DelegationPolicy {policy.name!r} allows {who} via {path} to '{callee.spiffe_id}'",
            )
        if best is None or stage > best[0]:
            best = (stage, policy)
    if best is None:
        return Decision.deny(
            Reason.CHAIN_ORIGIN_NOT_ALLOWED,
            f"no DelegationPolicy selects callee '{callee.spiffe_id}', so it accepts no "
            f"delegated call (origin {who}, path {path})",
        )
    stage, policy = best
    problem = {
        _Stage.ORIGIN: f"does not allow origin {who}"
        + (" (it requires a user origin)" if policy.require_user_origin else ""),
        _Stage.PATH: f"allows origin {who} but not the path {path}",
        _Stage.DEPTH: f"allows at most {policy.max_depth} hops, the chain has {len(issuers)}",
        _Stage.SCOPES: "requires scopes "
        + ", ".join(sorted(set(policy.required_scopes) - scopes))
        + " that the chain does not grant",
    }[stage]
    return Decision.deny(
        _STAGE_REASONS[stage],
        f"DelegationPolicy {policy.name!r} (the closest match for callee "
        f"'{callee.spiffe_id}') {problem}",
        policy.name,
    )
