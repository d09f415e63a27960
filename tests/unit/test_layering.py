"""The package boundaries ADR 0001 promises, checked on the source (no imports run)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "trustmesh_sidecar": ROOT / "sidecar" / "trustmesh_sidecar",
    "trustmesh_registry": ROOT / "registry" / "trustmesh_registry",
    "trustmesh": ROOT / "trustmesh",
}
# The composition root may wire everything together; nothing else in the core may.
COMPOSITION_ROOT = ("trustmesh/cli/", "trustmesh/demo/", "trustmesh/k8s/")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


def _sources(package: str) -> list[Path]:
    return sorted(p for p in PACKAGES[package].rglob("*.py") if "/v1/" not in str(p))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("trustmesh_sidecar", "trustmesh_registry"),
        ("trustmesh_registry", "trustmesh_sidecar"),
    ],
    ids=["sidecar-never-imports-registry", "registry-never-imports-sidecar"],
)
def test_sidecar_and_registry_never_import_each_other(package: str, forbidden: str) -> None:
    offenders = [str(p.relative_to(ROOT)) for p in _sources(package) if forbidden in _imports(p)]
    assert offenders == []


def test_the_core_imports_neither_outside_the_composition_root() -> None:
    offenders = []
    for path in _sources("trustmesh"):
        rel = str(path.relative_to(ROOT))
        if rel.startswith(COMPOSITION_ROOT):
            continue
        if _imports(path) & {"trustmesh_sidecar", "trustmesh_registry"}:
            offenders.append(rel)
    assert offenders == []


def test_nothing_above_the_engine_seam_imports_grpc() -> None:
    above = ["engine.py", "routing.py", "chains.py", "headers.py", "state.py"]
    offenders = [name for name in above if "grpc" in _imports(PACKAGES["trustmesh_sidecar"] / name)]
    assert offenders == []
