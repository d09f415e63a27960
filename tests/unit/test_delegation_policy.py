"""The DelegationPolicy resource: YAML, wire, snapshot indexes, path globs and decisions."""

from __future__ import annotations

import json
import textwrap

import pytest

from trustmesh.decision import Reason
from trustmesh.delegation import AgentOrigin, UserOrigin
from trustmesh.delegation_policy import (
    DelegationPolicy,
    PathElement,
    PathWildcard,
    UserMatch,
    chain_policy_decision,
    match_path,
)
from trustmesh.errors import ManifestError
from trustmesh.manifest import (
    parse_documents,
    parse_json,
    parse_object,
    parse_resource,
    to_document,
)
from trustmesh.resources import (
    AgentView,
    Attributes,
    InvalidResourceError,
    Selector,
    SelectorKind,
)
from trustmesh.snapshot import InvalidSnapshotError, Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.wire import delegation_policy_from_pb, delegation_policy_to_pb

from certs import raises

EXAMPLE = textwrap.dedent("""\
    apiVersion: trustmesh.dev/v1alpha1
    kind: DelegationPolicy
    metadata: {name: tools-via-planner}
    spec:
      callees: [{blueprint: tool}]
      allowedOrigins:
        - {blueprint: orchestrator}
        - {user: {issuer: "https://idp.example", claims: {groups: "analysts"}}}
      allowedPaths:
        - [{blueprint: orchestrator}, {blueprint: planner}]
        - [{blueprint: orchestrator}, "*", "**"]
      maxDepth: 4
      requiredScopes: ["tools:invoke"]
      requireUserOrigin: false
    """)


def bp(name: str) -> Selector:
    return Selector(SelectorKind.BLUEPRINT, name)


def view(name: str, blueprint: str | None = None, **attrs: str) -> AgentView:
    return AgentView(
        name=name,
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/agents/{name}"),
        blueprint=blueprint or name,
        sponsor="s",
        attributes=Attributes(attrs),
    )


POLICY = DelegationPolicy(
    name="tools-via-planner",
    callees=(bp("tool"),),
    allowed_origins=(bp("orchestrator"), UserMatch("https://idp.example", None, (("groups", "analysts"),))),
    allowed_paths=(
        (bp("orchestrator"), bp("planner")),
        (bp("orchestrator"), PathWildcard.ONE, PathWildcard.ANY),
    ),
    max_depth=4,
    required_scopes=("tools:invoke",),
)  # fmt: skip


def test_the_issue_example_parses_and_round_trips() -> None:
    (policy,) = parse_documents(EXAMPLE, "policy.yaml")
    assert policy == POLICY
    document = to_document(policy)
    assert parse_resource(document, "doc") == policy
    assert parse_json(json.dumps(document), "json") == policy
    assert delegation_policy_from_pb(delegation_policy_to_pb(POLICY)) == POLICY


def test_parse_object_reads_it_too() -> None:
    (policy,) = parse_documents(EXAMPLE, "policy.yaml")
    assert parse_object(to_document(policy), "apply#1") == policy


def _spec(**fields: str) -> str:
    spec = {
        "callees": "[{name: tool}]",
        "allowedOrigins": "[{name: o}]",
        "allowedPaths": "[[{name: o}]]",
    }
    spec.update(fields)
    body = "".join(f"  {k}: {v}\n" for k, v in spec.items() if v != "<omit>")
    return (
        "apiVersion: trustmesh.dev/v1alpha1\nkind: DelegationPolicy\nmetadata: {name: p}\n"
        f"spec:\n{body}"
    )


@pytest.mark.parametrize(
    ("text", "field", "problem"),
    [
        (_spec(allowedPaths="<omit>"), "spec.allowedPaths", "is required"),
        (_spec(allowedOrigins="[]"), "spec.allowedOrigins", "must not be empty"),
        (_spec(allowedPaths="[[]]"), "spec.allowedPaths[0]", "must not be empty"),
        (_spec(allowedPaths="[['***']]"), "spec.allowedPaths[0][0]",
         "'***' is neither a selector nor '*' or '**'"),
        (_spec(allowedOrigins="[{usr: {issuer: x}}]"), "spec.allowedOrigins[0].usr",
         "did you mean 'user'?"),
        (_spec(allowedOrigins="[{name: o, user: {issuer: x}}]"), "spec.allowedOrigins[0]",
         "either an agent selector or {user: ...}, not both"),
        (_spec(allowedOrigins="[{user: {subject: a}}]"), "spec.allowedOrigins[0].user.issuer",
         "is required"),
        (_spec(allowedOrigins="[{user: {issuer: x, claims: {groups: [a]}}}]"),
         "spec.allowedOrigins[0].user.claims.groups", "must be a string"),
        (_spec(requireUserOrigin="true"), "spec.allowedOrigins[0]",
         "requireUserOrigin is true: it could never match"),
        (_spec(requireUserOrigin="'yes'"), "spec.requireUserOrigin", "must be true or false"),
        (_spec(maxDepth="0"), "spec.maxDepth", "must be an integer from 1 to 64"),
        (_spec(maxDepth="true"), "spec.maxDepth", "must be an integer, got bool"),
        (_spec(requiredScopes="['a b']"), "spec.requiredScopes", "invalid scope 'a b'"),
        (_spec(requiredScopes="[a, a]"), "spec.requiredScopes", "lists a scope twice"),
        (_spec(callees="[{}]"), "spec.callees[0]", "a selector needs exactly one of"),
        (_spec(allowedPaths="[" + "[" + ", ".join(["'*'"] * 17) + "]]"), "spec.allowedPaths[0]",
         "more than 16 elements"),
    ],
    ids=[
        "paths-required", "origins-empty", "path-empty", "bad-wildcard", "origin-typo",
        "origin-both", "user-no-issuer", "claim-list", "user-required-vs-agent",
        "require-not-bool", "depth-zero", "depth-bool", "bad-scope", "duplicate-scope",
        "empty-selector", "path-too-long",
    ],
)  # fmt: skip
def test_manifest_errors_name_the_field(text: str, field: str, problem: str) -> None:
    with pytest.raises(ManifestError) as info:
        parse_documents(text, "p.yaml")
    assert (info.value.source, info.value.field) == ("p.yaml#1", field)
    assert problem in info.value.problem


def test_minimal_policy_round_trips() -> None:
    (policy,) = parse_documents(_spec(), "p.yaml")
    assert isinstance(policy, DelegationPolicy)
    assert (policy.max_depth, policy.required_scopes, policy.require_user_origin) == (
        None,
        (),
        False,
    )
    assert to_document(policy)["spec"] == {
        "callees": [{"name": "tool"}],
        "allowedOrigins": [{"name": "o"}],
        "allowedPaths": [[{"name": "o"}]],
    }


@pytest.mark.parametrize(
    ("msg", "problem"),
    [
        (pb.DelegationPolicy(name="p", callees=[pb.Selector(name="t")],
                             allowed_origins=[pb.OriginMatch()],
                             allowed_paths=[pb.DelegationPath(elements=[pb.PathElement(
                                 wildcard=pb.PATH_WILDCARD_ANY)])]),
         "no origin field is set"),
        (pb.DelegationPolicy(name="p", callees=[pb.Selector(name="t")],
                             allowed_origins=[pb.OriginMatch(agent=pb.Selector(name="o"))],
                             allowed_paths=[pb.DelegationPath(elements=[pb.PathElement(
                                 wildcard=pb.PATH_WILDCARD_UNSPECIFIED)])]),
         "unknown wildcard 0"),
        (pb.DelegationPolicy(name="p", callees=[pb.Selector(name="t")],
                             allowed_origins=[pb.OriginMatch(agent=pb.Selector(name="o"))]),
         "spec.allowedPaths: must list at least one path"),
    ],
    ids=["origin-unset", "wildcard-unspecified", "no-paths"],
)  # fmt: skip
def test_from_pb_validates(msg: pb.DelegationPolicy, problem: str) -> None:
    with raises(InvalidResourceError, problem):
        delegation_policy_from_pb(msg)


# -- paths --------------------------------------------------------------------------------

ORCH, P, T, W = (
    view("o", "orchestrator"),
    view("p", "planner"),
    view("t", "tool"),
    view("w", "worker"),
)
ANY, ONE = PathWildcard.ANY, PathWildcard.ONE


@pytest.mark.parametrize(
    ("pattern", "issuers", "matches"),
    [
        ((bp("orchestrator"), bp("planner")), [ORCH, P], True),
        ((bp("orchestrator"), bp("planner")), [ORCH], False),
        ((bp("orchestrator"), bp("planner")), [ORCH, P, W], False),
        ((bp("orchestrator"), ONE), [ORCH, W], True),
        ((bp("orchestrator"), ONE), [ORCH], False),
        ((bp("orchestrator"), ANY), [ORCH], True),
        ((bp("orchestrator"), ANY), [ORCH, P, W, W], True),
        ((ANY, bp("planner")), [ORCH, W, P], True),
        ((ANY, bp("planner")), [ORCH, P, W], False),
        ((bp("orchestrator"), ANY, bp("planner"), ANY), [ORCH, W, W, P], True),
        ((ANY, ANY, ONE), [ORCH], True),
        ((ANY,), [], True),
        ((ONE,), [], False),
    ],
    ids=["exact", "too-short", "too-long", "one", "one-missing", "any-empty", "any-run",
         "leading-any", "anchored-end", "two-runs", "runs-and-one", "any-nothing", "one-nothing"],
)  # fmt: skip
def test_path_globs(
    pattern: tuple[PathElement, ...], issuers: list[AgentView], matches: bool
) -> None:
    assert match_path(pattern, issuers) is matches


# -- decisions ----------------------------------------------------------------------------

ALICE = UserOrigin("https://idp.example", "alice", (("groups", ("analysts", "staff")),))
BOB = UserOrigin("https://idp.example", "bob", (("groups", ("viewers",)),))
SCOPES = frozenset({"tools:invoke"})


@pytest.mark.parametrize(
    ("origin", "issuers", "scopes", "reason"),
    [
        (AgentOrigin(ORCH.spiffe_id), [ORCH, P], SCOPES, Reason.ALLOWED),
        (ALICE, [ORCH, P], SCOPES, Reason.ALLOWED),
        (BOB, [ORCH, P], SCOPES, Reason.CHAIN_ORIGIN_NOT_ALLOWED),
        (AgentOrigin(P.spiffe_id), [P, ORCH], SCOPES, Reason.CHAIN_ORIGIN_NOT_ALLOWED),
        (AgentOrigin(ORCH.spiffe_id), [ORCH, T], SCOPES, Reason.ALLOWED),
        (AgentOrigin(ORCH.spiffe_id), [ORCH], SCOPES, Reason.CHAIN_PATH_NOT_ALLOWED),
        (AgentOrigin(ORCH.spiffe_id), [ORCH, W, W, W, W], SCOPES, Reason.CHAIN_TOO_DEEP),
        (AgentOrigin(ORCH.spiffe_id), [ORCH, P], frozenset({"read"}), Reason.CHAIN_SCOPE_ESCALATION),
    ],
    ids=["agent", "user", "user-wrong-group", "wrong-origin", "one-then-any", "path",
         "policy-depth", "required-scope"],
)  # fmt: skip
def test_policy_decisions(
    origin: AgentOrigin | UserOrigin,
    issuers: list[AgentView],
    scopes: frozenset[str],
    reason: Reason,
) -> None:
    origin_agent = issuers[0] if isinstance(origin, AgentOrigin) else None
    decision = chain_policy_decision([POLICY], T, origin, origin_agent, issuers, scopes)
    assert decision.reason is reason, decision.message
    if reason is not Reason.ALLOWED:
        assert decision.policy == "tools-via-planner"


def test_no_policy_for_the_callee_denies_and_the_closest_policy_explains() -> None:
    none = chain_policy_decision([POLICY], W, AgentOrigin(ORCH.spiffe_id), ORCH, [ORCH, P], SCOPES)
    assert none.reason is Reason.CHAIN_ORIGIN_NOT_ALLOWED and none.policy is None
    assert "no DelegationPolicy selects callee" in none.message
    users_only = DelegationPolicy(
        name="a-users", callees=(bp("tool"),), allowed_origins=(UserMatch("https://idp.example"),),
        allowed_paths=((ANY,),), require_user_origin=True,
    )  # fmt: skip
    both = chain_policy_decision(
        [users_only, POLICY], T, AgentOrigin(ORCH.spiffe_id), ORCH, [ORCH, P], frozenset()
    )
    # a-users fails at the origin; tools-via-planner gets further (to the scopes)
    assert (both.reason, both.policy) == (Reason.CHAIN_SCOPE_ESCALATION, "tools-via-planner")
    assert "requires scopes tools:invoke" in both.message


# -- snapshot -------------------------------------------------------------------------------


def _put(policy: DelegationPolicy) -> rpb.Change:
    return rpb.Change(put_delegation_policy=delegation_policy_to_pb(policy))


def test_snapshot_indexes_policies_by_callee_and_forwarder() -> None:
    leaf = DelegationPolicy(
        name="leaf", callees=(Selector(SelectorKind.ATTRIBUTES, Attributes({"tier": "tool"})),),
        allowed_origins=(bp("orchestrator"),), allowed_paths=((bp("orchestrator"), bp("planner")),),
    )  # fmt: skip
    snap = Snapshot()
    assert snap.apply(rpb.SnapshotUpdate(epoch="e", revision=1, full=True, changes=[_put(leaf)]))
    tool = view("t", "tool", tier="tool")
    assert [p.name for p in snap.delegation_policies_for(tool)] == ["leaf"]
    assert snap.delegation_policies_for(view("t2", "tool")) == []
    assert snap.can_delegate_onward(P) and not snap.can_delegate_onward(tool)
    assert not snap.can_delegate_onward(ORCH)  # only ever at position 0
    # a wildcard after the first position lets anyone forward; deleting it undoes that
    assert snap.apply(
        rpb.SnapshotUpdate(epoch="e", revision=2, base_revision=1, changes=[_put(POLICY)])
    )
    assert snap.can_delegate_onward(tool) and snap.delegation_policy("tools-via-planner") == POLICY
    assert [p.name for p in snap.delegation_policies_for(T)] == ["tools-via-planner"]
    gone = rpb.Change(delete_delegation_policy="tools-via-planner")
    assert snap.apply(rpb.SnapshotUpdate(epoch="e", revision=3, base_revision=2, changes=[gone]))
    assert not snap.can_delegate_onward(tool) and snap.delegation_policies_for(T) == []


def test_a_shallow_policy_lets_no_one_forward() -> None:
    shallow = DelegationPolicy(
        name="s", callees=(bp("tool"),), allowed_origins=(bp("orchestrator"),),
        allowed_paths=((ANY,),), max_depth=1,
    )  # fmt: skip
    snap = Snapshot()
    assert snap.apply(rpb.SnapshotUpdate(epoch="e", revision=1, full=True, changes=[_put(shallow)]))
    assert not snap.can_delegate_onward(P)


def test_invalid_delegation_policy_change_is_rejected() -> None:
    bad = rpb.Change(put_delegation_policy=pb.DelegationPolicy(name="Bad"))
    with raises(InvalidSnapshotError, "invalid change #1 (put_delegation_policy)"):
        Snapshot().apply(rpb.SnapshotUpdate(epoch="e", revision=1, full=True, changes=[bad]))
