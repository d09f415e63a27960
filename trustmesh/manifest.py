"""Parse and validate resource documents (YAML files, or JSON sent to the registry).

Every error is a `ManifestError(source, field, problem)`: `source` names the file and
the 1-based document index (`agents.yaml#2`), `field` is a dotted path
(`spec.callers[1].attributes`). Unknown fields are rejected, and so are duplicate
YAML keys, so that a typo is never silently ignored.

`parse_resource` reads every kind (`parse_object` is its older name).

Bounds: a file holds at most `max_apply_documents` documents and each document at
most `max_document_bytes` bytes (checked on the composed YAML node, before any
Python object is built from it).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import NoReturn, TypeVar

import yaml

from trustmesh.delegation_manifest import SPEC_FIELDS as _DELEGATION_SPEC_FIELDS
from trustmesh.delegation_manifest import policy_from_spec, policy_to_spec
from trustmesh.delegation_policy import DelegationPolicy
from trustmesh.errors import InvalidSpiffeIdError, ManifestError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.resources import (
    API_VERSION,
    AccessPolicy,
    Agent,
    AgentBlueprint,
    Attributes,
    InvalidResourceError,
    Kind,
    MethodPattern,
    Resource,
    Selector,
    SelectorKind,
)
from trustmesh.spiffe_id import SpiffeId

__all__ = [
    "AnyResource",
    "Sourced",
    "parse_documents",
    "parse_json",
    "parse_object",
    "parse_resource",
    "parse_sourced",
    "to_document",
    "validate_batch",
]

_T = TypeVar("_T")
_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)
_TOP = ("apiVersion", "kind", "metadata", "spec")
_SPEC_FIELDS: dict[Kind, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # kind: (required, optional)
    Kind.AGENT_BLUEPRINT: (("allowedMethods",), ("description", "defaultAttributes")),
    Kind.AGENT: (("spiffeId", "blueprint", "sponsor"), ("owners", "attributes", "expiresAt")),
    Kind.ACCESS_POLICY: (("callers", "callees", "methods"), ()),
    Kind.DELEGATION_POLICY: _DELEGATION_SPEC_FIELDS,
}

# Every kind a document may hold.
AnyResource = Resource | DelegationPolicy


@dataclass(frozen=True, slots=True)
class Sourced:
    """A parsed resource and the document it came from (`file#index`)."""

    source: str
    resource: AnyResource


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a mapping with the same key twice."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may be overridden by later keys on purpose
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e)
    if mark is not None:
        return f"malformed YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"malformed YAML: {problem}"


def parse_sourced(text: str, source: str, limits: Limits = DEFAULT_LIMITS) -> list[Sourced]:
    """Each non-empty document of a multi-document YAML text, with its `file#index`."""
    cap = limits.max_document_bytes * limits.max_apply_documents
    if len(text) > cap:  # characters: a lower bound on bytes, and cheap
        raise ManifestError(source, "", f"over the {cap}-byte limit for one file")
    out: list[Sourced] = []
    loader = _StrictLoader(text)
    index = 0
    try:
        while True:
            try:
                if not loader.check_node():
                    break
                node = loader.get_node()
                assert node is not None  # check_node() said there is one
            except yaml.YAMLError as e:
                raise ManifestError(f"{source}#{index + 1}", "", _yaml_problem(e)) from e
            index += 1
            where = f"{source}#{index}"
            if index > limits.max_apply_documents:
                raise ManifestError(
                    where, "", f"more than {limits.max_apply_documents} documents in one file"
                )
            size = len(text[node.start_mark.index : node.end_mark.index].encode())
            if size > limits.max_document_bytes:
                limit = limits.max_document_bytes
                raise ManifestError(where, "", f"document is {size} bytes, over the {limit} limit")
            try:
                obj = loader.construct_document(node)
            except yaml.YAMLError as e:
                raise ManifestError(where, "", _yaml_problem(e)) from e
            if obj is not None:
                out.append(Sourced(where, parse_resource(obj, where)))
    finally:
        loader.dispose()
    return out


def parse_documents(text: str, source: str) -> list[AnyResource]:
    """The resources of a multi-document YAML text; empty documents are skipped."""
    return [s.resource for s in parse_sourced(text, source)]


def _unique_pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_json(text: str, source: str, limits: Limits = DEFAULT_LIMITS) -> AnyResource:
    """One resource sent as JSON (`ManifestDocument.json`), with the same checks as YAML."""
    size = len(text.encode())
    if size > limits.max_document_bytes:
        limit = limits.max_document_bytes
        raise ManifestError(source, "", f"document is {size} bytes, over the {limit} limit")
    try:
        obj = json.loads(text, object_pairs_hook=_unique_pairs)
    except json.JSONDecodeError as e:
        raise ManifestError(
            source, "", f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from e
    except (ValueError, RecursionError) as e:
        raise ManifestError(source, "", f"malformed JSON: {e}") from e
    return parse_resource(obj, source)


class _Doc:
    """Walks one document, raising `ManifestError`s that name the source and field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str) -> NoReturn:
        raise ManifestError(self.source, field, problem)

    @contextmanager
    def at(self, prefix: str) -> Iterator[None]:
        """Turn resource-model errors into ManifestErrors under `prefix`."""
        try:
            yield
        except InvalidResourceError as e:
            field = ".".join(p for p in (prefix, e.field) if p)
            raise ManifestError(self.source, field, e.problem) from e
        except InvalidSpiffeIdError as e:
            raise ManifestError(self.source, prefix, e.message) from e

    def build(self, prefix: str, make: Callable[[], _T]) -> _T:
        with self.at(prefix):
            return make()

    def mapping(
        self, value: object, field: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> dict[str, object]:
        what = field or "document"
        if not isinstance(value, dict):
            self.fail(field, f"{what} must be a mapping, got {_type(value)}")
        known = (*required, *optional)
        for key in value:
            if not isinstance(key, str):
                self.fail(field, f"keys must be strings, got {key!r}")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.fail(
                    _join(field, key),
                    f"unknown field {key!r}{hint} (known fields: {', '.join(sorted(known))})",
                )
        for key in required:
            if key not in value:
                self.fail(_join(field, key), "is required")
        return value

    def string(self, value: object, field: str) -> str:
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {_type(value)}")
        return value

    def items(self, value: object, field: str) -> list[object]:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {_type(value)}")
        if not value:
            self.fail(field, "must not be empty")
        return value

    def strings(self, value: object, field: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            self.fail(field, f"must be a list, got {_type(value)}")
        return tuple(self.string(v, f"{field}[{i}]") for i, v in enumerate(value))

    def attributes(self, value: object, field: str) -> Attributes:
        if not isinstance(value, dict):
            self.fail(field, f"must be a mapping of strings, got {_type(value)}")
        for key, item in value.items():
            if not isinstance(item, str):
                self.fail(_join(field, str(key)), f"must be a string, got {_type(item)}")
        return self.build(field, lambda: Attributes(value))

    def methods(self, value: object, field: str) -> tuple[MethodPattern, ...]:
        items = self.items(value, field)
        out: list[MethodPattern] = []
        for i, text in enumerate(items):
            with self.at(f"{field}[{i}]"):
                out.append(MethodPattern.parse(text))
        return tuple(out)

    def selectors(self, value: object, field: str) -> tuple[Selector, ...]:
        return tuple(
            self.selector(item, f"{field}[{i}]") for i, item in enumerate(self.items(value, field))
        )

    def selector(self, value: object, field: str) -> Selector:
        keys = tuple(k.value for k in SelectorKind)
        m = self.mapping(value, field, (), keys)
        if len(m) != 1:
            got = ", ".join(sorted(m)) or "none"
            self.fail(field, f"a selector needs exactly one of {', '.join(keys)} (got {got})")
        ((key, raw),) = m.items()
        kind = SelectorKind(key)
        sub = _join(field, key)
        if kind is SelectorKind.ATTRIBUTES:
            return self.build(field, lambda: Selector(kind, self.attributes(raw, sub)))
        text = self.string(raw, sub)
        if kind is SelectorKind.SPIFFE_ID:
            return self.build(sub, lambda: Selector(kind, SpiffeId.parse(text)))
        return self.build(field, lambda: Selector(kind, text))

    def expiry(self, value: object, field: str) -> datetime:
        if isinstance(value, datetime):  # YAML turns an unquoted timestamp into one
            parsed = value
        else:
            text = self.string(value, field)
            if not _RFC3339_RE.fullmatch(text):
                self.fail(field, f"{text!r} is not an RFC 3339 time with a timezone")
            parsed = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
        if parsed.utcoffset() is None:
            self.fail(field, f"'{parsed.isoformat()}' has no timezone")
        return parsed.astimezone(UTC)


def _join(field: str, key: str) -> str:
    return f"{field}.{key}" if field else key


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__


def parse_object(obj: object, source: str) -> AnyResource:
    return parse_resource(obj, source)


def parse_resource(obj: object, source: str) -> AnyResource:
    """One resource of any kind from a decoded YAML or JSON document."""
    doc = _Doc(source)
    if not isinstance(obj, dict):
        doc.fail("", f"a document must be a mapping, got {_type(obj)}")
    api = obj.get("apiVersion")
    if api is None:
        doc.fail("apiVersion", f"is required (expected {API_VERSION!r})")
    if api != API_VERSION:
        doc.fail("apiVersion", f"unsupported apiVersion {api!r} (expected {API_VERSION!r})")
    raw_kind = obj.get("kind")
    known_kinds = ", ".join(sorted(k.value for k in Kind))
    if raw_kind not in {k.value for k in Kind}:
        problem = "is required" if raw_kind is None else f"unknown kind {raw_kind!r}"
        doc.fail("kind", f"{problem} (known kinds: {known_kinds})")
    kind = Kind(raw_kind)
    top = doc.mapping(obj, "", _TOP)
    meta = doc.mapping(top["metadata"], "metadata", ("name",))
    name = doc.string(meta["name"], "metadata.name")
    required, optional = _SPEC_FIELDS[kind]
    spec = doc.mapping(top["spec"], "spec", required, optional)
    # Each field is checked (and named) on its own first; the constructor then checks
    # what involves the whole resource.
    if kind is Kind.AGENT_BLUEPRINT:
        make: Callable[[], AnyResource] = partial(
            AgentBlueprint,
            name=name,
            allowed_methods=doc.methods(spec["allowedMethods"], "spec.allowedMethods"),
            description=doc.string(spec.get("description", ""), "spec.description"),
            default_attributes=doc.attributes(
                spec.get("defaultAttributes", {}), "spec.defaultAttributes"
            ),
        )
    elif kind is Kind.AGENT:
        raw_id = doc.string(spec["spiffeId"], "spec.spiffeId")
        expires = spec.get("expiresAt")
        make = partial(
            Agent,
            name=name,
            spiffe_id=doc.build("spec.spiffeId", lambda: SpiffeId.parse(raw_id)),
            blueprint=doc.string(spec["blueprint"], "spec.blueprint"),
            sponsor=doc.string(spec["sponsor"], "spec.sponsor"),
            owners=doc.strings(spec.get("owners", []), "spec.owners"),
            attributes=doc.attributes(spec.get("attributes", {}), "spec.attributes"),
            expires_at=None if expires is None else doc.expiry(expires, "spec.expiresAt"),
        )
    elif kind is Kind.DELEGATION_POLICY:
        make = partial(policy_from_spec, doc, name, spec)
    else:
        make = partial(
            AccessPolicy,
            name=name,
            callers=doc.selectors(spec["callers"], "spec.callers"),
            callees=doc.selectors(spec["callees"], "spec.callees"),
            methods=doc.methods(spec["methods"], "spec.methods"),
        )
    return doc.build("", make)


def _selector_doc(s: Selector) -> dict[str, object]:
    value = s.value
    if isinstance(value, Attributes):
        return {s.kind.value: value.to_dict()}
    return {s.kind.value: str(value)}


def to_document(resource: AnyResource) -> dict[str, object]:
    """The YAML/JSON form of a resource; `parse_resource` turns it back into an equal one."""
    spec: dict[str, object]
    if isinstance(resource, AgentBlueprint):
        spec = {"allowedMethods": [str(m) for m in resource.allowed_methods]}
        if resource.description:
            spec["description"] = resource.description
        if resource.default_attributes:
            spec["defaultAttributes"] = resource.default_attributes.to_dict()
    elif isinstance(resource, Agent):
        spec = {
            "spiffeId": str(resource.spiffe_id),
            "blueprint": resource.blueprint,
            "sponsor": resource.sponsor,
        }
        if resource.owners:
            spec["owners"] = list(resource.owners)
        if resource.attributes:
            spec["attributes"] = resource.attributes.to_dict()
        if resource.expires_at is not None:
            utc = resource.expires_at.astimezone(UTC)
            spec["expiresAt"] = utc.isoformat().replace("+00:00", "Z")
    elif isinstance(resource, DelegationPolicy):
        spec = policy_to_spec(resource)
    else:
        spec = {
            "callers": [_selector_doc(s) for s in resource.callers],
            "callees": [_selector_doc(s) for s in resource.callees],
            "methods": [str(m) for m in resource.methods],
        }
    return {
        "apiVersion": API_VERSION,
        "kind": resource.kind.value,
        "metadata": {"name": resource.name},
        "spec": spec,
    }


def validate_batch(
    resources: Sequence[AnyResource],
    existing_blueprints: set[str],
    *,
    sources: Sequence[str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> None:
    """Checks across the documents of one apply; pure (the registry passes what it holds).

    `sources`, parallel to `resources`, names each document in errors; without it a
    document is named `Kind/name`.
    """
    if sources is not None and len(sources) != len(resources):
        raise ValueError("sources must be parallel to resources")
    names = list(sources) if sources is not None else [f"{r.kind}/{r.name}" for r in resources]
    if len(resources) > limits.max_apply_documents:
        raise ManifestError(
            "apply", "", f"{len(resources)} documents, over the {limits.max_apply_documents} limit"
        )
    seen: dict[tuple[Kind, str], str] = {}
    batch_blueprints = {r.name for r in resources if isinstance(r, AgentBlueprint)}
    ids: dict[SpiffeId, tuple[str, str]] = {}
    for source, r in zip(names, resources, strict=True):
        key = (r.kind, r.name)
        if key in seen:
            raise ManifestError(
                source, "metadata.name", f"duplicate {r.kind} {r.name!r} (also in {seen[key]})"
            )
        seen[key] = source
        if not isinstance(r, Agent):
            continue
        if r.blueprint not in batch_blueprints and r.blueprint not in existing_blueprints:
            raise ManifestError(
                source,
                "spec.blueprint",
                f"AgentBlueprint {r.blueprint!r} is defined neither in this apply "
                "nor in the registry",
            )
        if r.spiffe_id in ids:
            other, other_source = ids[r.spiffe_id]
            raise ManifestError(
                source,
                "spec.spiffeId",
                f"'{r.spiffe_id}' is also the SPIFFE ID of Agent {other!r} ({other_source})",
            )
        ids[r.spiffe_id] = (r.name, source)
