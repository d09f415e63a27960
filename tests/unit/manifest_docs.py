"""Resource documents shared by the manifest tests (test_manifest.py, test_manifest_errors.py)."""

from __future__ import annotations

import textwrap

HEADER = "apiVersion: trustmesh.dev/v1alpha1\n"

BLUEPRINT = HEADER + textwrap.dedent("""\
    kind: AgentBlueprint
    metadata: {name: planner}
    spec:
      description: Plans tool use
      defaultAttributes: {team: search, tier: internal}
      allowedMethods: ["/demo.Planner/*"]
    """)

AGENT = HEADER + textwrap.dedent("""\
    kind: Agent
    metadata: {name: planner}
    spec:
      spiffeId: spiffe://demo.local/agents/planner
      blueprint: planner
      sponsor: alice@example.com
      owners: [team-search]
      attributes: {tier: critical}
      expiresAt: "2027-01-01T00:00:00Z"
    """)

POLICY = HEADER + textwrap.dedent("""\
    kind: AccessPolicy
    metadata: {name: orchestrator-calls-planner}
    spec:
      callers:
        - name: orchestrator
        - spiffeId: spiffe://demo.local/agents/x
        - blueprint: orchestrator
        - attributes: {team: search}
      callees:
        - name: planner
      methods: ["/demo.Planner/Plan", "/demo.Planner/*", "*"]
    """)
