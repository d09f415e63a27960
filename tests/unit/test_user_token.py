"""User access tokens: configuration, JWKS sources, claims and bounds.

The committed token vectors (every way a token is refused) are run by
test_delegation_vectors.py; these cases build tokens with PyJWT from fresh keys.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from trustmesh.errors import ConfigError
from trustmesh.limits import Limits
from trustmesh.user_token import (
    FileJwks,
    IssuerConfig,
    StaticJwks,
    UserTokenError,
    UserTokenVerifier,
)

from certs import raises

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
IDP = "https://idp.example"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def _jwk(key: Any, kid: str) -> dict[str, Any]:
    algo = (
        jwt.algorithms.RSAAlgorithm
        if isinstance(key, rsa.RSAPublicKey)
        else jwt.algorithms.ECAlgorithm
    )
    return {**json.loads(algo.to_jwk(key)), "kid": kid}


JWKS = {"keys": [_jwk(RSA_KEY.public_key(), "r"), _jwk(EC_KEY.public_key(), "e")]}


def token(claims: dict[str, Any] | None = None, *, kid: str = "r", **extra: Any) -> str:
    t = int(NOW.timestamp())
    body = {"iss": IDP, "aud": "trustmesh", "sub": "alice", "exp": t + 60, **(claims or {})}
    body.update(extra)
    key, alg = (RSA_KEY, "RS256") if kid == "r" else (EC_KEY, "ES256")
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})


def verifier(**cfg: Any) -> UserTokenVerifier:
    base: dict[str, Any] = {"issuer": IDP, "audience": "trustmesh", "jwks": StaticJwks(JWKS)}
    return UserTokenVerifier([IssuerConfig(**{**base, **cfg})])


def test_claims_are_recorded_as_text_values() -> None:
    v = verifier(claims=("groups", "admin", "level", "missing"))
    origin = v.verify(token({"groups": ["a", "b"], "admin": True, "level": 3}, kid="e"), now=NOW)
    assert (origin.issuer, origin.subject) == (IDP, "alice")
    assert origin.claims == (("admin", ("true",)), ("groups", ("a", "b")), ("level", ("3",)))
    assert origin.claim("groups") == ("a", "b") and origin.claim("missing") == ()


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"claims": ("sub",)}, "claims must be distinct and not 'sub'"),
        ({"claims": ("a", "a")}, "claims must be distinct"),
        ({"audience": ()}, "name at least one audience"),
        ({"issuer": ""}, "an issuer needs its 'iss' value"),
        ({"leeway": timedelta(hours=1)}, "leeway must be 0 to"),
    ],
    ids=["sub", "duplicate-claims", "no-audience", "no-issuer", "big-leeway"],
)
def test_issuer_config_is_validated(kw: dict[str, Any], message: str) -> None:
    with raises(ConfigError, message):
        verifier(**kw)


def test_issuers_are_distinct_and_claims_bounded() -> None:
    cfg = IssuerConfig(issuer=IDP, audience="a", jwks=StaticJwks(JWKS))
    with raises(ConfigError, "is configured twice"):
        UserTokenVerifier([cfg, cfg])
    with raises(ConfigError, "at most 1 claims are recorded"):
        UserTokenVerifier(
            [IssuerConfig(issuer=IDP, audience="a", jwks=StaticJwks(JWKS), claims=("x", "y"))],
            limits=Limits(max_user_claims=1),
        )


@pytest.mark.parametrize(
    ("jwks", "message"),
    [
        ({"nokeys": []}, "a JSON object with a 'keys' list"),
        ({"keys": [{"kty": "RSA"}]}, "key #0 has no 'kid'"),
        ({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h"}]}, "private or symmetric"),
        ({"keys": [JWKS["keys"][0], JWKS["keys"][0]]}, "two keys have kid 'r'"),
        ({"keys": [{"kty": "EC", "kid": "x", "crv": "P-256", "x": "AA", "y": "AA"}]},
         "key 'x' is not a usable JWK"),
    ],
    ids=["no-keys", "no-kid", "symmetric", "duplicate-kid", "unusable"],
)  # fmt: skip
def test_jwks_is_validated(jwks: dict[str, Any], message: str) -> None:
    with raises(ConfigError, message):
        StaticJwks(jwks)


def test_encryption_keys_are_skipped() -> None:
    jwks = StaticJwks({"keys": [{**JWKS["keys"][0], "use": "enc"}]})
    assert jwks.key("r") is None


def test_file_jwks_reloads_and_keeps_its_keys_on_error(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [JWKS["keys"][0]]}))
    source = FileJwks(path)
    v = UserTokenVerifier([IssuerConfig(issuer=IDP, audience="trustmesh", jwks=source)])
    assert v.verify(token(), now=NOW).subject == "alice"
    path.write_text("{not json")
    with raises(ConfigError, "cannot read JSON"):
        source.reload()
    assert v.verify(token(), now=NOW).subject == "alice"
    path.write_text(json.dumps(JWKS))
    source.reload()
    assert v.verify(token(kid="e"), now=NOW).subject == "alice"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_a_short_rsa_key_is_refused() -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    v = verifier(jwks=StaticJwks({"keys": [_jwk(weak.public_key(), "w")]}))
    t = int(NOW.timestamp())
    weak_token = jwt.encode(
        {"iss": IDP, "aud": "trustmesh", "sub": "a", "exp": t + 60}, weak, algorithm="RS256",
        headers={"kid": "w"},
    )  # fmt: skip
    with raises(UserTokenError, "is RSA-1024; at least 2048 bits needed"):
        v.verify(weak_token, now=NOW)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: token(iat=int(NOW.timestamp()) + 600), "issued in the future"),
        (lambda: token(exp="soon"), "the 'exp' claim is not a NumericDate"),
        (lambda: token({"groups": ["x"] * 65}), "has 65 values, over 64"),
        (lambda: token({"groups": "x" * 300}), "has a value over 256 characters"),
        (lambda: token({"groups": ["y" * 200] * 12}), "over the 2048-byte limit"),
        (lambda: token(sub=""), "the 'sub' claim is missing or empty"),
        (lambda: "a.b", "not a compact JWS"),
        (lambda: "é.b.c", "not a compact JWS"),
        (lambda: "eyJhbGciOiJSUzI1NiJ9.e30.", "the header names no key ('kid')"),
    ],
    ids=["iat-future", "exp-text", "too-many-values", "long-value", "origin-too-big",
         "empty-sub", "two-parts", "non-ascii", "no-kid"],
)  # fmt: skip
def test_tokens_are_refused_with_a_clear_reason(make: Any, message: str) -> None:
    v = verifier(claims=("groups",))
    with raises(UserTokenError, message) as info:
        v.verify(make(), now=NOW)
    assert info.value.reason == "user_token_invalid"
    assert info.value.code.name == "UNAUTHENTICATED"


def test_time_is_the_injected_now() -> None:
    t = token()  # exp = NOW + 60 s, leeway 30 s
    v = verifier()
    assert v.verify(t, now=NOW + timedelta(seconds=89)).subject == "alice"
    with raises(UserTokenError, "expired at"):
        v.verify(t, now=NOW + timedelta(seconds=90))
    with raises(ValueError, "timezone"):
        v.verify(t, now=NOW.replace(tzinfo=None))


def test_a_token_of_the_wrong_type_is_refused() -> None:
    with raises(UserTokenError, "a token is a string, got bytes"):
        verifier().verify(token().encode(), now=NOW)  # type: ignore[arg-type]
