"""The frame-level forwarding engine: HTTP/2 by hand on asyncio and Python `ssl`.

| module           | holds                                                           |
|------------------|-----------------------------------------------------------------|
| `frames.py`      | sans-IO frame decoder (preface, sizes, CONTINUATION) and encoders |
| `hpack_cache.py` | per-connection HPACK with table-versioned caches                |
| `grpc_wire.py`   | gRPC over HTTP/2: metadata, grpc-timeout, status mapping        |
| `streams.py`     | one stream: windows and the ordered send queue                  |
| `connection.py`  | one connection: transport, writes, SETTINGS out, GOAWAY, age    |
| `receive.py`     | how a connection reacts to each frame; flood and reset buckets  |
| `call.py`        | one forwarded call: two streams joined, message-size metering   |
| `tls.py`         | SSL contexts per credential generation, exact-ID check          |
| `engine.py`      | `H2Engine`: listeners, upstream pool, the `Engine` seam         |
| `config.py`      | `H2Config`: every bound, derived from `Limits`                  |

See docs/adr/0009-frame-level-engine.md.
"""

from trustmesh_sidecar.h2.config import H2Config
from trustmesh_sidecar.h2.engine import H2Engine

__all__ = ["H2Config", "H2Engine"]
