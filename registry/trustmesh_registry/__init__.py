"""The TrustMesh registry: the control plane.

It records which agents are legitimate, holds the access policies, runs the embedded
CA and pushes versioned snapshots to sidecars. It imports the shared core
(`trustmesh`) and never the sidecar.
"""
