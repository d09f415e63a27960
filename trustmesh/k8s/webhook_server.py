"""The injector's HTTPS server: stdlib `http.server` + `ssl` around `webhook.decide`.

* `POST /mutate`: an AdmissionReview in, its answer out (200). A body that is not an
  AdmissionReview we can answer gets 400 with one line of text, and the API server
  applies the webhook's `failurePolicy` (ADR 0008).
* `GET /healthz`: 200 `ok`, for the kubelet's HTTPS probes.

The serving certificate is re-read when its files change (cert-manager or the
`trustmesh webhook certs` flow rotates the Secret, and the kubelet updates the
mounted files), at most once per `reload_interval`, for new connections only.
Bodies are bounded (`max_body`), and each connection has a timeout.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from trustmesh.errors import ConfigError
from trustmesh.k8s.webhook import (
    InvalidAdmissionReviewError,
    admission_request,
    decide,
    response_for,
)
from trustmesh.k8s.webhook_config import WebhookConfig

__all__ = ["WebhookServer"]

log = logging.getLogger(__name__)

MAX_BODY = 8 * 1024 * 1024  # a Pod is at most ~1.5 MiB in etcd; reviews carry it plus oldObject
_TIMEOUT = 10.0
_LINGER = 1.0


class _Certificates:
    """An SSL context for the current certificate files, rebuilt when they change."""

    def __init__(self, cert: Path, key: Path, reload_interval: float) -> None:
        self.cert, self.key = cert, key
        self.reload_interval = reload_interval
        self._lock = threading.Lock()
        self._stamp = self._mtimes()
        self._context = self._load()
        self._checked = time.monotonic()

    def _mtimes(self) -> tuple[float, float]:
        try:
            return (self.cert.stat().st_mtime, self.key.stat().st_mtime)
        except OSError as e:
            raise ConfigError(f"cannot read the webhook certificate: {e}") from e

    def _load(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"cannot load the webhook certificate {self.cert}: {e}") from e
        return ctx

    def context(self) -> ssl.SSLContext:
        with self._lock:
            now = time.monotonic()
            if now - self._checked >= self.reload_interval:
                self._checked = now
                try:
                    stamp = self._mtimes()
                    if stamp != self._stamp:
                        self._context, self._stamp = self._load(), stamp
                        log.info("webhook certificate reloaded from %s", self.cert)
                except ConfigError as e:  # keep serving with the last good one
                    log.warning("%s; keeping the previous certificate", e.message)
            return self._context


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _text(self, status: HTTPStatus, text: str) -> None:
        self._send(status, (text + "\n").encode(), "text/plain; charset=utf-8")

    def do_GET(self) -> None:
        if self.path == "/healthz":
            self._text(HTTPStatus.OK, "ok")
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")

    def do_POST(self) -> None:
        if self.path.split("?", 1)[0] != "/mutate":
            self._text(HTTPStatus.NOT_FOUND, "not found")
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._text(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required")
            return
        if int(length) > self.server.max_body:
            self.close_connection = True
            self._text(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {self.server.max_body} bytes"
            )
            return
        body = self.rfile.read(int(length))
        try:
            review = json.loads(body)
            request = admission_request(review)
            injection = decide(request, self.server.config)
        except (ValueError, InvalidAdmissionReviewError) as e:
            message = e.message if isinstance(e, InvalidAdmissionReviewError) else f"not JSON: {e}"
            log.warning("bad admission review from %s: %s", self.address_string(), message)
            self._text(HTTPStatus.BAD_REQUEST, f"trustmesh webhook: {message}")
            return
        log.info(
            "admission uid=%s namespace=%s outcome=%s reason=%s: %s",
            request["uid"],
            request.get("namespace", ""),
            injection.outcome.value,
            injection.reason,
            injection.message,
        )
        answer = json.dumps(response_for(review, injection)).encode()
        self._send(HTTPStatus.OK, answer, "application/json")


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], config: WebhookConfig, certs: _Certificates, max_body: int
    ) -> None:
        self.config = config
        self.certs = certs
        self.max_body = max_body
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the connection's own thread, never in the accept loop.
        request.settimeout(_TIMEOUT)
        try:
            tls = self.certs.context().wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:
            log.debug("TLS handshake with %s failed: %s", client_address, e)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            _lingering_close(tls)


def _lingering_close(sock: ssl.SSLSocket) -> None:
    """Close after the peer has read our answer, even if it sent bytes we never read.

    Closing a socket with unread input makes the kernel send a reset, which can
    destroy a response still in flight (a 413 sent without reading the body). So: send
    our FIN, then drain the peer's leftovers (bounded in bytes and time) until it closes.
    """
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(_LINGER)
        drained = 0
        while drained < MAX_BODY:
            chunk = sock.recv(65536)
            if not chunk:
                break
            drained += len(chunk)
    except OSError:
        pass
    finally:
        sock.close()


class WebhookServer:
    """Serves `/mutate` and `/healthz` over HTTPS on `listen` (`host:port`)."""

    def __init__(
        self,
        config: WebhookConfig,
        listen: str,
        cert: Path,
        key: Path,
        *,
        max_body: int = MAX_BODY,
        reload_interval: float = 30.0,
    ) -> None:
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--listen {listen!r}: expected host:port")
        certs = _Certificates(cert, key, reload_interval)
        try:
            self._server = _HTTPServer((host.strip("[]"), int(port)), config, certs, max_body)
        except OSError as e:
            raise ConfigError(f"cannot listen on {listen}: {e.strerror}") from e
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def serve_forever(self) -> None:
        log.info("webhook serving on port %d", self.port)
        self._server.serve_forever()

    def start(self) -> None:
        """Serve from a background thread (tests, and callers with their own loop)."""
        self._thread = threading.Thread(target=self.serve_forever, name="webhook", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
