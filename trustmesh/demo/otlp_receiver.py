"""A minimal OTLP/gRPC trace receiver on loopback, for the demo and the tests.

It speaks the real OTLP `TraceService/Export` (from `opentelemetry-proto`), so the
sidecars export exactly as they would to a collector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as tsvc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpReceiver", "ReceivedSpan"]

KIND_NAMES = {1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error

    @property
    def duration_ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(v: common_pb2.AnyValue) -> Any:
    which = v.WhichOneof("value")
    return getattr(v, which) if which else None


class _Servicer(tgrpc.TraceServiceServicer):  # type: ignore[misc]
    def __init__(self, sink: list[ReceivedSpan]) -> None:
        self._sink = sink

    async def Export(
        self, request: tsvc.ExportTraceServiceRequest, context: grpc.aio.ServicerContext
    ) -> tsvc.ExportTraceServiceResponse:
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            service = str(res.get("service.name", "?"))
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self._sink.append(
                        ReceivedSpan(
                            service=service,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            name=s.name,
                            kind=KIND_NAMES.get(s.kind, str(s.kind)),
                            start_ns=s.start_time_unix_nano,
                            end_ns=s.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in s.attributes},
                            status_code=s.status.code,
                        )
                    )
        return tsvc.ExportTraceServiceResponse()


class OtlpReceiver:
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self._server: grpc.aio.Server | None = None
        self.endpoint = ""

    async def start(self, address: str = "127.0.0.1:0") -> str:
        server = grpc.aio.server()
        tgrpc.add_TraceServiceServicer_to_server(_Servicer(self.spans), server)
        port = server.add_insecure_port(address)
        await server.start()
        self._server = server
        self.endpoint = f"http://127.0.0.1:{port}"
        return self.endpoint

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0.5)
