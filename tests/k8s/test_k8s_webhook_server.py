"""The injector's HTTPS server on loopback, with a certificate from `webhook_tls`,
verified by the client exactly as the API server verifies it (the CA from caBundle and
the Service's DNS name).
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import ssl
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from k8s_support import HERE

from trustmesh.k8s.certs import webhook_tls
from trustmesh.k8s.webhook_config import WebhookConfig
from trustmesh.k8s.webhook_server import WebhookServer

pytestmark = pytest.mark.integration

REVIEW = json.loads((HERE / "recorded" / "admission-review-pod-create.json").read_text())
CONFIG = WebhookConfig.from_flat(
    {
        "trustDomain": "example.org",
        "image": "trustmesh/trustmesh:0.1.0",
        "registry": "trustmesh-registry.trustmesh-system.svc:8443",
        "caFingerprint": "sha256:" + "0f" * 32,
    }
)
SERVICE_NAME = "trustmesh-webhook.trustmesh-system.svc"


def write_tls(directory: Path) -> Path:
    tls = webhook_tls("trustmesh-webhook", "trustmesh-system", now=datetime.now(UTC))
    directory.mkdir(exist_ok=True)
    (directory / "tls.crt").write_bytes(tls.cert_pem)
    (directory / "tls.key").write_bytes(tls.key_pem)
    (directory / "ca.crt").write_bytes(tls.ca_pem)
    return directory


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[WebhookServer, Path]]:
    tls = write_tls(tmp_path / "tls")
    s = WebhookServer(
        CONFIG,
        "127.0.0.1:0",
        tls / "tls.crt",
        tls / "tls.key",
        max_body=64 * 1024,
        reload_interval=0.0,
    )
    s.start()
    try:
        yield s, tls
    finally:
        s.stop()


def request(
    port: int,
    ca: Path,
    method: str,
    path: str,
    body: bytes | None = None,
    length: int | None = None,
) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=5)
    # Verify against the Service name, as the API server does, while dialling loopback.
    conn.sock = ctx.wrap_socket(
        __import__("socket").create_connection(("127.0.0.1", port), timeout=5),
        server_hostname=SERVICE_NAME,
    )
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if length is not None:  # a declared length the server must refuse before reading
        headers["Content-Length"] = str(length)
    conn.request(method, path, body=body, headers=headers)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def test_healthz_and_mutate(server: tuple[WebhookServer, Path]) -> None:
    s, tls = server
    assert request(s.port, tls / "ca.crt", "GET", "/healthz") == (200, b"ok\n")
    status, body = request(
        s.port, tls / "ca.crt", "POST", "/mutate?timeout=5s", json.dumps(REVIEW).encode()
    )
    assert status == 200
    answer = json.loads(body)
    assert answer["response"]["uid"] == REVIEW["request"]["uid"]
    assert answer["response"]["allowed"] is True
    ops = json.loads(base64.b64decode(answer["response"]["patch"]))
    assert any(op["path"] == "/spec/initContainers" for op in ops)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "text"),
    [
        pytest.param(
            "POST", "/mutate", b"{not json", 400, b"trustmesh webhook: not JSON: ", id="not-json"
        ),
        pytest.param(
            "POST",
            "/mutate",
            b'{"apiVersion": "v1"}',
            400,
            b"trustmesh webhook: expected apiVersion 'admission.k8s.io/v1'",
            id="not-a-review",
        ),
        pytest.param("POST", "/validate", b"{}", 404, b"not found", id="unknown-path"),
        pytest.param("GET", "/", None, 404, b"not found", id="get-root"),
    ],
)
def test_bad_requests(
    server: tuple[WebhookServer, Path],
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    text: bytes,
) -> None:
    s, tls = server
    got_status, got = request(s.port, tls / "ca.crt", method, path, body)
    assert (got_status, got[: len(text)]) == (status, text)


def test_a_body_over_the_limit_is_refused_unread(server: tuple[WebhookServer, Path]) -> None:
    s, tls = server
    status, body = request(s.port, tls / "ca.crt", "POST", "/mutate", b"{}", length=64 * 1024 + 1)
    assert (status, body) == (413, b"body over 65536 bytes\n")


def test_certificate_rotation_is_picked_up(
    server: tuple[WebhookServer, Path], tmp_path: Path
) -> None:
    s, tls = server
    fresh = write_tls(tmp_path / "fresh")
    for name in ("tls.crt", "tls.key"):
        (tls / name).write_bytes((fresh / name).read_bytes())
        later = time.time() + 5
        os.utime(tls / name, (later, later))
    # The old CA no longer verifies the server; the new one does.
    with pytest.raises(ssl.SSLCertVerificationError):
        request(s.port, tls / "ca.crt", "GET", "/healthz")
    assert request(s.port, fresh / "ca.crt", "GET", "/healthz") == (200, b"ok\n")
