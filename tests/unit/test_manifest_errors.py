"""Resource documents: every manifest error names its file (source) and field."""

from __future__ import annotations

import textwrap

import pytest

from trustmesh.errors import ManifestError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.manifest import parse_documents, parse_sourced

from manifest_docs import AGENT, HEADER


def _doc(kind: str, spec: str, name: str = "x") -> str:
    return (
        HEADER
        + f"kind: {kind}\nmetadata: {{name: {name}}}\nspec:\n"
        + textwrap.indent(textwrap.dedent(spec), "  ")
    )


def _agent(**fields: str) -> str:
    spec = {"spiffeId": "spiffe://demo.local/a", "blueprint": "b", "sponsor": "alice"}
    spec.update(fields)
    return _doc("Agent", "".join(f"{k}: {v}\n" for k, v in spec.items() if v != "<omit>"))


def _policy(callers: str = "[{name: a}]", methods: str = '["*"]') -> str:
    return _doc("AccessPolicy", f"callers: {callers}\ncallees: [{{name: b}}]\nmethods: {methods}\n")


BIG = _doc(
    "AgentBlueprint",
    f'description: {"x" * DEFAULT_LIMITS.max_document_bytes}\nallowedMethods: ["*"]\n',
)

ERROR_CASES = [
    # (id, text, source, field, problem substring)
    ("malformed-yaml", "kind: [Agent\n", "f.yaml#1", "", "malformed YAML at line 2, column 1"),
    (
        "malformed-yaml-second-doc",
        AGENT + "---\nkind: {\n",
        "f.yaml#2",
        "",
        "malformed YAML at line",
    ),
    ("duplicate-key", AGENT + "kind: Agent\n", "f.yaml#1", "", "duplicate key 'kind'"),
    ("not-a-mapping", "- kind: Agent\n", "f.yaml#1", "", "a document must be a mapping, got list"),
    ("scalar-document", "hello\n", "f.yaml#1", "", "a document must be a mapping, got str"),
    (
        "missing-api-version",
        AGENT.replace(HEADER, ""),
        "f.yaml#1",
        "apiVersion",
        "is required (expected 'trustmesh.dev/v1alpha1')",
    ),
    (
        "wrong-api-version",
        AGENT.replace("trustmesh.dev/v1alpha1", "v1"),
        "f.yaml#1",
        "apiVersion",
        "unsupported apiVersion 'v1' (expected 'trustmesh.dev/v1alpha1')",
    ),
    (
        "unknown-kind",
        AGENT.replace("kind: Agent", "kind: Agnet"),
        "f.yaml#1",
        "kind",
        "unknown kind 'Agnet' (known kinds: AccessPolicy, Agent, AgentBlueprint, DelegationPolicy)",
    ),
    ("missing-kind", AGENT.replace("kind: Agent\n", ""), "f.yaml#1", "kind", "is required"),
    (
        "unknown-top-field",
        AGENT + "status: {}\n",
        "f.yaml#1",
        "status",
        "unknown field 'status' (known fields: apiVersion, kind, metadata, spec)",
    ),
    (
        "unknown-metadata-field",
        AGENT.replace("{name: planner}", "{name: p, labels: {}}"),
        "f.yaml#1",
        "metadata.labels",
        "unknown field 'labels' (known fields: name)",
    ),
    (
        "missing-metadata",
        AGENT.replace("metadata: {name: planner}\n", ""),
        "f.yaml#1",
        "metadata",
        "is required",
    ),
    (
        "missing-name",
        AGENT.replace("{name: planner}", "{}"),
        "f.yaml#1",
        "metadata.name",
        "is required",
    ),
    (
        "bad-name",
        AGENT.replace("{name: planner}", "{name: Planner_1}"),
        "f.yaml#1",
        "metadata.name",
        "invalid name 'Planner_1'",
    ),
    (
        "name-not-string",
        AGENT.replace("{name: planner}", "{name: yes}"),
        "f.yaml#1",
        "metadata.name",
        "must be a string, got bool",
    ),
    (
        "spec-typo",
        _agent(sponsr="bob"),
        "f.yaml#1",
        "spec.sponsr",
        "unknown field 'sponsr'; did you mean 'sponsor'? (known fields: attributes, blueprint, "
        "expiresAt, owners, spiffeId, sponsor)",
    ),
    ("missing-sponsor", _agent(sponsor="<omit>"), "f.yaml#1", "spec.sponsor", "is required"),
    (
        "empty-sponsor",
        _agent(sponsor='"  "'),
        "f.yaml#1",
        "spec.sponsor",
        "is required and must not be empty",
    ),
    ("missing-blueprint", _agent(blueprint="<omit>"), "f.yaml#1", "spec.blueprint", "is required"),
    (
        "malformed-spiffe-id",
        _agent(spiffeId="spiffe://demo.local/a/../b"),
        "f.yaml#1",
        "spec.spiffeId",
        "Invalid SPIFFE ID 'spiffe://demo.local/a/../b': "
        "path segments '.' and '..' are not allowed",
    ),
    (
        "not-a-spiffe-id",
        _agent(spiffeId="http://demo.local/a"),
        "f.yaml#1",
        "spec.spiffeId",
        "Invalid SPIFFE ID 'http://demo.local/a': does not start with 'spiffe://'",
    ),
    (
        "bad-expires-at",
        _agent(expiresAt="tomorrow"),
        "f.yaml#1",
        "spec.expiresAt",
        "'tomorrow' is not an RFC 3339 time with a timezone",
    ),
    (
        "expires-at-without-zone",
        _agent(expiresAt='"2027-01-01T00:00:00"'),
        "f.yaml#1",
        "spec.expiresAt",
        "'2027-01-01T00:00:00' is not an RFC 3339 time with a timezone",
    ),
    (
        "expires-at-naive-timestamp",
        _agent(expiresAt="2027-01-01 00:00:00"),
        "f.yaml#1",
        "spec.expiresAt",
        "'2027-01-01T00:00:00' has no timezone",
    ),
    (
        "expires-at-date-only",
        _agent(expiresAt="2027-01-01"),
        "f.yaml#1",
        "spec.expiresAt",
        "must be a string, got date",
    ),
    (
        "expires-at-epoch",
        _agent(expiresAt='"1970-01-01T00:00:00Z"'),
        "f.yaml#1",
        "spec.expiresAt",
        "must be after 1970-01-01T00:00:01Z",
    ),
    (
        "attribute-not-string",
        _agent(attributes="{tier: 1}"),
        "f.yaml#1",
        "spec.attributes.tier",
        "must be a string, got int",
    ),
    (
        "bad-attribute-key",
        _agent(attributes='{"-x": y}'),
        "f.yaml#1",
        "spec.attributes",
        "invalid attribute key '-x'",
    ),
    (
        "owners-not-list",
        _agent(owners="team"),
        "f.yaml#1",
        "spec.owners",
        "must be a list, got str",
    ),
    (
        "empty-owner",
        _agent(owners='[""]'),
        "f.yaml#1",
        "spec.owners[0]",
        "is required and must not be empty",
    ),
    (
        "bad-allowed-method",
        _doc("AgentBlueprint", 'allowedMethods: ["/demo.Planner"]\n'),
        "f.yaml#1",
        "spec.allowedMethods[0]",
        "invalid method pattern '/demo.Planner': expected '/package.Service/Method', "
        "'/package.Service/*' or '*'",
    ),
    (
        "empty-allowed-methods",
        _doc("AgentBlueprint", "allowedMethods: []\n"),
        "f.yaml#1",
        "spec.allowedMethods",
        "must not be empty",
    ),
    (
        "missing-allowed-methods",
        _doc("AgentBlueprint", "description: d\n"),
        "f.yaml#1",
        "spec.allowedMethods",
        "is required",
    ),
    (
        "bad-policy-method",
        _policy(methods='["*", "demo.Planner/Plan"]'),
        "f.yaml#1",
        "spec.methods[1]",
        "invalid method pattern 'demo.Planner/Plan'",
    ),
    (
        "method-not-string",
        _policy(methods="[7]"),
        "f.yaml#1",
        "spec.methods[0]",
        "invalid method pattern 7: must be a string",
    ),
    (
        "selector-no-keys",
        _policy(callers="[{}]"),
        "f.yaml#1",
        "spec.callers[0]",
        "a selector needs exactly one of spiffeId, name, blueprint, attributes (got none)",
    ),
    (
        "selector-two-keys",
        _policy(callers="[{name: a}, {name: b, blueprint: c}]"),
        "f.yaml#1",
        "spec.callers[1]",
        "a selector needs exactly one of spiffeId, name, blueprint, attributes "
        "(got blueprint, name)",
    ),
    (
        "selector-unknown-key",
        _policy(callers="[{team: search}]"),
        "f.yaml#1",
        "spec.callers[0].team",
        "unknown field 'team'",
    ),
    (
        "selector-empty-attributes",
        _policy(callers="[{name: a}, {attributes: {}}]"),
        "f.yaml#1",
        "spec.callers[1].attributes",
        "must list at least one attribute",
    ),
    (
        "selector-attribute-not-string",
        _policy(callers="[{attributes: {tier: 2}}]"),
        "f.yaml#1",
        "spec.callers[0].attributes.tier",
        "must be a string, got int",
    ),
    (
        "selector-bad-spiffe-id",
        _policy(callers='[{spiffeId: "spiffe://d/"}]'),
        "f.yaml#1",
        "spec.callers[0].spiffeId",
        "Invalid SPIFFE ID 'spiffe://d/'",
    ),
    (
        "selector-bad-name",
        _policy(callers="[{name: Bad_Name}]"),
        "f.yaml#1",
        "spec.callers[0].name",
        "invalid name 'Bad_Name'",
    ),
    (
        "selector-not-mapping",
        _policy(callers="[a]"),
        "f.yaml#1",
        "spec.callers[0]",
        "spec.callers[0] must be a mapping, got str",
    ),
    (
        "callers-not-list",
        _policy(callers="{name: a}"),
        "f.yaml#1",
        "spec.callers",
        "must be a list, got dict",
    ),
    ("callers-empty", _policy(callers="[]"), "f.yaml#1", "spec.callers", "must not be empty"),
    (
        "document-too-big",
        AGENT + "---\n" + BIG,
        "f.yaml#2",
        "",
        f"over the {DEFAULT_LIMITS.max_document_bytes} limit",
    ),
]


@pytest.mark.parametrize(
    ("text", "source", "field", "problem"),
    [case[1:] for case in ERROR_CASES],
    ids=[case[0] for case in ERROR_CASES],
)
def test_manifest_errors_name_source_and_field(
    text: str, source: str, field: str, problem: str
) -> None:
    with pytest.raises(ManifestError) as info:
        parse_documents(text, "f.yaml")
    err = info.value
    assert (err.source, err.field) == (source, field)
    assert problem in err.problem
    assert str(err).startswith(f"{source}: {field}: " if field else f"{source}: ")
    assert err.reason == "invalid_manifest"


def test_too_many_documents() -> None:
    text = "---\n".join([AGENT] * (DEFAULT_LIMITS.max_apply_documents + 1))
    with pytest.raises(ManifestError, match=r"more than 1000 documents in one file"):
        parse_documents(text, "many.yaml")


def test_whole_file_is_bounded_before_parsing() -> None:
    tiny = Limits(max_document_bytes=100, max_apply_documents=2)
    with pytest.raises(ManifestError, match=r"big.yaml: over the 200-byte limit for one file"):
        parse_sourced("#" * 201, "big.yaml", tiny)
