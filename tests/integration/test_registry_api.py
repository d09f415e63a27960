"""The registry's operator API against a real registry over mTLS."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from trustmesh.channels import MeshChannels
from trustmesh.errors import MeshError
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.x509svid import BundleSet, TrustBundle, X509Svid, generate_key, make_csr

from harness import TD, Mesh, agent, agent_id, blueprint

REGISTRY_ID = SpiffeId.parse(f"spiffe://{TD}/trustmesh/registry")


def _bundles(mesh: Mesh) -> BundleSet:
    return BundleSet({}).with_bundle(
        TrustBundle.from_pem(TrustDomain.parse(TD), mesh.bundle_path.read_bytes())
    )


async def _workload_svid(mesh: Mesh, name: str) -> X509Svid:
    """A real workload SVID, obtained with a join token over the bootstrap listener."""
    assert mesh.registry is not None
    sid = agent_id(name)
    key = generate_key()
    bundles = _bundles(mesh)
    channels = MeshChannels(lambda: (None, bundles))
    try:
        stub = rgrpc.BootstrapStub(await channels.get(mesh.registry.bootstrap_address, REGISTRY_ID))
        req = rpb.JoinRequest(token=await mesh.token(sid), csr=make_csr(key, sid))
        resp = await stub.Join(req, timeout=10)
    finally:
        await channels.close()
    return X509Svid.from_der(list(resp.cert_chain), key)


async def _get(mesh: Mesh, kind: str, name: str = "") -> list[dict[str, Any]]:
    assert mesh.operator is not None
    resp = await mesh.operator.call(
        lambda s: s.Get(rpb.GetRequest(kind=kind, name=name), timeout=10)
    )
    return [json.loads(j) for j in resp.json]


async def _names(mesh: Mesh, kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in await _get(mesh, kind)}


async def _eventually(check: Callable[[], Any], what: str, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.02)


# -- 1. operator methods need operator credentials ------------------------------------------------

OPERATOR_CALLS: dict[str, Callable[[rgrpc.RegistryStub], Any]] = {
    "Apply": lambda s: s.Apply(
        rpb.ApplyRequest(
            documents=[rpb.ManifestDocument(source="x", json=json.dumps(blueprint("evil")))]
        ),
        timeout=10,
    ),
    "Get": lambda s: s.Get(rpb.GetRequest(kind="agents"), timeout=10),
    "Delete": lambda s: s.Delete(rpb.DeleteRequest(kind="AgentBlueprint", name="any"), timeout=10),
    "CreateJoinToken": lambda s: s.CreateJoinToken(
        rpb.CreateJoinTokenRequest(spiffe_id=str(agent_id("mallory")), ttl_seconds=60, uses=1),
        timeout=10,
    ),
    "SetAgentState": lambda s: s.SetAgentState(
        rpb.SetAgentStateRequest(agent="alice", disabled=True, reason="x"), timeout=10
    ),
}


@pytest.mark.parametrize("method", list(OPERATOR_CALLS))
async def test_workload_svid_may_not_call_operator_methods(mesh: Mesh, method: str) -> None:
    assert mesh.registry is not None
    await mesh.apply(blueprint("any"), agent("alice"))
    svid = await _workload_svid(mesh, "alice")
    bundles = _bundles(mesh)
    channels = MeshChannels(lambda: (svid, bundles))
    try:
        stub = rgrpc.RegistryStub(await channels.get(mesh.registry.address, REGISTRY_ID))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await OPERATOR_CALLS[method](stub)
    finally:
        await channels.close()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (err.value.details() or "").startswith(
        f"trustmesh: not_an_operator: {agent_id('alice')} may not "
    )
    # nothing changed
    assert await _names(mesh, "blueprints") == {"any"}
    (alice,) = await _get(mesh, "agents")
    assert alice["status"]["state"] == "Active"


# -- 2. apply is all or nothing -----------------------------------------------------------------------


def _without_sponsor() -> dict[str, Any]:
    doc = agent("carol")
    del doc["spec"]["sponsor"]
    return doc


BAD_DOCS: list[Any] = [
    pytest.param(_without_sponsor(), "test#2: spec.sponsor: is required", id="missing-sponsor"),
    pytest.param(
        agent("carol", spiffeId=f"spiffe://{TD}/agents/../x"),
        "test#2: spec.spiffeId: Invalid SPIFFE ID",
        id="malformed-spiffe-id",
    ),
    pytest.param(
        {**agent("carol"), "kind": "Agnet"}, "test#2: kind: unknown kind 'Agnet'", id="unknown-kind"
    ),
    pytest.param(
        agent("carol", spiffeId=str(REGISTRY_ID)), "test#2: spec.spiffeId: ", id="reserved-id"
    ),
    pytest.param(
        agent("carol", spiffeId=str(agent_id("bob"))),
        "test#2: spec.spiffeId: ",
        id="duplicate-spiffe-id",
    ),
    pytest.param(agent("carol", bp="nope"), "test#2: spec.blueprint: ", id="unknown-blueprint"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_DOCS)
async def test_apply_with_one_bad_document_applies_nothing(
    mesh: Mesh, bad: dict[str, Any], message: str
) -> None:
    assert mesh.registry is not None
    await mesh.apply(blueprint("any"))
    revision = mesh.registry.state.revision
    with pytest.raises(MeshError) as err:
        await mesh.apply(blueprint("new-bp"), agent("bob"), bad)
    assert err.value.reason == "invalid_manifest"
    assert err.value.message.startswith(message)
    assert await _names(mesh, "blueprints") == {"any"}
    assert await _names(mesh, "agents") == set()
    assert mesh.registry.state.revision == revision


async def test_apply_refuses_duplicate_json_keys(mesh: Mesh) -> None:
    assert mesh.operator is not None
    await mesh.apply(blueprint("any"))
    other = agent_id("b")
    raw = json.dumps(agent("a"))[:-2] + f', "spiffeId": "{other}"}}}}'
    assert raw.count('"spiffeId"') == 2
    req = rpb.ApplyRequest(documents=[rpb.ManifestDocument(source="raw#1", json=raw)])
    with pytest.raises(MeshError) as err:
        await mesh.operator.call(lambda s: s.Apply(req, timeout=10))
    assert err.value.message.startswith("raw#1: malformed JSON: duplicate key 'spiffeId'")
    assert await _names(mesh, "agents") == set()


# -- 3. operator state outlives apply ----------------------------------------------------------------


async def test_disabled_state_survives_reapply(mesh: Mesh) -> None:
    assert mesh.registry is not None
    await mesh.apply(blueprint("any"), agent("alice"), agent("bob"))
    bob = await mesh.add("bob")
    await mesh.disable("alice", reason="incident-42")
    assert await mesh.apply(agent("alice")) == ["Agent/alice unchanged"]
    assert await mesh.apply(agent("alice", owners=["ops@example.com"])) == [
        "Agent/alice configured"
    ]
    (doc,) = await _get(mesh, "agents", "alice")
    assert doc["spec"]["owners"] == ["ops@example.com"]
    assert doc["status"]["state"] == "Disabled"
    assert doc["status"]["disabledReason"] == "incident-42"

    target = mesh.registry.state.revision
    state = bob.sidecar.state
    assert state is not None
    await _eventually(lambda: state.snapshot.revision >= target, "bob's snapshot catches up")
    seen = state.snapshot.agent_by_name("alice")
    assert seen is not None
    assert seen.owners == ("ops@example.com",)
    assert seen.disabled
    assert seen.disabled_reason == "incident-42"


# -- 4. deltas are O(change) -----------------------------------------------------------------------------


async def test_one_change_pushes_one_change(mesh: Mesh) -> None:
    assert mesh.registry is not None
    state = mesh.registry.state
    state.apply([("setup", blueprint("any"))])
    for start in (0, 1000):  # 1000 documents is the per-apply limit
        state.apply([(f"bulk#{i}", agent(f"a{i}")) for i in range(start, start + 1000)])
    assert len(state.agents) == 2000
    watcher = state.subscribe()
    try:
        before = state.revision
        assert await mesh.apply(agent("a1234", owners=["x@example.com"])) == [
            "Agent/a1234 configured"
        ]
        update = await asyncio.wait_for(watcher.queue.get(), 5)
    finally:
        state.unsubscribe(watcher)
    assert update is not None
    assert update.full is False
    assert (update.base_revision, update.revision) == (before, before + 1)
    assert len(update.changes) == 1
    assert update.changes[0].put_agent.name == "a1234"
    assert list(update.changes[0].put_agent.owners) == ["x@example.com"]


# -- 5. the snapshot holds no secrets -------------------------------------------------------------------


def _pem_body(pem: bytes) -> bytes:
    return b"".join(line for line in pem.splitlines() if not line.startswith(b"-----"))


async def test_snapshot_carries_no_keys_or_tokens(mesh: Mesh) -> None:
    assert mesh.registry is not None
    await mesh.apply(blueprint("any"), agent("alice"))
    await mesh.add("alice")
    token = await mesh.token(agent_id("bob"))
    snapshot = mesh.registry.state.full_snapshot()
    assert any(c.HasField("put_endpoint") for c in snapshot.changes)  # a full, live snapshot
    data = snapshot.SerializeToString()
    secrets = {
        "ca-key": _pem_body(mesh.registry.ca.key_pem()),
        "operator-key": _pem_body((mesh.root / "registry" / "operator" / "admin.key").read_bytes()),
        "registry-svid-key": _pem_body(mesh.registry.svid.key_pem()),
        "join-token": token.encode(),
        "join-token-secret": token.removeprefix("tmjt.").encode(),
    }
    for what, secret in secrets.items():
        assert secret not in data, what


# -- 6. endpoints are live ------------------------------------------------------------------------------


async def test_endpoint_listed_while_the_sidecar_watches(mesh: Mesh) -> None:
    await mesh.apply(blueprint("any"), agent("alice"))
    node = await mesh.add("alice")
    address = node.sidecar.inbound_address

    async def endpoints() -> list[str]:
        (doc,) = await _get(mesh, "agents", "alice")
        return list(doc["status"]["endpoints"])

    async def listed() -> bool:
        return await endpoints() == [address]

    async def gone() -> bool:
        return await endpoints() == []

    await _eventually(listed, "endpoint listed")
    await node.sidecar.stop(0.2)
    await node.app.stop()
    del mesh.nodes["alice"]
    await _eventually(gone, "endpoint removed")


# -- 7. blueprints in use -----------------------------------------------------------------------------


async def test_delete_blueprint_in_use_is_refused(mesh: Mesh) -> None:
    assert mesh.operator is not None
    await mesh.apply(
        blueprint("shared"),
        blueprint("spare"),
        agent("bob", bp="shared"),
        agent("alice", bp="shared"),
    )
    req = rpb.DeleteRequest(kind="AgentBlueprint", name="shared")
    with pytest.raises(MeshError) as err:
        await mesh.operator.call(lambda s: s.Delete(req, timeout=10))
    assert err.value.message == "AgentBlueprint/shared is used by agents: alice, bob"
    assert await _names(mesh, "blueprints") == {"shared", "spare"}
    spare = rpb.DeleteRequest(kind="blueprint", name="spare")
    await mesh.operator.call(lambda s: s.Delete(spare, timeout=10))
    assert await _names(mesh, "blueprints") == {"shared"}


async def test_plaintext_health_listener_serves_health_only(tmp_path: Path) -> None:
    """`--health-listen`: kubelet-style gRPC probes without TLS; no registry API there."""
    from datetime import UTC, datetime

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from trustmesh.spiffe_id import TrustDomain
    from trustmesh.v1 import registry_pb2_grpc
    from trustmesh_registry.datadir import DataDir
    from trustmesh_registry.server import RegistryServer, ServeConfig

    data = tmp_path / "reg"
    DataDir(data).init(TrustDomain.parse(TD), now=datetime.now(UTC), registry_address="127.0.0.1:0")
    server = RegistryServer(
        ServeConfig(
            data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0", health_listen="127.0.0.1:0"
        )
    )
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.health_address) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await registry_pb2_grpc.RegistryStub(channel).Get(
                    rpb.GetRequest(kind="agents"), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0.2)
