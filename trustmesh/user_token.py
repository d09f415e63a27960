"""Verify a user's OIDC/JWT access token and name the user it proves (`UserOrigin`).

The first sidecar of a user-initiated orchestration verifies the token and records
the issuer, the subject and the configured claims as the origin of hop 0 of the
delegation chain (docs/delegation.md). The token itself goes no further.

Invariants:
* Only RS256 and ES256 are accepted. `none`, every HS* algorithm and anything else
  is refused before a key is looked up, and the key must fit the algorithm (RSA of at
  least 2048 bits for RS256, EC P-256 for ES256): a public key is never used as an
  HMAC secret.
* The issuer is one of the configured `IssuerConfig`s; the key comes only from that
  issuer's JWKS, by the token's `kid`. Header URLs (`jku`, `x5u`) are never fetched,
  and a token with `crit` headers is refused.
* `exp` is required; `exp`, `nbf` and `iat` are checked against the injected `now`
  with the issuer's leeway. Nothing here reads the clock.
* Every failure is a `UserTokenError` (reason `user_token_invalid`). Its message never
  contains the token or any part of its encoding.
* I/O sits behind `JwksSource`: `StaticJwks` (a dict) and `FileJwks` (a JSON file
  read when built or reloaded). A JWKS URL can be another implementation.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.delegation_format import UserOrigin, encoded_user_origin_size
from trustmesh.errors import Code, ConfigError, PeerError
from trustmesh.limits import DEFAULT_LIMITS, Limits

__all__ = [
    "ALGORITHMS",
    "FileJwks",
    "IssuerConfig",
    "JwksSource",
    "PublicKey",
    "StaticJwks",
    "UserTokenError",
    "UserTokenVerifier",
]

ALGORITHMS = ("RS256", "ES256")
MIN_RSA_BITS = 2048
DEFAULT_LEEWAY = timedelta(seconds=30)
MAX_LEEWAY = timedelta(minutes=5)

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class UserTokenError(PeerError):
    """The access token did not verify. The message never quotes the token."""

    code = Code.UNAUTHENTICATED
    reason = "user_token_invalid"


class JwksSource(Protocol):
    """Where an issuer's signing keys come from."""

    def key(self, kid: str) -> PublicKey | None:
        """The public key with this `kid`, or None."""
        ...


def _load_jwks(jwks: Mapping[str, Any], where: str) -> dict[str, PublicKey]:
    keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
    if not isinstance(keys, list):
        raise ConfigError(f"{where}: a JWKS is a JSON object with a 'keys' list")
    out: dict[str, PublicKey] = {}
    for i, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise ConfigError(f"{where}: key #{i} is not a JSON object")
        if jwk.get("use", "sig") != "sig":
            continue  # an encryption key never verifies a signature
        kid = jwk.get("kid")
        if not isinstance(kid, str) or not kid:
            raise ConfigError(f"{where}: key #{i} has no 'kid'")
        if "d" in jwk or "k" in jwk:
            raise ConfigError(f"{where}: key {kid!r} holds private or symmetric key material")
        try:
            key = jwt.PyJWK(jwk).key
        except (jwt.PyJWTError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: key {kid!r} is not a usable JWK: {e}") from e
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ConfigError(f"{where}: key {kid!r} is neither an RSA nor an EC public key")
        if kid in out:
            raise ConfigError(f"{where}: two keys have kid {kid!r}")
        out[kid] = key
    return out


class StaticJwks:
    """A JWKS given as a dict (`{"keys": [...]}`)."""

    def __init__(self, jwks: Mapping[str, Any], *, source: str = "JWKS") -> None:
        self._keys = _load_jwks(jwks, source)

    def key(self, kid: str) -> PublicKey | None:
        return self._keys.get(kid)


class FileJwks:
    """A JWKS read from a JSON file when built, and again on `reload()`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._keys: dict[str, PublicKey] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file again; on any error the previous keys stay and it raises."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"JWKS file {self.path}: cannot read JSON: {e}") from e
        self._keys = _load_jwks(data, f"JWKS file {self.path}")

    def key(self, kid: str) -> PublicKey | None:
        return self._keys.get(kid)


@dataclass(frozen=True)
class IssuerConfig:
    """One trusted token issuer: its `iss`, the accepted audiences and its keys."""

    issuer: str
    audience: str | tuple[str, ...]
    jwks: JwksSource = field(repr=False)
    # Claims recorded in the origin (e.g. "groups"); `sub` is always recorded.
    claims: tuple[str, ...] = ()
    leeway: timedelta = DEFAULT_LEEWAY

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigError("an issuer needs its 'iss' value")
        if not self.audiences or not all(self.audiences):
            raise ConfigError(f"issuer {self.issuer!r}: name at least one audience")
        if not timedelta(0) <= self.leeway <= MAX_LEEWAY:
            raise ConfigError(f"issuer {self.issuer!r}: leeway must be 0 to {MAX_LEEWAY}")
        if "sub" in self.claims or len(set(self.claims)) != len(self.claims):
            raise ConfigError(f"issuer {self.issuer!r}: claims must be distinct and not 'sub'")

    @property
    def audiences(self) -> tuple[str, ...]:
        return (self.audience,) if isinstance(self.audience, str) else tuple(self.audience)


def _fail(message: str) -> UserTokenError:
    return UserTokenError(f"user access token rejected: {message}")


def _quote(value: object) -> str:
    return repr(value)[:130]


class UserTokenVerifier:
    """Verifies access tokens against a fixed set of issuers. Holds no per-token state."""

    def __init__(self, issuers: Iterable[IssuerConfig], *, limits: Limits = DEFAULT_LIMITS):
        self._issuers: dict[str, IssuerConfig] = {}
        for cfg in issuers:
            if cfg.issuer in self._issuers:
                raise ConfigError(f"issuer {cfg.issuer!r} is configured twice")
            if len(cfg.claims) > limits.max_user_claims:
                raise ConfigError(
                    f"issuer {cfg.issuer!r}: at most {limits.max_user_claims} claims are recorded"
                )
            self._issuers[cfg.issuer] = cfg
        self._limits = limits

    def verify(self, token: str, *, now: datetime) -> UserOrigin:
        """The user the token proves at `now`; raises `UserTokenError` otherwise."""
        if now.utcoffset() is None:
            raise ValueError("now must be a datetime with a timezone")
        if not isinstance(token, str):
            raise _fail(f"a token is a string, got {type(token).__name__}")
        limit = self._limits.max_user_token_bytes
        if len(token) > limit:
            raise _fail(f"token is {len(token)} characters, over the {limit} limit")
        if not token.isascii() or token.count(".") != 2:
            raise _fail("not a compact JWS (three base64url parts)")
        header = _header(token)
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise _fail(f"algorithm {_quote(alg)} is not accepted (only {', '.join(ALGORITHMS)})")
        if "crit" in header:
            raise _fail(
                "the token has critical header parameters ('crit'), which are not supported"
            )
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as e:
            raise _fail("not a well-formed JWT") from e
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise _fail("the header names no key ('kid')")
        iss = unverified.get("iss") if isinstance(unverified, dict) else None
        cfg = self._issuers.get(iss) if isinstance(iss, str) else None
        if cfg is None:
            raise _fail(f"issuer {_quote(iss)} is not a configured issuer")
        key = cfg.jwks.key(kid)
        if key is None:
            raise _fail(f"issuer {cfg.issuer!r} has no key {_quote(kid)}")
        _check_key(key, alg, kid)
        claims = _decode(token, key, alg, cfg)
        _check_times(claims, now, cfg.leeway)
        return self._origin(cfg, claims)

    def _origin(self, cfg: IssuerConfig, claims: dict[str, Any]) -> UserOrigin:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise _fail("the 'sub' claim is missing or empty")
        lim = self._limits
        recorded: list[tuple[str, tuple[str, ...]]] = []
        for name in sorted(cfg.claims):
            if name in claims and claims[name] is not None:
                recorded.append((name, _claim_values(name, claims[name], lim)))
        try:
            origin = UserOrigin(cfg.issuer, sub, tuple(recorded))
        except ValueError as e:
            raise _fail(str(e)) from e
        size = encoded_user_origin_size(origin)
        if size > lim.max_user_origin_bytes:
            raise _fail(
                f"subject and selected claims take {size} bytes, over the "
                f"{lim.max_user_origin_bytes}-byte limit for a chain origin"
            )
        return origin


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, read before anything is trusted (only to choose the key)."""
    try:
        raw = token.split(".", 1)[0]
        header = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail("not a well-formed JWT") from e
    if not isinstance(header, dict):
        raise _fail("not a well-formed JWT (the header is not a JSON object)")
    return header


def _check_key(key: PublicKey, alg: str, kid: str) -> None:
    if alg == "RS256":
        if not isinstance(key, rsa.RSAPublicKey):
            raise _fail(f"key {kid!r} is not an RSA key, but the token is RS256")
        if key.key_size < MIN_RSA_BITS:
            raise _fail(f"key {kid!r} is RSA-{key.key_size}; at least {MIN_RSA_BITS} bits needed")
    elif not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise _fail(f"key {kid!r} is not an EC P-256 key, but the token is ES256")


def _decode(token: str, key: PublicKey, alg: str, cfg: IssuerConfig) -> dict[str, Any]:
    try:
        claims = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=list(cfg.audiences),
            issuer=cfg.issuer,
            options={
                # Times are checked against the injected `now` in _check_times.
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "require": ["iss", "aud", "exp", "sub"],
            },
        )
    except jwt.InvalidSignatureError as e:
        raise _fail(f"signature does not verify under key of issuer {cfg.issuer!r}") from e
    except jwt.InvalidAudienceError as e:
        raise _fail(f"audience is not one of {', '.join(cfg.audiences)}") from e
    except jwt.InvalidIssuerError as e:
        raise _fail(f"issuer is not {cfg.issuer!r}") from e
    except jwt.MissingRequiredClaimError as e:
        raise _fail(f"the {e.claim!r} claim is missing") from e
    except jwt.PyJWTError as e:
        raise _fail(f"the token does not verify ({type(e).__name__})") from e
    if not isinstance(claims, dict):
        raise _fail("the payload is not a JSON object")
    return claims


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(f"the {name!r} claim is not a NumericDate")
    return float(value)


def _check_times(claims: Mapping[str, Any], now: datetime, leeway: timedelta) -> None:
    t = now.timestamp()
    slack = leeway.total_seconds()
    exp = _number(claims, "exp")
    if exp is None:
        raise _fail("the 'exp' claim is missing")
    if t >= exp + slack:
        raise _fail(f"expired at {datetime.fromtimestamp(exp, now.tzinfo).isoformat()}")
    nbf = _number(claims, "nbf")
    if nbf is not None and t + slack < nbf:
        raise _fail(f"not valid before {datetime.fromtimestamp(nbf, now.tzinfo).isoformat()}")
    iat = _number(claims, "iat")
    if iat is not None and t + slack < iat:
        raise _fail("issued in the future ('iat')")


def _scalar(name: str, value: object, limits: Limits) -> str:
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, str | int | float):
        text = str(value)
    else:
        raise _fail(f"claim {name!r} holds {type(value).__name__}, not text or a list of text")
    if len(text) > limits.max_user_claim_chars:
        raise _fail(f"claim {name!r} has a value over {limits.max_user_claim_chars} characters")
    return text


def _claim_values(name: str, value: object, limits: Limits) -> tuple[str, ...]:
    if isinstance(value, list):
        if len(value) > limits.max_user_claim_values:
            raise _fail(
                f"claim {name!r} has {len(value)} values, over {limits.max_user_claim_values}"
            )
        return tuple(_scalar(name, v, limits) for v in value)
    return (_scalar(name, value, limits),)
