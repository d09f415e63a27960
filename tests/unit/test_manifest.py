"""Resource documents: parsing, round trips, method patterns, batches.

Every error naming file and field is in test_manifest_errors.py.
"""

from __future__ import annotations

import json
import re
import textwrap
from datetime import UTC, datetime

import pytest

from trustmesh.errors import ManifestError
from trustmesh.limits import DEFAULT_LIMITS
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

from manifest_docs import AGENT, BLUEPRINT, HEADER, POLICY


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
