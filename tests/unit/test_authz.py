"""authorize() and resolve_target(): every reason, the decision cache, and bounded cost."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from trustmesh.authz import DecisionCache, Target, authorize, decision_cache, resolve_target
from trustmesh.decision import Decision, Reason
from trustmesh.errors import Code
from trustmesh.resources import AccessPolicy
from trustmesh.snapshot import Snapshot
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb

TD = "spiffe://demo.local/agents/"
NOW = datetime(2026, 6, 1, tzinfo=UTC)
EXPIRED_AT = datetime(2026, 1, 1, tzinfo=UTC)
LATER = datetime(2026, 7, 1, tzinfo=UTC)


def sid(name: str) -> SpiffeId:
    return SpiffeId.parse(TD + name)


def agent(
    name: str,
    blueprint: str,
    *,
    disabled: str | None = None,
    expires: datetime | None = None,
    **attrs: str,
) -> rpb.Change:
    return rpb.Change(
        put_agent=pb.Agent(
            name=name,
            spiffe_id=TD + name,
            blueprint=blueprint,
            sponsor="alice@example.com",
            attributes=attrs,
            expires_at=int(expires.timestamp()) if expires else 0,
            state=pb.AGENT_STATE_DISABLED if disabled is not None else pb.AGENT_STATE_ACTIVE,
            disabled_reason=disabled or "",
        )
    )


def blueprint(name: str, *methods: str) -> rpb.Change:
    return rpb.Change(put_blueprint=pb.AgentBlueprint(name=name, allowed_methods=methods))


def policy(name: str, callers: list[str], callees: list[str], *methods: str) -> rpb.Change:
    return rpb.Change(
        put_policy=pb.AccessPolicy(
            name=name,
            callers=[pb.Selector(name=n) for n in callers],
            callees=[pb.Selector(name=n) for n in callees],
            methods=methods,
        )
    )


def endpoint(name: str, instance: str) -> rpb.Change:
    return rpb.Change(
        put_endpoint=pb.Endpoint(
            spiffe_id=TD + name, instance_id=instance, address=f"10.0.0.1:{len(instance)}"
        )
    )


def demo_snapshot() -> Snapshot:
    snap = Snapshot()
    callers = ["orchestrator", "disabled", "expired", "later", "ghost"]
    callees = ["planner", "disabled", "expired", "orphan", "later", "ghost"]
    assert snap.apply(
        rpb.SnapshotUpdate(
            epoch="e1",
            revision=2,
            full=True,
            changes=[
                blueprint("orchestrator", "/demo.Orchestrator/*"),
                blueprint("planner", "/demo.Planner/Plan", "/demo.Planner/Status"),
                agent("orchestrator", "orchestrator"),
                agent("planner", "planner", team="search"),
                agent("disabled", "planner", disabled="compromised key"),
                agent("expired", "planner", expires=EXPIRED_AT),
                agent("later", "planner", expires=LATER),
                agent("rogue", "orchestrator"),  # registered, but no policy names it
                agent("orphan", "deleted-blueprint"),
                # wider than the planner blueprint on purpose: the blueprint is the ceiling
                policy("orchestrator-calls-planner", callers, callees, "/demo.Planner/*"),
                policy(
                    "planner-status",
                    ["planner", "later"],
                    ["orchestrator"],
                    "/demo.Orchestrator/Status",
                ),
                endpoint("planner", "i-1"),
                endpoint("planner", "i-2"),
                endpoint("later", "i-1"),
            ],
        )
    )
    return snap


PLAN = "/demo.Planner/Plan"
CTX = " (call {m} from '" + TD + "{a}' to '" + TD + "{b}')"

AUTHZ_CASES = [
    # (id, caller, callee, method, reason, message)
    (
        "allowed",
        "orchestrator",
        "planner",
        PLAN,
        Reason.ALLOWED,
        f"AccessPolicy 'orchestrator-calls-planner' allows {PLAN} from '{TD}orchestrator' "
        f"to '{TD}planner'",
    ),
    (
        "caller-not-registered",
        "ghost",
        "planner",
        PLAN,
        Reason.AGENT_NOT_REGISTERED,
        f"caller '{TD}ghost' is not a registered agent"
        + CTX.format(m=PLAN, a="ghost", b="planner"),
    ),
    (
        "caller-disabled",
        "disabled",
        "planner",
        PLAN,
        Reason.AGENT_DISABLED,
        f"caller '{TD}disabled' (agent 'disabled') is disabled: compromised key"
        + CTX.format(m=PLAN, a="disabled", b="planner"),
    ),
    (
        "caller-expired",
        "expired",
        "planner",
        PLAN,
        Reason.AGENT_EXPIRED,
        f"caller '{TD}expired' (agent 'expired') expired at 2026-01-01T00:00:00Z"
        + CTX.format(m=PLAN, a="expired", b="planner"),
    ),
    (
        "caller-checked-before-callee",
        "ghost",
        "disabled",
        PLAN,
        Reason.AGENT_NOT_REGISTERED,
        f"caller '{TD}ghost' is not a registered agent",
    ),
    (
        "callee-not-registered",
        "orchestrator",
        "ghost",
        PLAN,
        Reason.AGENT_NOT_REGISTERED,
        f"callee '{TD}ghost' is not a registered agent"
        + CTX.format(m=PLAN, a="orchestrator", b="ghost"),
    ),
    (
        "callee-disabled",
        "orchestrator",
        "disabled",
        PLAN,
        Reason.AGENT_DISABLED,
        f"callee '{TD}disabled' (agent 'disabled') is disabled: compromised key",
    ),
    (
        "callee-expired",
        "orchestrator",
        "expired",
        PLAN,
        Reason.AGENT_EXPIRED,
        f"callee '{TD}expired' (agent 'expired') expired at 2026-01-01T00:00:00Z",
    ),
    (
        "bad-method",
        "orchestrator",
        "planner",
        "/demo.Planner",
        Reason.BAD_METHOD,
        f"'/demo.Planner' is not a gRPC method path (/package.Service/Method): call from "
        f"'{TD}orchestrator' to '{TD}planner'",
    ),
    (
        "method-beyond-blueprint",
        "orchestrator",
        "planner",
        "/demo.Planner/Delete",
        Reason.METHOD_NOT_IN_BLUEPRINT,
        f"/demo.Planner/Delete is not in the allowedMethods of callee's blueprint 'planner': "
        f"/demo.Planner/Delete from '{TD}orchestrator' to '{TD}planner'",
    ),
    (
        "callee-blueprint-missing",
        "orchestrator",
        "orphan",
        PLAN,
        Reason.METHOD_NOT_IN_BLUEPRINT,
        "callee's blueprint 'deleted-blueprint' is not registered, so it serves no methods",
    ),
    (
        "no-policy-for-caller",
        "rogue",
        "planner",
        PLAN,
        Reason.NO_MATCHING_POLICY,
        f"no AccessPolicy allows {PLAN} from '{TD}rogue' to '{TD}planner'",
    ),
    (
        "policy-method-mismatch",
        "planner",
        "orchestrator",
        "/demo.Orchestrator/Run",
        Reason.NO_MATCHING_POLICY,
        f"no AccessPolicy allows /demo.Orchestrator/Run from '{TD}planner' to '{TD}orchestrator'",
    ),
    (
        "policy-direction",
        "planner",
        "planner",
        PLAN,
        Reason.NO_MATCHING_POLICY,
        f"no AccessPolicy allows {PLAN} from '{TD}planner' to '{TD}planner'",
    ),
]


@pytest.mark.parametrize(
    ("caller", "callee", "method", "reason", "message"),
    [c[1:] for c in AUTHZ_CASES],
    ids=[c[0] for c in AUTHZ_CASES],
)
def test_authorize(caller: str, callee: str, method: str, reason: Reason, message: str) -> None:
    decision = authorize(sid(caller), sid(callee), method, demo_snapshot(), now=NOW)
    assert decision.reason is reason
    assert decision.allowed is (reason is Reason.ALLOWED)
    assert message in decision.message
    if decision.allowed:
        assert decision.policy == "orchestrator-calls-planner"
        assert decision.code is Code.OK
    else:
        assert decision.policy is None


def test_empty_policy_set_denies() -> None:
    snap = Snapshot()
    assert snap.apply(
        rpb.SnapshotUpdate(
            epoch="e",
            revision=1,
            full=True,
            changes=[
                blueprint("bp", "*"),
                agent("a", "bp"),
                agent("b", "bp"),
            ],
        )
    )
    decision = authorize(sid("a"), sid("b"), PLAN, snap, now=NOW)
    assert decision.reason is Reason.NO_MATCHING_POLICY


def test_no_snapshot_denies_everything() -> None:
    decision = authorize(sid("a"), sid("b"), PLAN, Snapshot(), now=NOW)
    assert (decision.reason, decision.code) == (Reason.NO_SNAPSHOT, Code.UNAVAILABLE)


def test_now_must_carry_a_timezone() -> None:
    with pytest.raises(ValueError, match="now must be a datetime with a timezone"):
        authorize(sid("a"), sid("b"), PLAN, demo_snapshot(), now=datetime(2026, 1, 1))


# -- the decision cache ---------------------------------------------------------------


def test_repeated_decisions_come_from_the_cache() -> None:
    snap = demo_snapshot()
    first = authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW)
    second = authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW)
    assert first == second and first.allowed
    cache = decision_cache(snap)
    assert (cache.misses, cache.hits, len(cache)) == (1, 1, 1)


def test_delta_that_disables_an_agent_invalidates_the_cache() -> None:
    snap = demo_snapshot()
    assert authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW).allowed
    disable = agent("planner", "planner", disabled="incident 42", team="search")
    assert snap.apply(
        rpb.SnapshotUpdate(epoch="e1", revision=3, base_revision=2, changes=[disable])
    )
    decision = authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW)
    assert decision.reason is Reason.AGENT_DISABLED
    assert "callee" in decision.message and "incident 42" in decision.message


def test_delta_that_removes_the_policy_invalidates_the_cached_allow() -> None:
    snap = demo_snapshot()
    assert authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW).allowed
    assert snap.apply(
        rpb.SnapshotUpdate(
            epoch="e1",
            revision=3,
            base_revision=2,
            changes=[rpb.Change(delete_policy="orchestrator-calls-planner")],
        )
    )
    decision = authorize(sid("orchestrator"), sid("planner"), PLAN, snap, now=NOW)
    assert decision.reason is Reason.NO_MATCHING_POLICY
    assert decision_cache(snap).hits == 0


@pytest.mark.parametrize("role", ["caller", "callee"])
def test_agent_expiring_between_calls_is_denied_with_a_warm_cache(role: str) -> None:
    snap = demo_snapshot()
    a, b, method = (
        ("later", "planner", PLAN) if role == "caller" else ("orchestrator", "later", PLAN)
    )
    before = authorize(sid(a), sid(b), method, snap, now=LATER - timedelta(seconds=1))
    assert before.allowed
    after = authorize(sid(a), sid(b), method, snap, now=LATER)
    assert after.reason is Reason.AGENT_EXPIRED
    assert after.message.startswith(f"{role} '{TD}later' (agent 'later') expired at 2026-07-01")
    assert decision_cache(snap).hits == 0  # denied before the cache was consulted


def test_decision_cache_is_bounded_and_tied_to_a_generation() -> None:
    cache = DecisionCache(max_entries=2)
    allow = Decision.allow("p")
    for key in ("k1", "k2", "k3"):
        assert cache.get(0, key) is None
        cache.put(0, key, allow)
    assert len(cache) == 2
    assert cache.get(0, "k1") is None and cache.get(0, "k3") == allow  # oldest evicted
    assert cache.get(1, "k3") is None and len(cache) == 0  # new generation: emptied
    cache.put(0, "stale", allow)  # computed for an old generation: dropped
    assert len(cache) == 0


# -- bounded cost ---------------------------------------------------------------------


class _NoScan(dict):  # type: ignore[type-arg]
    """A dict that fails the test if anyone iterates over it."""

    def _scan(self, *_: object) -> None:
        raise AssertionError("iterated over a whole snapshot table")

    __iter__ = keys = values = items = _scan  # type: ignore[assignment]


def _mesh(n: int) -> Snapshot:
    """n agents; p{i} lets a{i} call a{i+1} (for the first 10k); q{j} lets team t{j} call a{j}."""
    changes = [blueprint("bp", "/demo.S/*")]
    for i in range(n):
        changes.append(agent(f"a{i}", "bp", team=f"t{i % 1000}", tier="internal"))
    for i in range(min(n, 10_000)):
        changes.append(policy(f"p{i}", [f"a{i}"], [f"a{(i + 1) % n}"], "/demo.S/Call"))
    for j in range(min(n, 1000)):
        changes.append(
            rpb.Change(
                put_policy=pb.AccessPolicy(
                    name=f"q{j}",
                    callers=[
                        pb.Selector(
                            attributes=pb.AttributeMatch(
                                match={"team": f"t{j}", "tier": "internal"}
                            )
                        )
                    ],
                    callees=[pb.Selector(spiffe_id=f"{TD}a{j}")],
                    methods=["/demo.S/Read"],
                )
            )
        )
    snap = Snapshot()
    assert snap.apply(rpb.SnapshotUpdate(epoch="e", revision=1, full=True, changes=changes))
    state = snap._state
    for table in ("agents_by_name", "agents_by_id", "blueprints", "policies"):
        setattr(state, table, _NoScan(getattr(state, table)))
    return snap


@pytest.mark.parametrize("n", [100, 100_000], ids=["100-agents", "100k-agents"])
def test_authorize_cost_does_not_depend_on_registry_size(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    snap = _mesh(n)
    assert snap.counts()["agents"] == n
    evaluated: list[str] = []
    real = AccessPolicy.allows_method

    def counting(p: AccessPolicy, method: str) -> bool:
        evaluated.append(p.name)
        return real(p, method)

    monkeypatch.setattr(AccessPolicy, "allows_method", counting)

    call = authorize(sid("a5"), sid("a6"), "/demo.S/Call", snap, now=NOW)
    assert (call.allowed, call.policy) == (True, "p5")
    read = authorize(sid("a1005" if n > 1005 else "a5"), sid("a5"), "/demo.S/Read", snap, now=NOW)
    assert (read.allowed, read.policy) == (True, "q5")
    denied = authorize(sid("a5"), sid("a7"), "/demo.S/Call", snap, now=NOW)
    assert denied.reason is Reason.NO_MATCHING_POLICY
    # Only the policies naming both agents were looked at, whatever the registry size.
    assert evaluated == ["p5", "q5"]


# -- resolve_target -------------------------------------------------------------------

RESOLVE_CASES = [
    ("empty", "", Reason.MISSING_TARGET, "no target agent given"),
    ("blank", "   ", Reason.MISSING_TARGET, "no target agent given"),
    (
        "unknown-name",
        "nobody",
        Reason.UNKNOWN_TARGET,
        "unknown target 'nobody': no registered agent has this name or SPIFFE ID",
    ),
    ("unknown-id", TD + "nobody", Reason.UNKNOWN_TARGET, f"unknown target '{TD}nobody'"),
    (
        "malformed-id",
        "spiffe://demo.local/a/../b",
        Reason.UNKNOWN_TARGET,
        "unknown target: Invalid SPIFFE ID 'spiffe://demo.local/a/../b'",
    ),
    (
        "disabled",
        "disabled",
        Reason.AGENT_DISABLED,
        f"target '{TD}disabled' (agent 'disabled') is disabled: compromised key",
    ),
    ("expired", "expired", Reason.AGENT_EXPIRED, "expired at 2026-01-01T00:00:00Z"),
    (
        "no-endpoint",
        "orchestrator",
        Reason.NO_ENDPOINT,
        f"target 'orchestrator' ('{TD}orchestrator') has no live instance",
    ),
]


@pytest.mark.parametrize(
    ("target", "reason", "message"),
    [c[1:] for c in RESOLVE_CASES],
    ids=[c[0] for c in RESOLVE_CASES],
)
def test_resolve_target_denials(target: str, reason: Reason, message: str) -> None:
    result = resolve_target(target, demo_snapshot(), now=NOW)
    assert isinstance(result, Decision) and not result.allowed
    assert result.reason is reason
    assert message in result.message


@pytest.mark.parametrize("target", ["planner", TD + "planner"], ids=["by-name", "by-spiffe-id"])
def test_resolve_target_finds_agent_and_endpoints(target: str) -> None:
    result = resolve_target(target, demo_snapshot(), now=NOW)
    assert isinstance(result, Target)
    assert result.agent.spiffe_id == sid("planner")
    assert sorted(e.instance_id for e in result.endpoints) == ["i-1", "i-2"]


def test_resolve_target_without_snapshot() -> None:
    result = resolve_target("planner", Snapshot(), now=NOW)
    assert isinstance(result, Decision) and result.reason is Reason.NO_SNAPSHOT
