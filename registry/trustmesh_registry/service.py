"""The registry's gRPC services.

`BootstrapService` runs on the server-TLS-only listener: join-token exchange and the
bundle. `RegistryService` runs on the mTLS listener: the caller's identity comes from
its verified client certificate. Operator methods need an ID under `/operators/`;
any workload holding one of our SVIDs may watch and renew its own SVID (issuance is
not legitimacy: the Agent records decide what it may call).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, TypeVar

import grpc

from trustmesh.ca import CertificateAuthority, check_csr
from trustmesh.errors import (
    AccessDeniedError,
    ConfigError,
    LimitExceededError,
    MeshError,
    PeerAuthenticationError,
)
from trustmesh.grpc_status import status_of
from trustmesh.grpc_tls import peer_chain
from trustmesh.limits import DEFAULT_LIMITS, Limits
from trustmesh.manifest import parse_json, to_document
from trustmesh.peer_verify import PeerVerifier
from trustmesh.spiffe_id import SpiffeId
from trustmesh.v1 import registry_pb2 as rpb
from trustmesh.v1 import registry_pb2_grpc as rgrpc
from trustmesh.v1 import resources_pb2 as pb
from trustmesh_registry.attestation import JoinTokenAttestor
from trustmesh_registry.state import RegistryState

__all__ = ["BootstrapService", "Issuer", "RegistryService"]

log = logging.getLogger(__name__)
audit = logging.getLogger("trustmesh.audit")

T = TypeVar("T")
OPERATORS = "/operators"


class Issuer:
    """Signs SVIDs with the CA; shared by both services."""

    def __init__(
        self,
        ca: CertificateAuthority,
        registry_id: SpiffeId,
        bundles: Callable[[], list[pb.TrustBundle]],
        clock: Callable[[], datetime],
        *,
        svid_ttl: timedelta,
        operator_ttl: timedelta,
    ) -> None:
        self.ca = ca
        self.registry_id = registry_id
        self.bundles = bundles
        self.clock = clock
        self.svid_ttl = svid_ttl
        self.operator_ttl = operator_ttl

    def issue(self, csr: bytes, spiffe_id: SpiffeId) -> rpb.SvidResponse:
        ttl = self.operator_ttl if spiffe_id.is_under(OPERATORS) else self.svid_ttl
        from cryptography.hazmat.primitives.serialization import Encoding

        cert = self.ca.sign_csr(csr, spiffe_id, now=self.clock(), ttl=ttl)
        return rpb.SvidResponse(
            cert_chain=[cert.public_bytes(Encoding.DER)],
            bundles=self.bundles(),
            registry_spiffe_id=str(self.registry_id),
        )

    def is_reserved(self, spiffe_id: SpiffeId) -> bool:
        return spiffe_id == self.registry_id or spiffe_id.is_under(OPERATORS)


async def _guard(context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
    """The one error boundary of a registry RPC: MeshError -> status with reason."""
    try:
        return await fn()
    except MeshError as e:
        code, details = status_of(e)
        await context.abort(code, details)
        raise  # unreachable: abort raises


class BootstrapService(rgrpc.BootstrapServicer):  # type: ignore[misc]
    def __init__(self, issuer: Issuer, attestor: JoinTokenAttestor) -> None:
        self._issuer = issuer
        self._attestor = attestor
        self._lock = asyncio.Lock()

    async def Join(
        self, request: rpb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SvidResponse:
        async def run() -> rpb.SvidResponse:
            check_csr(request.csr)  # a malformed request must not spend the token
            async with self._lock:  # one join at a time: token use is checked and spent
                spiffe_id = self._attestor.attest(request.token, now=self._issuer.clock())
            response = self._issuer.issue(request.csr, spiffe_id)
            audit.info(
                json.dumps({"event": "join", "spiffe_id": str(spiffe_id), "peer": context.peer()})
            )
            return response

        return await _guard(context, run)

    async def GetBundle(
        self, request: rpb.GetBundleRequest, context: grpc.aio.ServicerContext
    ) -> rpb.BundleResponse:
        return rpb.BundleResponse(
            bundles=self._issuer.bundles(), registry_spiffe_id=str(self._issuer.registry_id)
        )


class RegistryService(rgrpc.RegistryServicer):  # type: ignore[misc]
    def __init__(
        self,
        state: RegistryState,
        issuer: Issuer,
        attestor: JoinTokenAttestor,
        verifier: Callable[[], PeerVerifier],
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self._state = state
        self._issuer = issuer
        self._attestor = attestor
        self._verifier = verifier
        self._limits = limits

    # -- identity -------------------------------------------------------------------

    def _caller(self, context: grpc.aio.ServicerContext) -> SpiffeId:
        try:
            chain = peer_chain(context)
        except ValueError as e:
            raise PeerAuthenticationError("client certificate is unreadable") from e
        caller = self._verifier().verify(chain, now=self._issuer.clock(), role="client")
        if caller.trust_domain != self._issuer.registry_id.trust_domain:
            raise AccessDeniedError(f"{caller} is not in this registry's trust domain")
        return caller

    def _operator(self, context: grpc.aio.ServicerContext, action: str) -> SpiffeId:
        caller = self._caller(context)
        if not caller.is_under(OPERATORS):
            raise AccessDeniedError(
                f"{caller} may not {action}: operator credentials (spiffe://.../operators/...) required",
                reason="not_an_operator",
            )
        return caller

    def _audit(self, who: SpiffeId, action: str, **fields: Any) -> None:
        audit.info(json.dumps({"event": action, "operator": str(who), **fields}, default=str))

    # -- operator methods ---------------------------------------------------------------

    async def Apply(
        self, request: rpb.ApplyRequest, context: grpc.aio.ServicerContext
    ) -> rpb.ApplyResponse:
        async def run() -> rpb.ApplyResponse:
            who = self._operator(context, "apply resources")
            if len(request.documents) > self._limits.max_apply_documents:
                raise LimitExceededError(
                    f"{len(request.documents)} documents in one apply; the limit is "
                    f"{self._limits.max_apply_documents}"
                )
            docs: list[tuple[str, Any]] = []
            for d in request.documents:
                if len(d.json) > self._limits.max_document_bytes:
                    raise LimitExceededError(
                        f"{d.source}: document over {self._limits.max_document_bytes} bytes"
                    )
                # Strict JSON (duplicate keys refused), then the document as stored.
                docs.append((d.source, to_document(parse_json(d.json, d.source, self._limits))))
            result = self._state.apply(docs, dry_run=request.dry_run)
            if not request.dry_run:
                self._audit(who, "apply", applied=result.applied, revision=result.revision)
            return rpb.ApplyResponse(applied=result.applied, revision=result.revision)

        return await _guard(context, run)

    async def Get(
        self, request: rpb.GetRequest, context: grpc.aio.ServicerContext
    ) -> rpb.GetResponse:
        async def run() -> rpb.GetResponse:
            self._operator(context, "read resources")
            docs = self._state.documents(request.kind, request.name)
            return rpb.GetResponse(json=[json.dumps(d, sort_keys=True) for d in docs])

        return await _guard(context, run)

    async def Delete(
        self, request: rpb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> rpb.DeleteResponse:
        async def run() -> rpb.DeleteResponse:
            who = self._operator(context, "delete resources")
            revision = self._state.delete(request.kind, request.name)
            self._audit(who, "delete", kind=request.kind, name=request.name)
            return rpb.DeleteResponse(revision=revision)

        return await _guard(context, run)

    async def CreateJoinToken(
        self, request: rpb.CreateJoinTokenRequest, context: grpc.aio.ServicerContext
    ) -> rpb.CreateJoinTokenResponse:
        async def run() -> rpb.CreateJoinTokenResponse:
            who = self._operator(context, "create join tokens")
            spiffe_id = SpiffeId.parse(request.spiffe_id)
            if spiffe_id.trust_domain != self._issuer.registry_id.trust_domain:
                raise ConfigError(
                    f"{spiffe_id} is not in trust domain {self._issuer.registry_id.trust_domain}"
                )
            token, expires_at = self._attestor.create(
                spiffe_id,
                ttl_s=request.ttl_seconds or 3600,
                uses=request.uses or 1,
                now=self._issuer.clock(),
            )
            self._audit(who, "token_create", spiffe_id=str(spiffe_id), uses=request.uses or 1)
            return rpb.CreateJoinTokenResponse(token=token, expires_at=expires_at)

        return await _guard(context, run)

    async def SetAgentState(
        self, request: rpb.SetAgentStateRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SetAgentStateResponse:
        async def run() -> rpb.SetAgentStateResponse:
            who = self._operator(context, "change agent state")
            revision = self._state.set_agent_state(
                request.agent, disabled=request.disabled, reason=request.reason
            )
            self._audit(
                who,
                "disable" if request.disabled else "enable",
                agent=request.agent,
                reason=request.reason,
            )
            return rpb.SetAgentStateResponse(revision=revision)

        return await _guard(context, run)

    # -- workload methods ---------------------------------------------------------------

    async def RenewSvid(
        self, request: rpb.RenewSvidRequest, context: grpc.aio.ServicerContext
    ) -> rpb.SvidResponse:
        async def run() -> rpb.SvidResponse:
            caller = self._caller(context)
            if caller == self._issuer.registry_id:
                raise AccessDeniedError("the registry's own ID is never issued over the API")
            return self._issuer.issue(request.csr, caller)

        return await _guard(context, run)

    async def Watch(
        self, request: rpb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[rpb.SnapshotUpdate | bytes]:
        """Updates as messages, and a full snapshot as the bytes `full_backlog` shares
        between watchers (`server.add_registry_servicer` lets bytes through)."""
        try:
            caller = self._caller(context)
        except MeshError as e:
            code, details = status_of(e)
            await context.abort(code, details)
            return
        state = self._state
        watcher = state.subscribe()
        endpoint = None
        if request.inbound_address:
            endpoint = pb.Endpoint(
                spiffe_id=str(caller),
                instance_id=request.instance_id[:64],
                address=request.inbound_address[:256],
            )
        try:
            # Everything up to `sent` is in the backlog; later updates are queued.
            deltas = state.updates_since(request.epoch, request.revision)
            backlog: list[rpb.SnapshotUpdate | bytes]
            if deltas is None:
                backlog, sent = await state.full_backlog_async()
            else:
                backlog, sent = list(deltas), deltas[-1].revision if deltas else request.revision
            if endpoint is not None:
                state.put_endpoint(endpoint)
            for update in backlog:
                yield update
            while True:
                queued = await watcher.queue.get()
                if queued is None:
                    return  # fell behind: end the stream, the sidecar resyncs
                if queued.revision <= sent:
                    continue
                yield queued
        finally:
            state.unsubscribe(watcher)
            if endpoint is not None and not state.closing:
                state.delete_endpoint(endpoint)


def _serialize_update(update: rpb.SnapshotUpdate | bytes) -> bytes:
    return update if isinstance(update, bytes) else update.SerializeToString()


class _Captured:
    """Stands in for a server while the generated code registers its handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: object) -> None:
        pass  # the same handlers come again through add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: dict[str, grpc.RpcMethodHandler]
    ) -> None:
        self.handlers.update(handlers)


def add_registry_servicer(servicer: RegistryService, server: grpc.aio.Server) -> None:
    """`add_RegistryServicer_to_server`, except that Watch may also yield bytes that are
    already a serialized `SnapshotUpdate` (the shared full snapshot)."""
    captured = _Captured()
    rgrpc.add_RegistryServicer_to_server(servicer, captured)
    handlers = dict(captured.handlers)
    watch = handlers["Watch"]
    handlers["Watch"] = watch._replace(response_serializer=_serialize_update)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(_REGISTRY_SERVICE, handlers),)
    )
    server.add_registered_method_handlers(_REGISTRY_SERVICE, handlers)


_REGISTRY_SERVICE = "trustmesh.v1.Registry"
