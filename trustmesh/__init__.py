"""TrustMesh's shared trust core.

Identity, certificates, resources, policy decisions, errors and telemetry helpers
that both the sidecar (`trustmesh_sidecar`) and the registry (`trustmesh_registry`)
import. The two never import each other; `trustmesh.cli` and `trustmesh.demo` are
the composition root that wires them together.
"""

__version__ = "0.1.0"
