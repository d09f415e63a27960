"""grpcio TLS plumbing shared by the sidecar engine and the registry.

* `ServerCredentials`: a rotating SVID for `grpc.dynamic_ssl_server_credentials`;
  grpc core asks for it before each handshake, so a new SVID is served from the next
  connection on.
* `peer_chain()`: the caller's certificate chain as DER, from the auth context that
  grpc core filled after verifying the handshake against the bundles.
* Listener and channel options with the limits from `trustmesh.limits`.
"""

from __future__ import annotations

import threading
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.limits import Limits
from trustmesh.x509svid import BundleSet, X509Svid

__all__ = ["ServerCredentials", "channel_options", "peer_chain", "server_options"]


def server_options(
    limits: Limits, *, age: bool, send_bytes: int | None = None
) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", send_bytes or limits.max_message_bytes),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
        ("grpc.so_reuseport", 0),
    ]
    if age:
        opts += [
            ("grpc.max_connection_age_ms", int(limits.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(limits.max_connection_age_grace_s * 1000)),
        ]
    return opts


def channel_options(limits: Limits, *, receive_bytes: int | None = None) -> list[tuple[str, Any]]:
    return [
        # Each channel owns its connections. With grpc's global subchannel pool a new
        # channel to the same target would reuse the old connection, and with it the
        # old SVID: rotation would never reach a handshake (ADR 0004).
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.max_receive_message_length", receive_bytes or limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        ("grpc.max_metadata_size", limits.max_metadata_bytes),
        ("grpc.absolute_max_metadata_size", limits.max_metadata_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        # Despite its name, grpc core uses this as the minimum time a connection
        # attempt may take (handshake through the TLS bridge included) before it is
        # abandoned. At 100 ms a loaded machine failed connects; keep it generous.
        ("grpc.min_reconnect_backoff_ms", 10_000),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.enable_retries", 0),
    ]


class ServerCredentials:
    """Thread-safe holder read by grpc core's fetcher before each handshake."""

    def __init__(self, svid: X509Svid, bundles: BundleSet, *, verify_clients: bool = True) -> None:
        self._verify_clients = verify_clients
        self._lock = threading.Lock()
        self._version = 0
        self._served = -1
        self._config = self._build(svid, bundles)

    def _build(self, svid: X509Svid, bundles: BundleSet) -> Any:
        roots = bundles.all_pem() if self._verify_clients else None
        return grpc.ssl_server_certificate_configuration(
            [(svid.key_pem(), svid.chain_pem())], root_certificates=roots
        )

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.initial(), self.fetch, require_client_authentication=self._verify_clients
        )

    def update(self, svid: X509Svid, bundles: BundleSet) -> None:
        config = self._build(svid, bundles)
        with self._lock:
            self._config = config
            self._version += 1

    def initial(self) -> Any:
        with self._lock:
            self._served = self._version
            return self._config

    def fetch(self) -> Any:
        # Runs on grpc core threads. Returning None keeps the current configuration.
        with self._lock:
            if self._served == self._version:
                return None
            self._served = self._version
            return self._config


def peer_chain(context: grpc.aio.ServicerContext) -> tuple[bytes, ...]:
    """The client's chain, leaf first, as DER: the leaf, then any intermediates.

    grpc core reports the leaf (`x509_pem_cert`) and the verified chain
    (`x509_pem_cert_chain`, which also holds the trust anchor); the anchor is
    dropped, because verification starts again from our own bundles.
    """
    auth = context.auth_context()
    leaf_pems = auth.get("x509_pem_cert") or []
    if not leaf_pems:
        return ()
    leaf = x509.load_pem_x509_certificate(leaf_pems[0])
    chain = [leaf.public_bytes(Encoding.DER)]
    for pem in auth.get("x509_pem_cert_chain") or []:
        for cert in x509.load_pem_x509_certificates(pem):
            der = cert.public_bytes(Encoding.DER)
            if der != chain[0] and cert.issuer != cert.subject:
                chain.append(der)
    return tuple(chain)
