"""The snapshot's policy indexes agree with a scan of every policy.

`authorize` checks only the methods of the policies the indexes return (their
selectors match by construction), so an index that filed a policy under the wrong
value would grant a call no policy allows. These properties hold the indexes to
the plain definition, `AccessPolicy.allows`, over random registries built by a
full update and then changed by random deltas (replaced and deleted policies and
agents, selectors shared between policies and repeated within one).
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from trustmesh import wire
from trustmesh.authz import authorize
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb

TD = "spiffe://idx.local/agents/"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
NAMES = ["a", "b", "c", "d", "e"]
BLUEPRINTS = ["bp1", "bp2"]
POLICIES = ["p1", "p2", "p3", "p4", "p5", "p6"]
METHODS = ["/s.S/Read", "/s.S/Write", "/t.T/Read"]
PATTERNS = ["*", "/s.S/*", "/s.S/Read", "/t.T/*"]

attr_maps = st.dictionaries(
    st.sampled_from(["team", "env"]), st.sampled_from(["x", "y"]), max_size=2
)
selectors = st.one_of(
    st.builds(lambda n: pb.Selector(spiffe_id=TD + n), st.sampled_from(NAMES)),
    st.builds(lambda n: pb.Selector(name=n), st.sampled_from(NAMES)),
    st.builds(lambda b: pb.Selector(blueprint=b), st.sampled_from(BLUEPRINTS)),
    st.builds(
        lambda m: pb.Selector(attributes=pb.AttributeMatch(match=m)),
        st.dictionaries(st.sampled_from(["team", "env"]), st.sampled_from(["x", "y"]), min_size=1),
    ),
)
put_policies = st.builds(
    lambda name, callers, callees, methods: rpb.Change(
        put_policy=pb.AccessPolicy(name=name, callers=callers, callees=callees, methods=methods)
    ),
    st.sampled_from(POLICIES),
    st.lists(selectors, min_size=1, max_size=3),
    st.lists(selectors, min_size=1, max_size=3),
    st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2),
)
put_agents = st.builds(
    lambda name, blueprint, attrs: rpb.Change(
        put_agent=pb.Agent(
            name=name,
            spiffe_id=TD + name,
            blueprint=blueprint,
            sponsor="s",
            attributes=attrs,
            state=pb.AGENT_STATE_ACTIVE,
        )
    ),
    st.sampled_from(NAMES),
    st.sampled_from(BLUEPRINTS),
    attr_maps,
)
deletions = st.one_of(
    st.builds(lambda n: rpb.Change(delete_policy=n), st.sampled_from(POLICIES)),
    st.builds(lambda n: rpb.Change(delete_agent=n), st.sampled_from(NAMES)),
)
deltas = st.lists(
    st.lists(st.one_of(put_policies, put_agents, deletions), min_size=1, max_size=4), max_size=4
)


def _snapshot(policies: list[rpb.Change], changes: list[list[rpb.Change]]) -> Snapshot:
    blueprints = [
        rpb.Change(put_blueprint=pb.AgentBlueprint(name=b, allowed_methods=["*"]))
        for b in BLUEPRINTS
    ]
    agents = [
        rpb.Change(
            put_agent=pb.Agent(
                name=n,
                spiffe_id=TD + n,
                blueprint=BLUEPRINTS[i % 2],
                sponsor="s",
                attributes={"team": "xy"[i % 2]},
                state=pb.AGENT_STATE_ACTIVE,
            )
        )
        for i, n in enumerate(NAMES)
    ]
    snap = Snapshot()
    update = rpb.SnapshotUpdate(
        epoch="e", revision=1, full=True, changes=blueprints + agents + policies
    )
    assert snap.apply(update)
    for i, batch in enumerate(changes, start=1):
        update = rpb.SnapshotUpdate(
            epoch="e", revision=i + 1, base_revision=i, full=False, changes=batch
        )
        assert snap.apply(update)
    return snap


@settings(max_examples=300, deadline=None)
@given(st.lists(put_policies, max_size=6), deltas)
def test_candidates_are_exactly_the_policies_whose_selectors_match(
    policies: list[rpb.Change], changes: list[list[rpb.Change]]
) -> None:
    snap = _snapshot(policies, changes)
    every = [p for p in (snap.policy(n) for n in sorted(POLICIES)) if p is not None]
    views = [v for v in (snap.agent_by_name(n) for n in NAMES) if v is not None]
    for caller in views:
        for callee in views:
            scanned = [
                p.name
                for p in every
                if any(s.matches(caller) for s in p.callers)
                and any(s.matches(callee) for s in p.callees)
            ]
            assert [p.name for p in snap.candidate_policies(caller, callee)] == scanned
            for method in METHODS:
                allowed_by = next((p.name for p in every if p.allows(caller, callee, method)), None)
                decision = authorize(caller.spiffe_id, callee.spiffe_id, method, snap, now=NOW)
                assert (decision.allowed, decision.policy or None) == (
                    allowed_by is not None,
                    allowed_by,
                ), (caller.name, callee.name, method)


@settings(max_examples=100, deadline=None)
@given(st.lists(put_policies, max_size=6), deltas)
def test_a_fresh_snapshot_of_the_same_records_indexes_the_same(
    policies: list[rpb.Change], changes: list[list[rpb.Change]]
) -> None:
    """Incremental index maintenance ends where building from scratch does."""
    snap = _snapshot(policies, changes)
    records = [
        rpb.Change(put_blueprint=pb.AgentBlueprint(name=b, allowed_methods=["*"]))
        for b in BLUEPRINTS
    ]

    views = [v for v in (snap.agent_by_name(n) for n in NAMES) if v is not None]
    for v in views:
        msg = pb.Agent(
            name=v.name,
            spiffe_id=str(v.spiffe_id),
            blueprint=v.blueprint,
            sponsor=v.sponsor,
            attributes=v.attributes.to_dict(),
            state=pb.AGENT_STATE_ACTIVE,
        )
        records.append(rpb.Change(put_agent=msg))
    for name in POLICIES:
        p = snap.policy(name)
        if p is not None:
            records.append(rpb.Change(put_policy=wire.policy_to_pb(p)))
    rebuilt = Snapshot()
    assert rebuilt.apply(rpb.SnapshotUpdate(epoch="f", revision=1, full=True, changes=records))
    for caller in views:
        for callee in views:
            got = [p.name for p in snap.candidate_policies(caller, callee)]
            c2 = rebuilt.agent_by_id(SpiffeId.parse(str(caller.spiffe_id)))
            e2 = rebuilt.agent_by_id(SpiffeId.parse(str(callee.spiffe_id)))
            assert c2 is not None and e2 is not None
            assert got == [p.name for p in rebuilt.candidate_policies(c2, e2)]
