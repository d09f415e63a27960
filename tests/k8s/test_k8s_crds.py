"""The CRDs describe exactly what `trustmesh apply` takes (trustmesh/manifest.py).

* Each CRD's spec fields and required fields are the manifest parser's.
* The schemas are structural (what the API server requires of a CRD).
* Every document in the project's YAML corpora validates against the CRD schema, and
  named bad documents are refused by both the CRD schema and the parser, or, where a
  structural schema can't express the rule, by the parser alone (so the reconciler
  reports the CR and applies nothing of it).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_support import K8S, REPO, crd_validators

from trustmesh.errors import ManifestError
from trustmesh.manifest import _SPEC_FIELDS, parse_resource
from trustmesh.resources import API_VERSION, Kind

CRDS = {
    yaml.safe_load(p.read_text())["spec"]["names"]["kind"]: yaml.safe_load(p.read_text())
    for p in sorted((K8S / "base" / "crds").glob("*.yaml"))
}
CORPORA = [
    REPO / "trustmesh/demo/mesh.yaml",
    REPO / "tests/vectors/delegation/mesh.yaml",
    K8S / "components/examples/mesh.yaml",
]


def spec_schema(kind: str) -> dict[str, Any]:
    (version,) = CRDS[kind]["spec"]["versions"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return schema


def test_one_crd_per_kind() -> None:
    assert set(CRDS) == {k.value for k in Kind}
    for kind, crd in CRDS.items():
        spec = crd["spec"]
        assert f"{spec['group']}/{spec['versions'][0]['name']}" == API_VERSION
        assert spec["scope"] == "Cluster", kind  # the registry has one namespace
        assert crd["metadata"]["name"] == f"{spec['names']['plural']}.{spec['group']}"


@pytest.mark.parametrize("kind", [k.value for k in Kind])
def test_spec_fields_match_the_manifest_parser(kind: str) -> None:
    required, optional = _SPEC_FIELDS[Kind(kind)]
    schema = spec_schema(kind)
    assert set(schema["properties"]) == set(required) | set(optional)
    assert sorted(schema["required"]) == sorted(required)


def structural_problems(node: Any, path: str = "") -> list[str]:
    """The API server's structural-schema rules that apply to hand-written schemas."""
    if not isinstance(node, dict):
        return [f"{path}: not a schema"]
    out: list[str] = []
    untyped_ok = node.get("x-kubernetes-preserve-unknown-fields") or node.get(
        "x-kubernetes-int-or-string"
    )
    if "type" not in node and not untyped_ok:
        out.append(f"{path or '<root>'}: no type")
    if "properties" in node and "additionalProperties" in node:
        out.append(f"{path}: properties and additionalProperties together")
    for banned in ("$ref", "oneOf", "anyOf", "allOf", "not", "definitions"):
        if banned in node:
            out.append(f"{path}: {banned} is not allowed here")
    for name, sub in node.get("properties", {}).items():
        out += structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        out += structural_problems(node["additionalProperties"], f"{path}.*")
    if "items" in node:
        out += structural_problems(node["items"], f"{path}[]")
    return out


@pytest.mark.parametrize("kind", [k.value for k in Kind])
def test_schemas_are_structural(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    root = version["schema"]["openAPIV3Schema"]
    assert structural_problems(root) == []
    assert root["properties"]["metadata"] == {"type": "object"}


def corpus_documents() -> list[Any]:
    out = []
    for path in CORPORA:
        for i, doc in enumerate(d for d in yaml.safe_load_all(path.read_text()) if d):
            out.append(pytest.param(doc, id=f"{path.relative_to(REPO)}#{i + 1}"))
    return out


def crd_errors(doc: dict[str, Any]) -> list[str]:
    validator = crd_validators()[(doc["apiVersion"], doc["kind"])]
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


@pytest.mark.parametrize("doc", corpus_documents())
def test_every_known_document_fits_its_crd(doc: dict[str, Any]) -> None:
    parse_resource(doc, "corpus")  # the corpora are valid for the registry...
    assert crd_errors(doc) == []  # ...and so for the API server


BASE = {
    "Agent": {
        "spiffeId": "spiffe://example.org/agents/a",
        "blueprint": "b",
        "sponsor": "s@example.org",
    },
    "AgentBlueprint": {"allowedMethods": ["/pkg.Svc/*"]},
    "AccessPolicy": {"callers": [{"name": "a"}], "callees": [{"blueprint": "b"}], "methods": ["*"]},
    "DelegationPolicy": {
        "callees": [{"name": "tool"}],
        "allowedOrigins": [{"blueprint": "orchestrator"}],
        "allowedPaths": [[{"blueprint": "orchestrator"}, "*"]],
    },
}


def doc_with(kind: str, change: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE[kind])
    change(spec)
    return {"apiVersion": API_VERSION, "kind": kind, "metadata": {"name": "x"}, "spec": spec}


# (id, kind, change, CRD error or None if only the parser can tell, parser error)
BAD = [
    (
        "agent-no-sponsor",
        "Agent",
        lambda s: s.pop("sponsor"),
        ": 'sponsor' is a required property",
        "spec.sponsor: is required",
    ),
    (
        "agent-bad-spiffe-id",
        "Agent",
        lambda s: s.update(spiffeId="http://example.org/a"),
        "spiffeId: 'http://example.org/a' does not match",
        "spec.spiffeId",
    ),
    (
        "agent-attribute-not-string",
        "Agent",
        lambda s: s.update(attributes={"tier": 1}),
        "attributes.tier: 1 is not of type 'string'",
        "spec.attributes.tier: must be a string",
    ),
    (
        "blueprint-empty-methods",
        "AgentBlueprint",
        lambda s: s.update(allowedMethods=[]),
        "allowedMethods: [] should be non-empty",
        "spec.allowedMethods: must not be empty",
    ),
    (
        "blueprint-bad-method",
        "AgentBlueprint",
        lambda s: s.update(allowedMethods=["pkg.Svc/M"]),
        "allowedMethods.0: 'pkg.Svc/M' does not match",
        "invalid method pattern 'pkg.Svc/M'",
    ),
    (
        "policy-two-selector-keys",
        "AccessPolicy",
        lambda s: s["callers"][0].update(blueprint="b"),
        "callers.0: {'name': 'a', 'blueprint': 'b'} has too many properties",
        "a selector needs exactly one of",
    ),
    (
        "policy-empty-attributes",
        "AccessPolicy",
        lambda s: s.update(callees=[{"attributes": {}}]),
        "callees.0.attributes: {} should be non-empty",
        "spec.callees[0]",
    ),
    (
        "delegation-depth-zero",
        "DelegationPolicy",
        lambda s: s.update(maxDepth=0),
        "maxDepth: 0 is less than the minimum of 1",
        "spec.maxDepth",
    ),
    (
        "delegation-user-without-issuer",
        "DelegationPolicy",
        lambda s: s.update(allowedOrigins=[{"user": {"subject": "alice"}}]),
        "allowedOrigins.0.user: 'issuer' is a required property",
        "spec.allowedOrigins[0].user.issuer",
    ),
    # A path element may be a string or a selector: no structural schema can say
    # which strings, so only the parser refuses this (the reconciler reports it).
    (
        "delegation-bad-wildcard",
        "DelegationPolicy",
        lambda s: s.update(allowedPaths=[["***"]]),
        None,
        "spec.allowedPaths[0][0]: '***' is neither a selector nor '*' or '**'",
    ),
]


@pytest.mark.parametrize(
    ("kind", "change", "crd_error", "parser_error"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD],
)
def test_bad_documents_are_refused(
    kind: str, change: Any, crd_error: str | None, parser_error: str
) -> None:
    doc = doc_with(kind, change)
    problems = crd_errors(doc)
    if crd_error is None:
        assert problems == []
    else:
        assert any(crd_error in p for p in problems), problems
    with pytest.raises(ManifestError) as raised:
        parse_resource(doc, "t")
    assert parser_error in raised.value.message


def test_corpora_exist() -> None:
    assert all(Path(p).exists() for p in CORPORA)
