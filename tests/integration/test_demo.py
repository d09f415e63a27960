"""`trustmesh demo` end to end, as a user runs it: a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path


def _sidecar_processes(mark: str) -> set[int]:
    """Sidecar processes that inherited `TRUSTMESH_TEST_MARK=mark` (this run's demo's,
    not those of another test run on the same machine)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (
            b"trustmesh" in b" ".join(cmdline)
            and b"sidecar" in cmdline
            and b"run" in cmdline
            and f"TRUSTMESH_TEST_MARK={mark}".encode() in environ
        ):
            found.add(int(entry.name))
    return found


def test_demo_runs_the_scenario_and_leaves_nothing_behind() -> None:
    mark = uuid.uuid4().hex
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "trustmesh", "demo"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRUSTMESH_TEST_MARK": mark},
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    table = out[
        out.index("calls (from exported spans):") : out.index("traces (from exported spans):")
    ]
    rows = [line.split() for line in table.splitlines()[2:] if line.strip()]
    by_reason = {(r[0], r[1], r[2], r[4]) for r in rows}
    # The table is built from exported spans only; each scenario must be in it.
    assert ("orchestrator", "planner", "/demo.Planner/Plan", "allowed") in by_reason
    assert ("planner", "tool", "/demo.Tool/Invoke", "allowed") in by_reason
    assert ("orchestrator", "planner", "/demo.Planner/StreamPlan", "allowed") in by_reason
    assert ("orchestrator", "tool", "/demo.Tool/Invoke", "no_matching_policy") in by_reason
    assert ("impostor", "planner", "/demo.Planner/Plan", "agent_not_registered") in by_reason
    assert ("orchestrator", "planner", "/demo.Planner/Plan", "agent_disabled") in by_reason
    # Delegation: mallory's orchestration is refused by the planner's DelegationPolicy.
    assert (
        "orchestrator",
        "planner",
        "/demo.Planner/Plan",
        "chain_origin_not_allowed",
    ) in by_reason
    # The trace tree links the planner's onward call under the orchestrator's call.
    tree = out[out.index("traces (from exported spans):") :]
    assert "[server@planner] /demo.Planner/Plan" in tree
    assert "[client@planner] /demo.Tool/Invoke" in tree
    # alice's orchestration reached the tool with the verified chain on its span.
    assert (
        "[server@tool] /demo.Tool/Invoke  planner -> tool  allow (allowed)" in tree
        and "[origin alice@example.com@https://idp.demo.local; chain orchestrator > planner > tool]"
        in tree
    )
    assert elapsed < 30, f"demo took {elapsed:.1f}s"
    assert _sidecar_processes(mark) == set(), "the demo left sidecar processes behind"
