"""A SPIFFE Workload API for tests: the agent side of SPIRE, on a unix socket.

It speaks the standard API through the stubs that py-spiffe ships
(`spiffe._proto.workload_pb2_grpc`; no proto file is copied here) and, like SPIRE,
refuses a call without the `workload.spiffe.io: true` header with INVALID_ARGUMENT.
SPIRE tells workloads apart by attesting the calling process; here one socket serves
one workload. `FetchX509SVID` streams the current response, then every later `push()`,
which is how SPIRE delivers rotations and bundle changes. py-spiffe's `X509Source`
calls nothing else (not `FetchX509Bundles`), so nothing else is served.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from spiffe._proto import workload_pb2, workload_pb2_grpc

from trustmesh.spiffe_id import TrustDomain
from trustmesh.x509svid import X509Svid

HEADER = ("workload.spiffe.io", "true")


def der(certs: Sequence[x509.Certificate]) -> bytes:
    """Certificates as the Workload API carries them: DER, concatenated."""
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def svid_response(
    svid: X509Svid,
    bundle: Sequence[x509.Certificate],
    federated: Mapping[TrustDomain, Sequence[x509.Certificate]] | None = None,
) -> workload_pb2.X509SVIDResponse:
    """One `X509SVIDResponse` as SPIRE sends it: the SVID chain (leaf first, then the
    intermediates), its PKCS#8 key, our trust domain's bundle, and the federated
    bundles keyed by trust domain ID (`spiffe://other.example`)."""
    key = svid.private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return workload_pb2.X509SVIDResponse(
        svids=[
            workload_pb2.X509SVID(
                spiffe_id=str(svid.spiffe_id),
                x509_svid=der(svid.cert_chain),
                x509_svid_key=key,
                bundle=der(bundle),
            )
        ],
        federated_bundles={f"spiffe://{td}": der(certs) for td, certs in (federated or {}).items()},
    )


class _Servicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):  # type: ignore[misc]
    def __init__(self, api: WorkloadApi) -> None:
        self._api = api

    async def FetchX509SVID(
        self, request: workload_pb2.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        if HEADER not in tuple(context.invocation_metadata() or ()):
            self._api.refused += 1
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request"
            )
        if self._api.failing is not None:
            await context.abort(*self._api.failing)
        queue: asyncio.Queue[workload_pb2.X509SVIDResponse] = asyncio.Queue()
        self._api.streams.add(queue)
        try:
            if self._api.response is not None:
                yield self._api.response
            while True:
                yield await queue.get()
        finally:
            self._api.streams.discard(queue)


class WorkloadApi:
    """One workload's Workload API at `path`; `push()` before or after `start()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.response: workload_pb2.X509SVIDResponse | None = None
        self.streams: set[asyncio.Queue[workload_pb2.X509SVIDResponse]] = set()
        self.refused = 0  # calls without the security header
        # When set, every call fails with this status (a broken agent). INVALID_ARGUMENT
        # is one that py-spiffe does not retry: its X509Source closes for good.
        self.failing: tuple[grpc.StatusCode, str] | None = None
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.path}"

    def push(
        self,
        svid: X509Svid,
        bundle: Sequence[x509.Certificate],
        federated: Mapping[TrustDomain, Sequence[x509.Certificate]] | None = None,
    ) -> None:
        self.response = svid_response(svid, bundle, federated)
        for queue in list(self.streams):
            queue.put_nowait(self.response)

    async def start(self) -> WorkloadApi:
        server = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(_Servicer(self), server)
        server.add_insecure_port(f"unix:{self.path}")
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(0)
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
