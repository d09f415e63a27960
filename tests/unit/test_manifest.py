"""Resource documents: parsing, every error naming file and field, round trips, batches."""

from __future__ import annotations

import json
import re
import textwrap
from datetime import UTC, datetime

import pytest

from trustmesh.errors import ManifestError
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.manifest import (
    parse_documents,
    parse_json,
    parse_object,
    parse_resource,
    parse_sourced,
    to_document,
    validate_batch,
)
from trustmesh.resources import (
    AccessPolicy,
    Agent,
    AgentBlueprint,
    Attributes,
    InvalidResourceError,
    MethodPattern,
    Selector,
    SelectorKind,
)
from trustmesh.spiffe_id import SpiffeId

HEADER = "apiVersion: trustmesh.dev/v1alpha1\n"

BLUEPRINT = HEADER + textwrap.dedent("""\
    kind: AgentBlueprint
    metadata: {name: planner}
    spec:
      description: Plans tool use
      defaultAttributes: {team: search, tier: internal}
      allowedMethods: ["/demo.Planner/*"]
    """)

AGENT = HEADER + textwrap.dedent("""\
    kind: Agent
    metadata: {name: planner}
    spec:
      spiffeId: spiffe://demo.local/agents/planner
      blueprint: planner
      sponsor: alice@example.com
      owners: [team-search]
      attributes: {tier: critical}
      expiresAt: "2027-01-01T00:00:00Z"
    """)

POLICY = HEADER + textwrap.dedent("""\
    kind: AccessPolicy
    metadata: {name: orchestrator-calls-planner}
    spec:
      callers:
        - name: orchestrator
        - spiffeId: spiffe://demo.local/agents/x
        - blueprint: orchestrator
        - attributes: {team: search}
      callees:
        - name: planner
      methods: ["/demo.Planner/Plan", "/demo.Planner/*", "*"]
    """)


def test_parses_the_three_kinds() -> None:
    text = "\n---\n".join([BLUEPRINT, AGENT, POLICY])
    blueprint, agent, policy = parse_documents(text, "demo.yaml")

    assert blueprint == AgentBlueprint(
        name="planner",
        allowed_methods=(MethodPattern("demo.Planner", None),),
        description="Plans tool use",
        default_attributes=Attributes({"team": "search", "tier": "internal"}),
    )
    assert agent == Agent(
        name="planner",
        spiffe_id=SpiffeId.parse("spiffe://demo.local/agents/planner"),
        blueprint="planner",
        sponsor="alice@example.com",
        owners=("team-search",),
        attributes=Attributes({"tier": "critical"}),
        expires_at=datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert isinstance(policy, AccessPolicy)
    assert [s.kind for s in policy.callers] == [
        SelectorKind.NAME,
        SelectorKind.SPIFFE_ID,
        SelectorKind.BLUEPRINT,
        SelectorKind.ATTRIBUTES,
    ]
    assert policy.callers[3] == Selector(SelectorKind.ATTRIBUTES, Attributes({"team": "search"}))
    assert [str(m) for m in policy.methods] == ["/demo.Planner/Plan", "/demo.Planner/*", "*"]


def test_empty_documents_are_skipped_but_counted_in_the_source() -> None:
    text = "# just a comment\n---\n---\n" + AGENT + "---\n"
    (only,) = parse_sourced(text, "agents.yaml")
    assert only.source == "agents.yaml#2"
    assert parse_documents("", "empty.yaml") == []


def test_unquoted_timestamp_and_offset_are_normalised_to_utc() -> None:
    text = AGENT.replace('"2027-01-01T00:00:00Z"', "2027-01-01T02:00:00+02:00")
    (agent,) = parse_documents(text, "a.yaml")
    assert isinstance(agent, Agent)
    assert agent.expires_at == datetime(2027, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", [BLUEPRINT, AGENT, POLICY], ids=["blueprint", "agent", "policy"])
def test_to_document_round_trips_through_parse_object_and_json(text: str) -> None:
    (resource,) = parse_documents(text, "x.yaml")
    document = to_document(resource)
    assert parse_object(document, "x") == resource
    assert parse_object(json.loads(json.dumps(document)), "wire") == resource


def test_minimal_documents_round_trip() -> None:
    agent = Agent(name="a", spiffe_id=SpiffeId.parse("spiffe://d/a"), blueprint="b", sponsor="bob")
    assert "owners" not in to_document(agent)["spec"]  # type: ignore[operator]
    assert parse_object(to_document(agent), "x") == agent


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


@pytest.mark.parametrize(
    ("text", "matching", "not_matching"),
    [
        ("*", ["/a.B/C", "/B/C"], ["", "*", "/a.B/C/D", "a.B/C"]),
        (
            "/demo.Planner/*",
            ["/demo.Planner/Plan"],
            ["/demo.Planner/", "/demo.PlannerX/Plan", "/demo.Planner/Plan/x", "/other.P/Plan"],
        ),
        ("/demo.Planner/Plan", ["/demo.Planner/Plan"], ["/demo.Planner/PlanX", "/demo.Planner/*"]),
    ],
    ids=["any", "service", "exact"],
)
def test_method_pattern_matches(text: str, matching: list[str], not_matching: list[str]) -> None:
    pattern = MethodPattern.parse(text)
    assert str(pattern) == text
    assert all(pattern.matches(m) for m in matching)
    assert not any(pattern.matches(m) for m in not_matching)


@pytest.mark.parametrize(
    "text",
    ["", "**", "/", "/a/b/c", "/a.*/*", "/a/*b", "a/b", "/1a/B", "/a./B", " *"],
    ids=[
        "empty",
        "stars",
        "slash",
        "three-parts",
        "wild-service",
        "partial-wild",
        "no-slash",
        "digit-start",
        "trailing-dot",
        "space",
    ],
)
def test_method_pattern_rejects(text: str) -> None:
    with pytest.raises(InvalidResourceError, match=re.escape(f"invalid method pattern {text!r}: ")):
        MethodPattern.parse(text)


def _agents(*specs: tuple[str, str, str]) -> list[Agent]:
    return [
        Agent(name=n, spiffe_id=SpiffeId.parse(i), blueprint=b, sponsor="alice")
        for n, i, b in specs
    ]


BP = AgentBlueprint(name="bp", allowed_methods=(MethodPattern.parse("*"),))


@pytest.mark.parametrize(
    ("batch", "existing", "source", "field", "problem"),
    [
        (
            [BP, BP],
            set(),
            "AgentBlueprint/bp",
            "metadata.name",
            "duplicate AgentBlueprint 'bp' (also in AgentBlueprint/bp)",
        ),
        (
            _agents(("a", "spiffe://d/a", "nope")),
            {"bp"},
            "Agent/a",
            "spec.blueprint",
            "AgentBlueprint 'nope' is defined neither in this apply nor in the registry",
        ),
        (
            _agents(("a", "spiffe://d/a", "bp"), ("b", "spiffe://d/a", "bp")),
            {"bp"},
            "Agent/b",
            "spec.spiffeId",
            "'spiffe://d/a' is also the SPIFFE ID of Agent 'a' (Agent/a)",
        ),
    ],
    ids=["duplicate-name", "unknown-blueprint", "duplicate-spiffe-id"],
)
def test_validate_batch_errors(
    batch: list[Agent | AgentBlueprint], existing: set[str], source: str, field: str, problem: str
) -> None:
    with pytest.raises(ManifestError) as info:
        validate_batch(batch, existing)
    assert (info.value.source, info.value.field, info.value.problem) == (source, field, problem)


@pytest.mark.parametrize(
    ("batch", "existing"),
    [
        ([BP, *_agents(("a", "spiffe://d/a", "bp"))], set()),
        (_agents(("a", "spiffe://d/a", "bp")), {"bp"}),
        ([BP, AgentBlueprint(name="other", allowed_methods=BP.allowed_methods)], set()),
    ],
    ids=["blueprint-in-batch", "blueprint-in-registry", "same-kind-different-names"],
)
def test_validate_batch_accepts(batch: list[Agent | AgentBlueprint], existing: set[str]) -> None:
    validate_batch(batch, existing)


def test_validate_batch_names_documents_by_source() -> None:
    text = AGENT + "---\n" + AGENT
    sourced = parse_sourced(text, "agents.yaml")
    with pytest.raises(ManifestError) as info:
        validate_batch(
            [s.resource for s in sourced], {"planner"}, sources=[s.source for s in sourced]
        )
    assert str(info.value) == (
        "agents.yaml#2: metadata.name: duplicate Agent 'planner' (also in agents.yaml#1)"
    )


def test_parse_json_round_trips_to_document() -> None:
    (agent,) = parse_documents(AGENT, "a.yaml")
    assert parse_json(json.dumps(to_document(agent)), "agents.yaml#1") == agent


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('{"kind": "Agent",', "malformed JSON at line 1, column 18: Expecting property name"),
        ('{"kind": "Agent", "kind": "Agent"}', "malformed JSON: duplicate key 'kind'"),
        ("[1]", "a document must be a mapping, got list"),
        (json.dumps({"pad": "x" * DEFAULT_LIMITS.max_document_bytes}), "over the 262144 limit"),
    ],
    ids=["malformed", "duplicate-key", "not-a-mapping", "too-big"],
)
def test_parse_json_errors(text: str, problem: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_json(text, "wire#3")
    assert info.value.source == "wire#3"
    assert problem in info.value.problem


def test_whole_file_is_bounded_before_parsing() -> None:
    tiny = Limits(max_document_bytes=100, max_apply_documents=2)
    with pytest.raises(ManifestError, match=r"big.yaml: over the 200-byte limit for one file"):
        parse_sourced("#" * 201, "big.yaml", tiny)


# -- DelegationPolicy -------------------------------------------------------------------

DELEGATION = HEADER + textwrap.dedent("""\
    kind: DelegationPolicy
    metadata: {name: tools-via-planner}
    spec:
      callees: [{blueprint: tool}]
      allowedOrigins: [{name: orchestrator}, {user: {issuer: "https://idp.example"}}]
      allowedPaths: [[{name: orchestrator}, "**"]]
    """)


def test_delegation_policy_round_trips_and_is_checked_in_batches() -> None:
    (policy,) = parse_documents(DELEGATION, "d.yaml")
    document = to_document(policy)
    assert document["kind"] == "DelegationPolicy"
    assert parse_resource(document, "x") == policy
    assert parse_json(json.dumps(document), "wire") == policy
    with pytest.raises(ManifestError, match="duplicate DelegationPolicy 'tools-via-planner'"):
        validate_batch([policy, policy], set())
    validate_batch([policy], set())
