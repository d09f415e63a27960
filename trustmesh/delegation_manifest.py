"""The YAML/JSON form of a `DelegationPolicy` (see `trustmesh.delegation_policy`).

`trustmesh.manifest` reads every kind; for a DelegationPolicy it hands the checked
`spec` mapping and itself (a `DocumentReader`) to `policy_from_spec`, so that errors
name the source and the field exactly as for the other kinds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NoReturn, Protocol

from trustmesh.delegation_policy import (
    DelegationPolicy,
    OriginMatch,
    PathElement,
    PathWildcard,
    UserMatch,
)
from trustmesh.resources import InvalidResourceError, Selector, SelectorKind

__all__ = ["SPEC_FIELDS", "DocumentReader", "policy_from_spec", "policy_to_spec"]


class DocumentReader(Protocol):
    """What `trustmesh.manifest` offers to read a spec with errors naming the field."""

    def fail(self, field: str, problem: str) -> NoReturn: ...
    def mapping(
        self, value: object, field: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, object]: ...
    def string(self, value: object, field: str) -> str: ...
    def strings(self, value: object, field: str) -> tuple[str, ...]: ...
    def items(self, value: object, field: str) -> list[object]: ...
    def selector(self, value: object, field: str) -> Selector: ...
    def selectors(self, value: object, field: str) -> tuple[Selector, ...]: ...


SPEC_FIELDS = (
    ("callees", "allowedOrigins", "allowedPaths"),
    ("maxDepth", "requiredScopes", "requireUserOrigin"),
)
_SELECTOR_KEYS = tuple(k.value for k in SelectorKind)


def _user_from_doc(r: DocumentReader, value: object, field: str) -> UserMatch:
    m = r.mapping(value, field, ("issuer",), ("subject", "claims"))
    issuer = r.string(m["issuer"], f"{field}.issuer")
    subject = None if "subject" not in m else r.string(m["subject"], f"{field}.subject")
    raw = m.get("claims", {})
    if not isinstance(raw, dict):
        r.fail(f"{field}.claims", "must be a mapping of claim name to required value")
    claims = tuple(
        sorted(
            (r.string(k, f"{field}.claims"), r.string(v, f"{field}.claims.{k}"))
            for k, v in raw.items()
        )
    )
    try:
        return UserMatch(issuer, subject, claims)
    except InvalidResourceError as e:
        r.fail(f"{field}.{e.field.removeprefix('user.')}", e.problem)


def _origin_from_doc(r: DocumentReader, value: object, field: str) -> OriginMatch:
    m = r.mapping(value, field, (), (*_SELECTOR_KEYS, "user"))
    if "user" in m:
        if len(m) != 1:
            r.fail(field, "an origin is either an agent selector or {user: ...}, not both")
        return _user_from_doc(r, m["user"], f"{field}.user")
    return r.selector(value, field)


def _path_from_doc(r: DocumentReader, value: object, field: str) -> tuple[PathElement, ...]:
    out: list[PathElement] = []
    for j, item in enumerate(r.items(value, field)):
        if isinstance(item, str):
            if item not in ("*", "**"):
                r.fail(f"{field}[{j}]", f"{item!r} is neither a selector nor '*' or '**'")
            out.append(PathWildcard(item))
        else:
            out.append(r.selector(item, f"{field}[{j}]"))
    return tuple(out)


def policy_from_spec(r: DocumentReader, name: str, spec: Mapping[str, object]) -> DelegationPolicy:
    """Build the policy from a spec whose keys `r.mapping` already checked."""
    origins = tuple(
        _origin_from_doc(r, o, f"spec.allowedOrigins[{i}]")
        for i, o in enumerate(r.items(spec["allowedOrigins"], "spec.allowedOrigins"))
    )
    paths = tuple(
        _path_from_doc(r, p, f"spec.allowedPaths[{i}]")
        for i, p in enumerate(r.items(spec["allowedPaths"], "spec.allowedPaths"))
    )
    max_depth = spec.get("maxDepth")
    if max_depth is not None and (isinstance(max_depth, bool) or not isinstance(max_depth, int)):
        r.fail("spec.maxDepth", f"must be an integer, got {type(max_depth).__name__}")
    require_user = spec.get("requireUserOrigin", False)
    if not isinstance(require_user, bool):
        r.fail("spec.requireUserOrigin", f"must be true or false, got {require_user!r}")
    return DelegationPolicy(
        name=name,
        callees=r.selectors(spec["callees"], "spec.callees"),
        allowed_origins=origins,
        allowed_paths=paths,
        max_depth=max_depth,
        required_scopes=r.strings(spec.get("requiredScopes", []), "spec.requiredScopes"),
        require_user_origin=require_user,
    )


def _selector_doc(s: Selector) -> dict[str, object]:
    value = s.value
    if isinstance(value, str):
        return {s.kind.value: value}
    if isinstance(value, Mapping):
        return {s.kind.value: dict(value)}
    return {s.kind.value: str(value)}


def policy_to_spec(policy: DelegationPolicy) -> dict[str, object]:
    """The `spec` of the document form; `policy_from_spec` reads it back equal."""
    origins: list[object] = []
    for o in policy.allowed_origins:
        if isinstance(o, UserMatch):
            user: dict[str, object] = {"issuer": o.issuer}
            if o.subject is not None:
                user["subject"] = o.subject
            if o.claims:
                user["claims"] = dict(o.claims)
            origins.append({"user": user})
        else:
            origins.append(_selector_doc(o))
    spec: dict[str, object] = {
        "callees": [_selector_doc(s) for s in policy.callees],
        "allowedOrigins": origins,
        "allowedPaths": [
            [e.value if isinstance(e, PathWildcard) else _selector_doc(e) for e in path]
            for path in policy.allowed_paths
        ],
    }
    if policy.max_depth is not None:
        spec["maxDepth"] = policy.max_depth
    if policy.required_scopes:
        spec["requiredScopes"] = list(policy.required_scopes)
    if policy.require_user_origin:
        spec["requireUserOrigin"] = True
    return spec
