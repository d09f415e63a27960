"""A stand-in OIDC identity provider for the demo: one ES256 key, a JWKS file, tokens.

Real deployments point `--oidc-issuers` at their IdP's JWKS; the sidecar verifies
the tokens the same way.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from trustmesh.x509svid import write_private_file, write_public_file

__all__ = ["DemoIdp"]

ISSUER = "https://idp.demo.local"
AUDIENCE = "trustmesh-demo"


class DemoIdp:
    def __init__(self, directory: Path) -> None:
        self._key = ec.generate_private_key(ec.SECP256R1())
        self.kid = "demo-1"
        jwk = json.loads(ECAlgorithm.to_jwk(self._key.public_key()))
        jwk |= {"kid": self.kid, "use": "sig", "alg": "ES256"}
        directory.mkdir(parents=True, exist_ok=True)
        self.jwks_path = directory / "jwks.json"
        write_public_file(self.jwks_path, json.dumps({"keys": [jwk]}).encode())
        self.config_path = directory / "oidc-issuers.yaml"
        config = (
            "issuers:\n"
            f"  - issuer: {ISSUER}\n"
            f"    audience: {AUDIENCE}\n"
            f"    jwksFile: {self.jwks_path}\n"
            "    claims: [groups]\n"
        )
        write_private_file(self.config_path, config.encode())

    def token(self, subject: str, groups: list[str], *, ttl_s: int = 300) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": subject,
            "groups": groups,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_s,
        }
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})
