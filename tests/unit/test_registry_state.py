"""RegistryState over the in-memory store: verbs, change log, watchers, ownership of IDs."""

from __future__ import annotations

import asyncio
import threading
from datetime import timedelta
from typing import Any

import pytest

import trustmesh_registry.state as state_module
from trustmesh.errors import ManifestError
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import resources_pb2 as pb
from trustmesh_registry.service import Issuer
from trustmesh_registry.state import RegistryState, Watcher
from trustmesh_registry.store import MemoryStore

from certs import NOW, make_ca, raises

TD = "test.local"
API = "trustmesh.dev/v1alpha1"
REGISTRY_ID = SpiffeId.parse(f"spiffe://{TD}/trustmesh/registry")


def bp(name: str = "any", methods: list[str] | None = None) -> tuple[str, dict[str, Any]]:
    return (
        f"bp/{name}",
        {
            "apiVersion": API,
            "kind": "AgentBlueprint",
            "metadata": {"name": name},
            "spec": {"allowedMethods": methods or ["*"]},
        },
    )


def ag(name: str, spiffe_id: str | None = None, **spec: Any) -> tuple[str, dict[str, Any]]:
    return (
        f"agent/{name}",
        {
            "apiVersion": API,
            "kind": "Agent",
            "metadata": {"name": name},
            "spec": {
                "spiffeId": spiffe_id or f"spiffe://{TD}/agents/{name}",
                "blueprint": "any",
                "sponsor": "s@example.com",
                **spec,
            },
        },
    )


@pytest.fixture(scope="module")
def issuer() -> Issuer:
    """The registry's own reserved-ID rule (Issuer.is_reserved), with a throwaway CA."""
    return Issuer(
        make_ca(TD),
        REGISTRY_ID,
        lambda: [],
        lambda: NOW,
        svid_ttl=timedelta(hours=1),
        operator_ttl=timedelta(days=1),
    )


@pytest.fixture
def state(issuer: Issuer) -> RegistryState:
    return RegistryState(MemoryStore(), lambda: [], reserved_ids=issuer.is_reserved, log_size=8)


# -- apply verbs ------------------------------------------------------------------------------


def test_apply_verbs(state: RegistryState) -> None:
    assert state.apply([bp(), ag("alice")]).applied == [
        "AgentBlueprint/any created",
        "Agent/alice created",
    ]
    rev = state.revision
    unchanged = state.apply([bp(), ag("alice")])
    assert unchanged.applied == ["AgentBlueprint/any unchanged", "Agent/alice unchanged"]
    assert unchanged.revision == rev == state.revision  # no write, no update
    changed = state.apply([bp(), ag("alice", owners=["o@example.com"])])
    assert changed.applied == ["AgentBlueprint/any unchanged", "Agent/alice configured"]
    assert changed.revision == rev + 1


def test_dry_run_writes_nothing() -> None:
    store = MemoryStore()
    st = RegistryState(store, lambda: [])
    assert st.apply([bp(), ag("alice")], dry_run=True).applied == [
        "AgentBlueprint/any created",
        "Agent/alice created",
    ]
    assert (st.revision, st.agents, store.state.documents) == (0, {}, {})


def test_state_reloads_from_the_store() -> None:
    store = MemoryStore()
    first = RegistryState(store, lambda: [])
    first.apply([bp(), ag("alice")])
    first.set_agent_state("alice", disabled=True, reason="r")
    second = RegistryState(store, lambda: [])
    assert second.epoch != first.epoch
    (doc,) = second.documents("agents", "alice")
    assert doc["status"]["state"] == "Disabled"
    assert doc["status"]["disabledReason"] == "r"


# -- the change log ------------------------------------------------------------------------------


def _bump(state: RegistryState, n: int) -> None:
    for i in range(n):
        state.set_agent_state("alice", disabled=bool(i % 2 == 0), reason=f"r{i}")


def test_updates_since_resumes_with_deltas(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    base = state.revision
    _bump(state, 3)
    updates = state.updates_since(state.epoch, base)
    assert updates is not None
    assert [(u.base_revision, u.revision) for u in updates] == [
        (base, base + 1),
        (base + 1, base + 2),
        (base + 2, base + 3),
    ]
    assert all(not u.full and len(u.changes) == 1 for u in updates)
    assert state.updates_since(state.epoch, state.revision) == []


@pytest.mark.parametrize(
    ("epoch", "revision"),
    [("other-epoch", 1), ("", 0), ("SAME", 0), ("SAME", 999)],
    ids=["unknown-epoch", "empty-epoch", "too-old", "from-the-future"],
)
def test_updates_since_needs_a_full_snapshot(
    state: RegistryState, epoch: str, revision: int
) -> None:
    state.apply([bp(), ag("alice")])
    _bump(state, 10)  # the log keeps 8 updates: revision 0..3 have fallen off
    assert state.updates_since(state.epoch if epoch == "SAME" else epoch, revision) is None


def test_updates_since_at_the_edge_of_the_log(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    _bump(state, 10)  # revisions 4..11 are kept, as deltas from 3..10
    assert state.updates_since(state.epoch, 2) is None
    kept = state.updates_since(state.epoch, 3)
    assert kept is not None
    assert [u.revision for u in kept] == list(range(4, 12))


def test_full_snapshot_is_marked_full(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    snap = state.full_snapshot()
    assert snap.full
    assert (snap.epoch, snap.revision) == (state.epoch, state.revision)
    kinds = sorted(c.WhichOneof("change") for c in snap.changes)
    assert kinds == ["put_agent", "put_blueprint"]


def _fold(updates: list[rpb.SnapshotUpdate | bytes]) -> dict[tuple[str, str], bytes]:
    """What a watcher holds after applying `updates`: resource (kind, key) -> message."""
    held: dict[tuple[str, str], bytes] = {}
    for raw in updates:
        update = rpb.SnapshotUpdate.FromString(raw) if isinstance(raw, bytes) else raw
        if update.full:
            held.clear()
        for change in update.changes:
            which = change.WhichOneof("change")
            assert which is not None
            verb, kind = which.split("_", 1)
            value = getattr(change, which)
            key = value if isinstance(value, str) else (
                f"{value.spiffe_id}|{value.instance_id}" if kind == "endpoint"
                else getattr(value, "trust_domain", "") or value.name)  # fmt: skip
            if verb == "put":
                held[(kind, key)] = value.SerializeToString()
            else:
                held.pop((kind, key), None)
    return held


def test_full_backlog_is_built_once_and_caught_up_with_deltas(state: RegistryState) -> None:
    state.apply([bp(), ag("alice"), ag("bob")])
    first, sent = state.full_backlog()
    assert sent == state.revision and len(first) == 1 and isinstance(first[0], bytes)
    state.put_endpoint(pb.Endpoint(spiffe_id=f"spiffe://{TD}/agents/alice", instance_id="i",
                                       address="127.0.0.1:1"))  # fmt: skip
    state.set_agent_state("bob", disabled=True, reason="r")
    second, sent = state.full_backlog()
    assert second[0] is first[0]  # the same serialized snapshot, not built again
    assert [u.revision for u in second[1:] if isinstance(u, rpb.SnapshotUpdate)] == [sent - 1, sent]
    assert _fold(second) == _fold([state.full_snapshot()])
    assert ("endpoint", f"spiffe://{TD}/agents/alice|i") in _fold(second)


@pytest.mark.parametrize(
    ("changes", "max_deltas"),
    [(3, 2), (10, 256)],
    ids=["more-deltas-than-allowed", "deltas-fell-off-the-log"],
)
def test_full_backlog_is_rebuilt(state: RegistryState, changes: int, max_deltas: int) -> None:
    state.apply([bp(), ag("alice")])
    first, _ = state.full_backlog()
    _bump(state, changes)  # the log keeps 8 updates
    again, sent = state.full_backlog(max_deltas=max_deltas)
    assert len(again) == 1 and again[0] is not first[0] and sent == state.revision
    assert _fold(again) == _fold([state.full_snapshot()])


def test_full_backlog_follows_bundles_that_change_without_a_revision() -> None:
    """With SPIFFE credentials the Workload API rotates bundles on its own schedule."""
    current = [pb.TrustBundle(trust_domain=TD, x509_authorities=[b"OLD-CA"])]
    state = RegistryState(MemoryStore(), lambda: list(current))
    first, _ = state.full_backlog()
    current[:] = [pb.TrustBundle(trust_domain=TD, x509_authorities=[b"NEW-CA"])]
    again, _ = state.full_backlog()
    assert again[0] is not first[0]
    assert _fold(again)[("bundle", TD)] == current[0].SerializeToString()


async def test_full_backlog_async_builds_off_the_loop_once_and_catches_up(
    state: RegistryState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Watchers arriving during a build share it; a write the loop takes meanwhile (it
    does: the build waits in its thread until the write is in) reaches them as a delta."""
    state.apply([bp(), ag("alice"), ag("bob")])
    built_at: list[int] = []
    started, release = threading.Event(), threading.Event()
    real = state_module._serialized

    def held_build(records: Any) -> Any:
        built_at.append(records.revision)
        started.set()
        assert release.wait(10)
        return real(records)

    monkeypatch.setattr(state_module, "_serialized", held_build)
    first = asyncio.ensure_future(state.full_backlog_async())
    second = asyncio.ensure_future(state.full_backlog_async())
    while not started.is_set():
        await asyncio.sleep(0.001)
    state.set_agent_state("bob", disabled=True, reason="r")  # the loop is not blocked
    release.set()
    (a, sent_a), (b, sent_b) = await asyncio.gather(first, second)
    assert built_at == [state.revision - 1]  # one build, of the copy before the write
    assert sent_a == sent_b == state.revision and a[0] is b[0]
    assert _fold(a) == _fold(b) == _fold([state.full_snapshot()])
    assert [u.revision for u in a[1:] if isinstance(u, rpb.SnapshotUpdate)] == [state.revision]
    # The next watcher gets the shared bytes without a build.
    again, _ = await state.full_backlog_async()
    assert again[0] is a[0] and built_at == [state.revision - 1]


async def test_full_backlog_async_rebuilds_when_the_log_lost_the_deltas(
    state: RegistryState, monkeypatch: pytest.MonkeyPatch
) -> None:
    state.apply([bp(), ag("alice")])
    started, release = threading.Event(), threading.Event()
    real = state_module._serialized
    built_at: list[int] = []

    def held_build(records: Any) -> Any:
        built_at.append(records.revision)
        if len(built_at) == 1:
            started.set()
            assert release.wait(10)
        return real(records)

    monkeypatch.setattr(state_module, "_serialized", held_build)
    task = asyncio.ensure_future(state.full_backlog_async())
    while not started.is_set():
        await asyncio.sleep(0.001)
    _bump(state, 10)  # more writes than the log keeps (8)
    release.set()
    backlog, sent = await task
    assert len(built_at) == 2 and built_at[1] == state.revision
    assert sent == state.revision and _fold(backlog) == _fold([state.full_snapshot()])


# -- watchers ------------------------------------------------------------------------------------


def test_watcher_gets_each_update(state: RegistryState) -> None:
    watcher = state.subscribe()
    state.apply([bp(), ag("alice")])
    update = watcher.queue.get_nowait()
    assert update is not None
    assert update.revision == state.revision
    assert watcher.queue.empty()
    state.unsubscribe(watcher)
    _bump(state, 1)
    assert watcher.queue.empty()


def test_lagging_watcher_is_dropped_with_a_sentinel(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    slow, fast = state.subscribe(), state.subscribe()
    limit = Watcher().queue.maxsize
    for i in range(limit):
        _bump(state, 1)
        while not fast.queue.empty():
            fast.queue.get_nowait()
        assert state.watcher_count == 2, i
    _bump(state, 1)  # one more than `slow` can hold
    assert state.watcher_count == 1
    assert slow.queue.get_nowait() is None
    assert slow.queue.empty()
    last = fast.queue.get_nowait()
    assert last is not None and last.revision == state.revision


# -- IDs that agents may not have ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spiffe_id",
    [
        str(REGISTRY_ID),
        f"spiffe://{TD}/operators/admin",
        f"spiffe://{TD}/operators",
        f"spiffe://{TD}/operators/team/bob",
    ],
    ids=["registry", "operator", "operators-root", "nested-operator"],
)
def test_reserved_ids_refused_as_agent_ids(state: RegistryState, spiffe_id: str) -> None:
    with raises(ManifestError, f"agent/mallory: spec.spiffeId: {spiffe_id} is reserved"):
        state.apply([bp(), ag("mallory", spiffe_id)])
    assert state.agents == {} and state.blueprints == {}


@pytest.mark.parametrize(
    "spiffe_id",
    [f"spiffe://{TD}/operatorsx", f"spiffe://{TD}/trustmesh/registry2"],
    ids=["operators-prefix-only", "registry-prefix-only"],
)
def test_lookalike_ids_are_not_reserved(state: RegistryState, spiffe_id: str) -> None:
    state.apply([bp(), ag("lookalike", spiffe_id)])
    assert state.find_agent(spiffe_id).name == "lookalike"


def test_agent_id_owned_by_another_agent_refused(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    with raises(
        ManifestError,
        "agent/mallory: spec.spiffeId: spiffe://test.local/agents/alice "
        "already belongs to Agent/alice",
    ):
        state.apply([ag("mallory", f"spiffe://{TD}/agents/alice")])
    assert set(state.agents) == {"alice"}
    assert state.find_agent(f"spiffe://{TD}/agents/alice").name == "alice"


def test_agent_id_may_move_when_its_owner_moves_in_the_same_apply(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    alice_id = f"spiffe://{TD}/agents/alice"
    state.apply([ag("alice", f"spiffe://{TD}/agents/alice-old"), ag("alice2", alice_id)])
    assert state.find_agent(alice_id).name == "alice2"
    assert state.find_agent(f"spiffe://{TD}/agents/alice-old").name == "alice"


def test_delete_frees_the_id(state: RegistryState) -> None:
    state.apply([bp(), ag("alice")])
    rev = state.delete("agent", "alice")
    assert rev == state.revision
    (update,) = state.updates_since(state.epoch, rev - 1) or []
    assert [c.delete_agent for c in update.changes] == ["alice"]
    state.apply([ag("bob", f"spiffe://{TD}/agents/alice")])
    assert state.find_agent(f"spiffe://{TD}/agents/alice").name == "bob"


def _kinds(update: rpb.SnapshotUpdate) -> list[str]:
    return [str(c.WhichOneof("change")) for c in update.changes]


def test_blueprint_change_republishes_its_agents(state: RegistryState) -> None:
    state.apply([bp(), ag("alice"), ag("bob")])
    rev = state.revision
    state.apply([bp(methods=["/x.Y/*"])])
    (update,) = state.updates_since(state.epoch, rev) or []
    assert sorted(_kinds(update)) == ["put_agent", "put_agent", "put_blueprint"]
