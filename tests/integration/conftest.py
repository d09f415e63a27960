from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from harness import Mesh, agent, blueprint, policy


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = await Mesh(tmp_path).start()
    try:
        yield m
    finally:
        await m.stop()


@pytest.fixture
async def trio(mesh: Mesh) -> AsyncIterator[Mesh]:
    """alice -> bob allowed on every Echo method; carol registered, no policy; bob -> alice none."""
    await mesh.apply(
        blueprint("any"),
        agent("alice"),
        agent("bob"),
        agent("carol"),
        policy("alice-calls-bob", ["alice"], ["bob"], ["/test.Echo/*"]),
    )
    for name in ("alice", "bob", "carol"):
        await mesh.add(name)
    await mesh.wait_endpoints("alice", "bob", "carol")
    yield mesh
