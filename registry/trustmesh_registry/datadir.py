"""The registry's data directory (0700): CA, bundle, database, operator credential.

| file                  | mode | what                                   |
|-----------------------|------|----------------------------------------|
| ca.key                | 0600 | the mesh CA's private key (EC P-256)   |
| ca.crt, bundle.pem    | 0644 | the CA certificate / the trust bundle  |
| registry.db           | 0600 | SQLite (WAL): resources, state, tokens |
| operator/admin.{crt,key} | 0644/0600 | the operator SVID            |
| config.yaml           | 0600 | the CLI config naming all of the above |
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from trustmesh.ca import CertificateAuthority
from trustmesh.client_config import ClientConfig
from trustmesh.errors import ConfigError
from trustmesh.spiffe_id import SpiffeId, TrustDomain
from trustmesh.x509svid import (
    X509Svid,
    generate_key,
    make_csr,
    write_private_file,
    write_public_file,
)
from trustmesh_registry.store_sqlite import SqliteStore

__all__ = ["DataDir"]


class DataDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.ca_key = path / "ca.key"
        self.ca_cert = path / "ca.crt"
        self.bundle = path / "bundle.pem"
        self.database = path / "registry.db"
        self.operator_dir = path / "operator"
        self.config = path / "config.yaml"

    def init(
        self,
        trust_domain: TrustDomain,
        *,
        now: datetime,
        registry_address: str,
        operator_ttl: timedelta = timedelta(days=30),
    ) -> ClientConfig:
        if self.ca_key.exists():
            raise ConfigError(f"{self.path} is already initialised (found {self.ca_key.name})")
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        ca = CertificateAuthority.create(trust_domain, now=now)
        write_private_file(self.ca_key, ca.key_pem())
        write_public_file(self.ca_cert, ca.cert_pem())
        write_public_file(self.bundle, ca.bundle().pem())
        SqliteStore(self.database).close()
        self.operator_dir.mkdir(mode=0o700, exist_ok=True)
        operator = SpiffeId.parse(f"spiffe://{trust_domain}/operators/admin")
        key = generate_key()
        cert = ca.sign_csr(make_csr(key, operator), operator, now=now, ttl=operator_ttl)
        svid = X509Svid.from_der([cert.public_bytes(Encoding.DER)], key)
        config = ClientConfig(
            registry=registry_address,
            registry_id=SpiffeId.parse(f"spiffe://{trust_domain}/trustmesh/registry"),
            bundle=self.bundle.resolve(),
            certificate=(self.operator_dir / "admin.crt").resolve(),
            key=(self.operator_dir / "admin.key").resolve(),
        )
        write_public_file(config.certificate, svid.chain_pem())
        write_private_file(config.key, svid.key_pem())
        write_private_file(self.config, config.dump().encode())
        return config

    def load_ca(self) -> CertificateAuthority:
        if not self.ca_key.exists():
            raise ConfigError(
                f"{self.path} holds no CA: run `trustmesh registry init --data-dir {self.path} "
                "--trust-domain DOMAIN` first"
            )
        mode = self.ca_key.stat().st_mode & 0o777
        if mode & 0o077:
            raise ConfigError(f"{self.ca_key} is readable by others (mode {mode:o}); chmod 600 it")
        return CertificateAuthority.load(self.ca_cert.read_bytes(), self.ca_key.read_bytes())
