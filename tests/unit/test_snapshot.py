"""Snapshot: full and delta updates, incremental indexes, and the wire conversions."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

import trustmesh.snapshot as snapshot_module
from trustmesh.errors import InvalidSpiffeIdError
from trustmesh.resources import (
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
from trustmesh.snapshot import InvalidSnapshotError, Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh.wire import (
    agent_from_pb,
    agent_to_pb,
    blueprint_from_pb,
    blueprint_to_pb,
    policy_from_pb,
    policy_to_pb,
)

TD = "spiffe://demo.local/agents/"


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(TD + name)


def put_agent(name: str, blueprint: str = "bp", **attrs: str) -> rpb.Change:
    return rpb.Change(
        put_agent=pb.Agent(
            name=name,
            spiffe_id=TD + name,
            blueprint=blueprint,
            sponsor="alice",
            attributes=attrs,
            state=pb.AGENT_STATE_ACTIVE,
        )
    )


def put_blueprint(name: str = "bp", *methods: str) -> rpb.Change:
    return rpb.Change(put_blueprint=pb.AgentBlueprint(name=name, allowed_methods=methods or ["*"]))


def put_policy(name: str, callers: list[pb.Selector], callees: list[pb.Selector]) -> rpb.Change:
    return rpb.Change(
        put_policy=pb.AccessPolicy(name=name, callers=callers, callees=callees, methods=["*"])
    )


def put_endpoint(name: str, instance: str, address: str = "127.0.0.1:1") -> rpb.Change:
    return rpb.Change(
        put_endpoint=pb.Endpoint(spiffe_id=TD + name, instance_id=instance, address=address)
    )


def full(epoch: str, revision: int, *changes: rpb.Change) -> rpb.SnapshotUpdate:
    return rpb.SnapshotUpdate(epoch=epoch, revision=revision, full=True, changes=changes)


def delta(epoch: str, base: int, revision: int, *changes: rpb.Change) -> rpb.SnapshotUpdate:
    return rpb.SnapshotUpdate(
        epoch=epoch, revision=revision, base_revision=base, full=False, changes=changes
    )


def started() -> Snapshot:
    snap = Snapshot()
    assert snap.apply(
        full("e1", 10, put_blueprint(), put_agent("a"), put_agent("b"), put_endpoint("a", "i1"))
    )
    return snap


def test_full_snapshot_fills_every_view() -> None:
    snap = started()
    assert (snap.ready, snap.epoch, snap.revision, snap.generation) == (True, "e1", 10, 1)
    assert snap.counts() == {
        "agents": 2,
        "blueprints": 1,
        "policies": 0,
        "endpoints": 1,
        "bundles": 0,
    }
    by_id = snap.agent_by_id(sid("a"))
    assert by_id is not None and by_id is snap.agent_by_name("a")
    assert snap.agent_by_id(sid("zzz")) is None
    assert snap.blueprint("bp") is not None
    assert [e.address for e in snap.endpoints(sid("a"))] == ["127.0.0.1:1"]
    assert snap.endpoints(sid("b")) == ()


def test_delta_on_the_right_base_applies() -> None:
    snap = started()
    assert snap.apply(delta("e1", 10, 11, put_agent("c"), rpb.Change(delete_agent="a")))
    assert (snap.revision, snap.generation) == (11, 2)
    assert snap.agent_by_name("c") is not None
    assert snap.agent_by_name("a") is None and snap.agent_by_id(sid("a")) is None


@pytest.mark.parametrize(
    "update",
    [
        delta("e1", 9, 11, put_agent("c")),
        delta("e1", 11, 12, put_agent("c")),
        delta("e0", 10, 11, put_agent("c")),
        delta("e1", 10, 9, put_agent("c")),
    ],
    ids=["base-behind", "base-ahead", "other-epoch", "revision-before-base"],
)
def test_delta_that_does_not_fit_is_rejected_unchanged(update: rpb.SnapshotUpdate) -> None:
    snap = started()
    assert snap.apply(update) is False
    assert (snap.revision, snap.generation) == (10, 1)
    assert snap.agent_by_name("c") is None


def test_delta_before_any_full_snapshot_is_rejected() -> None:
    snap = Snapshot()
    assert snap.apply(delta("", 0, 1, put_agent("c"))) is False
    assert not snap.ready


def test_full_snapshot_after_epoch_change_replaces_everything() -> None:
    snap = started()
    assert snap.apply(full("e2", 3, put_blueprint(), put_agent("z")))
    assert (snap.epoch, snap.revision, snap.generation) == ("e2", 3, 2)
    assert snap.agent_by_name("a") is None and snap.agent_by_id(sid("a")) is None
    assert snap.endpoints(sid("a")) == ()
    assert snap.counts()["agents"] == 1
    assert snap.apply(delta("e2", 3, 4, put_agent("y")))


def test_put_agent_with_new_id_drops_the_old_id() -> None:
    snap = started()
    moved = put_agent("a")
    moved.put_agent.spiffe_id = TD + "a2"
    assert snap.apply(delta("e1", 10, 11, moved))
    assert snap.agent_by_id(sid("a")) is None
    found = snap.agent_by_id(sid("a2"))
    assert found is not None and found.name == "a"


def test_endpoints_are_kept_per_instance() -> None:
    snap = started()
    assert snap.apply(
        delta(
            "e1",
            10,
            11,
            put_endpoint("a", "i2", "10.0.0.2:1"),
            put_endpoint("a", "i1", "10.0.0.1:1"),
        )
    )
    assert sorted(e.address for e in snap.endpoints(sid("a"))) == ["10.0.0.1:1", "10.0.0.2:1"]
    assert snap.counts()["endpoints"] == 2
    gone = rpb.Change(delete_endpoint=pb.Endpoint(spiffe_id=TD + "a", instance_id="i1"))
    assert snap.apply(delta("e1", 11, 12, gone, gone))
    assert [e.instance_id for e in snap.endpoints(sid("a"))] == ["i2"]
    assert snap.counts()["endpoints"] == 1


def test_bundles_are_der_by_trust_domain() -> None:
    snap = started()
    bundle = pb.TrustBundle(trust_domain="demo.local", x509_authorities=[b"\x30\x01", b"\x30\x02"])
    assert snap.apply(delta("e1", 10, 11, rpb.Change(put_bundle=bundle)))
    assert snap.bundles() == {"demo.local": (b"\x30\x01", b"\x30\x02")}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            rpb.Change(
                put_agent=pb.Agent(name="x", spiffe_id="http://x", blueprint="bp", sponsor="s")
            ),
            "Invalid SPIFFE ID 'http://x'",
        ),
        (
            rpb.Change(put_blueprint=pb.AgentBlueprint(name="bp2", allowed_methods=["/x"])),
            "invalid method pattern '/x'",
        ),
        (
            rpb.Change(
                put_policy=pb.AccessPolicy(
                    name="p",
                    callers=[pb.Selector()],
                    callees=[pb.Selector(name="a")],
                    methods=["*"],
                )
            ),
            "no selector field is set",
        ),
        (rpb.Change(put_endpoint=pb.Endpoint(spiffe_id=TD + "a")), "instance_id: must not be"),
        (rpb.Change(), "no change field is set"),
    ],
    ids=[
        "agent-bad-id",
        "blueprint-bad-method",
        "policy-empty-selector",
        "endpoint-no-instance",
        "empty-change",
    ],
)
def test_invalid_change_raises_and_changes_nothing(bad: rpb.Change, message: str) -> None:
    snap = started()
    with pytest.raises(InvalidSnapshotError, match="invalid change #2") as info:
        snap.apply(delta("e1", 10, 11, put_agent("c"), bad))
    assert message in str(info.value)
    assert info.value.reason == "invalid_snapshot"
    assert (snap.revision, snap.generation) == (10, 1)
    assert snap.agent_by_name("c") is None


def _view(name: str, blueprint: str = "bp", **attrs: str) -> AgentView:
    return AgentView(
        name=name,
        spiffe_id=sid(name),
        blueprint=blueprint,
        sponsor="s",
        attributes=Attributes(attrs),
    )


ALICE = _view("alice", "worker", team="search", tier="internal")
BOB = _view("bob", "tool", team="search")


@pytest.mark.parametrize(
    ("callers", "callees", "found"),
    [
        ([pb.Selector(name="alice")], [pb.Selector(name="bob")], True),
        ([pb.Selector(spiffe_id=TD + "alice")], [pb.Selector(spiffe_id=TD + "bob")], True),
        ([pb.Selector(blueprint="worker")], [pb.Selector(blueprint="tool")], True),
        (
            [
                pb.Selector(
                    attributes=pb.AttributeMatch(match={"team": "search", "tier": "internal"})
                )
            ],
            [pb.Selector(attributes=pb.AttributeMatch(match={"team": "search"}))],
            True,
        ),
        (
            [pb.Selector(attributes=pb.AttributeMatch(match={"team": "search", "tier": "gold"}))],
            [pb.Selector(name="bob")],
            False,
        ),
        ([pb.Selector(name="carol"), pb.Selector(name="alice")], [pb.Selector(name="bob")], True),
        ([pb.Selector(name="alice")], [pb.Selector(name="carol")], False),
        ([pb.Selector(name="bob")], [pb.Selector(name="alice")], False),
    ],
    ids=[
        "name",
        "spiffe-id",
        "blueprint",
        "attributes",
        "attributes-partial-match",
        "any-of",
        "callee-mismatch",
        "reversed",
    ],
)
def test_candidate_policies_by_selector_kind(
    callers: list[pb.Selector], callees: list[pb.Selector], found: bool
) -> None:
    snap = Snapshot()
    assert snap.apply(full("e", 1, put_policy("p", callers, callees)))
    names = [p.name for p in snap.candidate_policies(ALICE, BOB)]
    assert names == (["p"] if found else [])


def test_policy_replace_and_delete_update_the_indexes() -> None:
    snap = Snapshot()
    assert snap.apply(
        full("e", 1, put_policy("p", [pb.Selector(name="alice")], [pb.Selector(name="bob")]))
    )
    assert snap.apply(
        delta("e", 1, 2, put_policy("p", [pb.Selector(name="carol")], [pb.Selector(name="bob")]))
    )
    assert snap.candidate_policies(ALICE, BOB) == []
    assert [p.name for p in snap.candidate_policies(_view("carol"), BOB)] == ["p"]
    assert snap.apply(delta("e", 2, 3, rpb.Change(delete_policy="p")))
    assert snap.candidate_policies(_view("carol"), BOB) == []
    assert snap.policy("p") is None


class _Counter:
    def __init__(self) -> None:
        self.calls = 0


def test_a_one_record_delta_costs_o_of_the_change(monkeypatch: pytest.MonkeyPatch) -> None:
    n = 5000
    changes = [put_blueprint()]
    changes += [put_agent(f"a{i}") for i in range(n)]
    changes += [
        put_policy(f"p{i}", [pb.Selector(name=f"a{i}")], [pb.Selector(name="a0")]) for i in range(n)
    ]
    snap = Snapshot()
    assert snap.apply(full("e", 1, *changes))

    decoded, indexed = _Counter(), _Counter()
    real_from_pb = agent_from_pb
    real_add = snapshot_module._SelectorIndex.add

    def counting_from_pb(msg: pb.Agent, pool: object = None) -> AgentView:
        decoded.calls += 1
        return real_from_pb(msg, pool)  # type: ignore[arg-type]

    def counting_add(self: object, policy: object, selectors: object) -> None:
        indexed.calls += 1
        real_add(self, policy, selectors)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot_module, "agent_from_pb", counting_from_pb)
    monkeypatch.setattr(snapshot_module._SelectorIndex, "add", counting_add)
    assert snap.apply(delta("e", 1, 2, put_agent("a7", tier="gold")))
    assert (decoded.calls, indexed.calls) == (1, 0)
    assert snap.apply(
        delta("e", 2, 3, put_policy("new", [pb.Selector(name="a1")], [pb.Selector(name="a2")]))
    )
    assert (decoded.calls, indexed.calls) == (1, 2)  # one caller side, one callee side
    assert snap.counts()["policies"] == n + 1


# -- wire ------------------------------------------------------------------------------

BLUEPRINT = AgentBlueprint(
    name="planner",
    allowed_methods=(MethodPattern.parse("/demo.Planner/*"),),
    description="Plans",
    default_attributes=Attributes({"team": "search", "tier": "internal"}),
)
AGENT = Agent(
    name="planner",
    spiffe_id=sid("planner"),
    blueprint="planner",
    sponsor="alice",
    owners=("team-search",),
    attributes=Attributes({"tier": "critical"}),
    expires_at=datetime(2027, 1, 1, 0, 0, 0, 900000, tzinfo=UTC),
)


def test_agent_to_pb_publishes_effective_attributes_and_state() -> None:
    msg = agent_to_pb(AGENT, BLUEPRINT, disabled=True, disabled_reason="compromised")
    assert dict(msg.attributes) == {"team": "search", "tier": "critical"}
    assert msg.expires_at == 1798761600  # rounded down, never later
    assert (msg.state, msg.disabled_reason) == (pb.AGENT_STATE_DISABLED, "compromised")
    view = agent_from_pb(msg)
    assert view.attributes == Attributes({"team": "search", "tier": "critical"})
    assert view.expires_at == datetime(2027, 1, 1, tzinfo=UTC)
    assert (view.state, view.disabled_reason) == (AgentState.DISABLED, "compromised")


def test_agent_without_blueprint_or_expiry() -> None:
    plain = Agent(name="a", spiffe_id=sid("a"), blueprint="bp", sponsor="s")
    msg = agent_to_pb(plain, None, disabled=False, disabled_reason="ignored")
    assert (msg.expires_at, msg.state, msg.disabled_reason) == (0, pb.AGENT_STATE_ACTIVE, "")
    view = agent_from_pb(msg)
    assert (view.expires_at, view.disabled) == (None, False)


def test_unspecified_state_reads_as_disabled() -> None:
    msg = agent_to_pb(AGENT, BLUEPRINT, disabled=False, disabled_reason="")
    msg.state = pb.AGENT_STATE_UNSPECIFIED
    view = agent_from_pb(msg)
    assert view.disabled and view.disabled_reason == "the registry sent no state"


def test_blueprint_and_policy_round_trip() -> None:
    policy = AccessPolicy(
        name="p",
        callers=(
            Selector(SelectorKind.NAME, "a"),
            Selector(SelectorKind.SPIFFE_ID, sid("x")),
            Selector(SelectorKind.BLUEPRINT, "bp"),
            Selector(SelectorKind.ATTRIBUTES, Attributes({"team": "search"})),
        ),
        callees=(Selector(SelectorKind.NAME, "b"),),
        methods=(MethodPattern.parse("/demo.Planner/Plan"), MethodPattern.parse("*")),
    )
    assert policy_from_pb(policy_to_pb(policy)) == policy
    assert blueprint_from_pb(blueprint_to_pb(BLUEPRINT)) == BLUEPRINT


@pytest.mark.parametrize(
    ("msg", "error", "message"),
    [
        (
            pb.Agent(
                name="a", spiffe_id="spiffe://d/a", blueprint="bp", sponsor="s", expires_at=-5
            ),
            InvalidResourceError,
            "expires_at: -5 is not a valid time",
        ),
        (
            pb.Agent(name="A", spiffe_id="spiffe://d/a", blueprint="bp", sponsor="s"),
            InvalidResourceError,
            "metadata.name: invalid name 'A'",
        ),
        (
            pb.Agent(name="a", spiffe_id="spiffe://d/a/", blueprint="bp", sponsor="s"),
            InvalidSpiffeIdError,
            "Invalid SPIFFE ID 'spiffe://d/a/'",
        ),
    ],
    ids=["negative-expiry", "bad-name", "bad-spiffe-id"],
)
def test_agent_from_pb_validates(msg: pb.Agent, error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        agent_from_pb(msg)
    assert message in str(info.value)


def test_delegation_policies_apply_in_full_and_delta_updates() -> None:
    policy = pb.DelegationPolicy(
        name="d",
        callees=[pb.Selector(name="b")],
        allowed_origins=[pb.OriginMatch(agent=pb.Selector(name="a"))],
        allowed_paths=[pb.DelegationPath(elements=[pb.PathElement(agent=pb.Selector(name="a"))])],
    )
    snap = started()
    assert snap.apply(delta("e1", 10, 11, rpb.Change(put_delegation_policy=policy)))
    b = snap.agent_by_name("b")
    assert b is not None
    assert [p.name for p in snap.delegation_policies_for(b)] == ["d"]
    assert snap.counts()["policies"] == 0  # AccessPolicies only
    assert snap.apply(delta("e1", 11, 12, rpb.Change(delete_delegation_policy="d")))
    assert snap.delegation_policies_for(b) == [] and snap.delegation_policy("d") is None
