"""The reconciler against a real registry: `OperatorRegistry` over mTLS on loopback.

The Kubernetes side is still the recordings (no API server here); the registry side
is the real `RegistryServer`, reached with the operator credential that `registry
init` wrote, exactly as the reconciler's Deployment reaches it (credentials.pem =
certificate chain + key, bundle.pem).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from k8s_support import HERE

from trustmesh.k8s.reconcile_loop import OperatorRegistry, Reconciler, _Event, _Listed
from trustmesh.k8s.reconciler import PLURALS
from trustmesh.operator_client import OperatorClient
from trustmesh.resources import Kind
from trustmesh.spiffe_id import TrustDomain
from trustmesh_registry.datadir import DataDir
from trustmesh_registry.server import RegistryServer, ServeConfig

pytestmark = pytest.mark.integration

LISTS = json.loads((HERE / "recorded" / "cr-list-responses.json").read_text())
EVENTS = [
    json.loads(line)
    for line in (HERE / "recorded" / "cr-watch-agents.jsonl").read_text().splitlines()
]


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[tuple[RegistryServer, OperatorRegistry]]:
    data = tmp_path / "data"
    DataDir(data).init(
        TrustDomain.parse("example.org"), now=datetime.now(UTC), registry_address="127.0.0.1:0"
    )
    server = RegistryServer(ServeConfig(data, listen="127.0.0.1:0", bootstrap_listen="127.0.0.1:0"))
    await server.start()
    # The Secret `trustmesh-operator` holds exactly this: chain + key in one file.
    pem = tmp_path / "credentials.pem"
    pem.write_bytes(
        (data / "operator/admin.crt").read_bytes() + (data / "operator/admin.key").read_bytes()
    )
    client = OperatorClient.from_pem(pem, data / "bundle.pem", server.address)
    try:
        yield server, OperatorRegistry(client, timeout=10)
    finally:
        await server.stop()


async def test_reconcile_into_a_real_registry(
    registry: tuple[RegistryServer, OperatorRegistry],
) -> None:
    server, writer = registry
    rec = Reconciler(source=None, registry=writer)  # type: ignore[arg-type]
    for kind in Kind:
        rec.feed(_Listed(kind, LISTS[PLURALS[kind]]["items"], "1042"))
    first = await rec.sync_once()
    created = {line for line in first.done if line.endswith(" created")}
    assert {
        "AgentBlueprint/example-orchestrator created",
        "AgentBlueprint/example-planner created",
        "Agent/orchestrator created",
        "Agent/planner created",
        "AccessPolicy/example-orchestrator-plans created",
    } <= created
    # DelegationPolicy: applied where the registry stores it, else reported, never fatal.
    for action, message in first.failed:
        assert action == "apply DelegationPolicy/example-planner-accepts-orchestrator", message
    assert set(server.state.agents) == {"orchestrator", "planner"}

    for event in EVENTS[:4]:
        rec.feed(_Event(Kind.AGENT, event))
    second = await rec.sync_once()
    assert "Agent/planner configured" in second.done
    assert "Agent/orchestrator deleted" in second.done
    assert set(server.state.agents) == {"planner"}
    assert server.state.agents["planner"].sponsor == "new-owner@example.org"

    third = await rec.sync_once()
    assert [str(a) for a in third.plan.actions if "DelegationPolicy" not in str(a)] == []
