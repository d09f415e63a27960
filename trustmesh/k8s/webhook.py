"""Sidecar injection as a pure function: `AdmissionReview` (v1) in, `AdmissionReview` out.

`decide(request, config)` returns an `Injection`, a value holding the outcome, a stable
reason code, a message and the JSON patch; `mutate(review, config)` wraps it into the
response the API server expects. No I/O, no clock: `webhook_server` does the HTTP.

What is decided (docs/adr/0008-webhook-failure-policy.md says why):
* Only a Pod CREATE is ever touched; anything else is allowed unchanged.
* A pod that does not ask (`trustmesh.dev/inject` absent or `"false"`) is allowed
  unchanged, whatever else is wrong with it: we never block what we were not asked to
  touch.
* A pod that already has the sidecar is allowed unchanged, so injection is idempotent
  (a re-invocation or a re-submitted pod gets no second sidecar).
* A pod that asks and can't be injected (a bad annotation, a name already taken, a
  SPIFFE ID the template can't make) is **refused** with a message naming the
  problem: an agent that asked for the mesh never starts silently without it.
* A review that is not a v1 `AdmissionReview` with a request uid can't be answered
  at all: `InvalidAdmissionReviewError`, which the server turns into HTTP 400.

The pod's SPIFFE ID comes from its namespace and service account (`default` when the
pod names none) through `WebhookConfig.spiffe_id_template`; the pod has no say in it.
"""

from __future__ import annotations

import base64
import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from trustmesh.errors import Code, ConfigError, PeerError
from trustmesh.k8s.webhook_config import CredentialMode, WebhookConfig, parse_port

__all__ = [
    "ANNOTATION_APP_PORT",
    "ANNOTATION_INJECT",
    "ANNOTATION_SPIFFE_ID",
    "LABEL_INJECTED",
    "SIDECAR_NAME",
    "Injection",
    "InvalidAdmissionReviewError",
    "Outcome",
    "admission_request",
    "decide",
    "mutate",
    "response_for",
]

ANNOTATION_INJECT = "trustmesh.dev/inject"
ANNOTATION_APP_PORT = "trustmesh.dev/app-port"
ANNOTATION_SPIFFE_ID = "trustmesh.dev/spiffe-id"
LABEL_INJECTED = "trustmesh.dev/injected"
SIDECAR_NAME = "trustmesh-sidecar"
DATA_VOLUME = "trustmesh-data"
TMP_VOLUME = "trustmesh-tmp"
SPIFFE_VOLUME = "spiffe-workload-api"
SPIFFE_SOCKET_DIR = "/spiffe-workload-api"
DATA_DIR = "/var/run/trustmesh"
OUTBOUND_PORT, INBOUND_PORT, ADMIN_PORT = 15001, 15443, 15000
RUN_AS = 65532
_REVIEW_API = "admission.k8s.io/v1"


class InvalidAdmissionReviewError(PeerError):
    """The request is not an AdmissionReview we can answer (no uid to answer to)."""

    code = Code.INVALID_ARGUMENT
    reason = "invalid_admission_review"


class Outcome(enum.Enum):
    UNCHANGED = "unchanged"
    INJECTED = "injected"
    REFUSED = "refused"


@dataclass(frozen=True, slots=True)
class Injection:
    outcome: Outcome
    reason: str  # stable: not_pod_create, not_requested, already_injected, injected, ...
    message: str
    patch: tuple[dict[str, Any], ...] = field(default=())

    @property
    def allowed(self) -> bool:
        return self.outcome is not Outcome.REFUSED


class _Refused(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _escape(key: str) -> str:
    """A JSON Pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def admission_request(review: object) -> Mapping[str, Any]:
    if not isinstance(review, Mapping):
        raise InvalidAdmissionReviewError("the body is not a JSON object")
    if review.get("apiVersion") != _REVIEW_API or review.get("kind") != "AdmissionReview":
        raise InvalidAdmissionReviewError(
            f"expected apiVersion {_REVIEW_API!r} kind 'AdmissionReview', got "
            f"{review.get('apiVersion')!r} {review.get('kind')!r}"
        )
    request = review.get("request")
    if not isinstance(request, Mapping):
        raise InvalidAdmissionReviewError("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise InvalidAdmissionReviewError("the AdmissionReview request has no uid")
    return request


def _is_pod_create(request: Mapping[str, Any]) -> bool:
    kind = request.get("kind")
    return (
        request.get("operation") == "CREATE"
        and isinstance(kind, Mapping)
        and kind.get("group", "") == ""
        and kind.get("kind") == "Pod"
        and not request.get("subResource")
    )


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise _Refused("bad_pod", f"{where} must be an object")
    return value


def _string_map(value: object, where: str) -> Mapping[str, str]:
    m = _mapping(value, where)
    for k, v in m.items():
        if not isinstance(v, str):
            raise _Refused("bad_pod", f"{where}[{k!r}] must be a string")
    return m


def decide(request: Mapping[str, Any], config: WebhookConfig) -> Injection:
    """The injection decision for one AdmissionRequest (already checked by `admission_request`)."""
    if not _is_pod_create(request):
        return Injection(Outcome.UNCHANGED, "not_pod_create", "not a Pod CREATE")
    pod = request.get("object")
    if not isinstance(pod, Mapping):
        raise InvalidAdmissionReviewError("a Pod CREATE request carries no object")
    try:
        meta = _mapping(pod.get("metadata"), "metadata")
        annotations = _string_map(meta.get("annotations"), "metadata.annotations")
    except _Refused:
        return Injection(Outcome.UNCHANGED, "not_requested", "no readable annotations")
    wanted = annotations.get(ANNOTATION_INJECT)
    if wanted is None or wanted == "false":
        return Injection(Outcome.UNCHANGED, "not_requested", f"{ANNOTATION_INJECT} is not 'true'")
    try:
        if wanted != "true":
            raise _Refused(
                "bad_annotation", f'{ANNOTATION_INJECT} must be "true" or "false", got {wanted!r}'
            )
        spec = _mapping(pod.get("spec"), "spec")
        containers = spec.get("containers")
        init = spec.get("initContainers") or []
        if not isinstance(containers, list) or not isinstance(init, list):
            raise _Refused("bad_pod", "spec.containers and spec.initContainers must be lists")
        names = {c.get("name") for c in [*containers, *init] if isinstance(c, Mapping)}
        if SIDECAR_NAME in names:
            return Injection(
                Outcome.UNCHANGED, "already_injected", f"the pod already has {SIDECAR_NAME}"
            )
        patch, sid = _patch(request, meta, annotations, spec, config)
    except _Refused as e:
        return Injection(
            Outcome.REFUSED, e.reason, f"trustmesh: cannot inject the sidecar: {e.message}"
        )
    return Injection(
        Outcome.INJECTED, "injected", f"injected {SIDECAR_NAME} as {sid}", tuple(patch)
    )


def _patch(
    request: Mapping[str, Any],
    meta: Mapping[str, Any],
    annotations: Mapping[str, str],
    spec: Mapping[str, Any],
    config: WebhookConfig,
) -> tuple[list[dict[str, Any]], str]:
    namespace = request.get("namespace") or meta.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        raise _Refused("bad_pod", "the request names no namespace")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    if not isinstance(account, str):
        raise _Refused("bad_pod", "spec.serviceAccountName must be a string")
    try:
        spiffe_id = config.spiffe_id(namespace, account)
        secret = config.secret_name(namespace, account)
        port_text = annotations.get(ANNOTATION_APP_PORT)
        app_port = (
            config.app_port if port_text is None else parse_port(port_text, ANNOTATION_APP_PORT)
        )
    except ConfigError as e:
        raise _Refused(
            "bad_annotation" if "app-port" in e.message else "bad_identity", e.message
        ) from e
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise _Refused("bad_pod", "spec.volumes must be a list")
    new_volumes = _volumes(config)
    existing = {str(v.get("name")) for v in volumes if isinstance(v, Mapping)}
    taken = existing & {str(v["name"]) for v in new_volumes}
    if taken:
        raise _Refused("name_conflict", f"the pod already has volume(s) {', '.join(sorted(taken))}")

    ops: list[dict[str, Any]] = []
    labels = _string_map(meta.get("labels"), "metadata.labels")
    ops += _add_to_map("/metadata/labels", labels, {LABEL_INJECTED: "true"})
    ops += _add_to_map("/metadata/annotations", annotations, {ANNOTATION_SPIFFE_ID: str(spiffe_id)})
    ops += _append("/spec/volumes", volumes, new_volumes)
    sidecar = _container(config, str(spiffe_id), secret, app_port)
    if config.native_sidecar:
        # First, so that the other init containers can already use the mesh.
        if spec.get("initContainers"):
            ops.append({"op": "add", "path": "/spec/initContainers/0", "value": sidecar})
        else:
            ops.append({"op": "add", "path": "/spec/initContainers", "value": [sidecar]})
    else:
        ops.append({"op": "add", "path": "/spec/containers/-", "value": sidecar})
    return ops, str(spiffe_id)


def _add_to_map(
    path: str, current: Mapping[str, str], items: dict[str, str]
) -> list[dict[str, Any]]:
    if not current:
        return [{"op": "add", "path": path, "value": dict(items)}]
    return [{"op": "add", "path": f"{path}/{_escape(k)}", "value": v} for k, v in items.items()]


def _append(path: str, current: list[Any], items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not current:
        return [{"op": "add", "path": path, "value": items}]
    return [{"op": "add", "path": f"{path}/-", "value": item} for item in items]


def _volumes(config: WebhookConfig) -> list[dict[str, Any]]:
    memory = {"medium": "Memory", "sizeLimit": "16Mi"}
    volumes: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "emptyDir": dict(memory)},
        {"name": TMP_VOLUME, "emptyDir": dict(memory)},
    ]
    if config.credentials is CredentialMode.SPIFFE:
        volumes.append(
            {"name": SPIFFE_VOLUME, "csi": {"driver": "csi.spiffe.io", "readOnly": True}}
        )
    return volumes


def _container(config: WebhookConfig, spiffe_id: str, secret: str, app_port: int) -> dict[str, Any]:
    env: list[dict[str, Any]] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TRUSTMESH_SPIFFE_ID", "value": spiffe_id},
        {"name": "TRUSTMESH_REGISTRY", "value": config.registry},
    ]
    if config.registry_bootstrap:
        env.append({"name": "TRUSTMESH_REGISTRY_BOOTSTRAP", "value": config.registry_bootstrap})
    env += [
        {"name": "TRUSTMESH_APP", "value": f"127.0.0.1:{app_port}"},
        {"name": "TRUSTMESH_OUTBOUND", "value": f"127.0.0.1:{OUTBOUND_PORT}"},
        {"name": "TRUSTMESH_INBOUND", "value": f"0.0.0.0:{INBOUND_PORT}"},
        {"name": "TRUSTMESH_ADVERTISE", "value": f"$(POD_IP):{INBOUND_PORT}"},
        # The kubelet's gRPC probe dials the pod IP. The admin API is read-only.
        {"name": "TRUSTMESH_ADMIN", "value": f"0.0.0.0:{ADMIN_PORT}"},
        {"name": "TRUSTMESH_DATA_DIR", "value": f"{DATA_DIR}/data"},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": DATA_VOLUME, "mountPath": DATA_DIR},
        {"name": TMP_VOLUME, "mountPath": "/tmp"},  # noqa: S108 - the TLS bridge's sockets
    ]
    if config.credentials is CredentialMode.JOIN_TOKEN:
        env += [
            {
                "name": "TRUSTMESH_JOIN_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}},
            },
            {"name": "TRUSTMESH_CA_FINGERPRINT", "value": config.ca_fingerprint},
        ]
    else:
        env += [
            {"name": "TRUSTMESH_CREDENTIALS", "value": "spiffe"},
            {
                "name": "SPIFFE_ENDPOINT_SOCKET",
                "value": f"unix://{SPIFFE_SOCKET_DIR}/spire-agent.sock",
            },
        ]
        mounts.append({"name": SPIFFE_VOLUME, "mountPath": SPIFFE_SOCKET_DIR, "readOnly": True})
    env += [{"name": name, "value": value} for name, value in config.extra_env]

    def grpc_probe(period: int, failures: int) -> dict[str, Any]:
        return {"grpc": {"port": ADMIN_PORT}, "periodSeconds": period, "failureThreshold": failures}

    container: dict[str, Any] = {
        "name": SIDECAR_NAME,
        "image": config.image,
        "imagePullPolicy": config.image_pull_policy,
        "args": ["sidecar", "run"],
        "ports": [
            {"name": "tm-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP"},
            {"name": "tm-admin", "containerPort": ADMIN_PORT, "protocol": "TCP"},
        ],
        "env": env,
        "volumeMounts": mounts,
        # Startup covers the join (registry reachable, token valid); readiness holds
        # the pod out of Services until the sidecar has an SVID and a snapshot.
        "startupProbe": grpc_probe(2, 90),
        "readinessProbe": grpc_probe(5, 3),
        "livenessProbe": grpc_probe(10, 6),
        "resources": {
            "requests": {"cpu": config.cpu_request, "memory": config.memory_request},
            "limits": {"cpu": config.cpu_limit, "memory": config.memory_limit},
        },
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.native_sidecar:
        container["restartPolicy"] = "Always"
    return container


def mutate(review: object, config: WebhookConfig) -> dict[str, Any]:
    """The AdmissionReview answering `review`; raises `InvalidAdmissionReviewError`."""
    return response_for(review, decide(admission_request(review), config))


def response_for(review: object, injection: Injection) -> dict[str, Any]:
    uid = admission_request(review)["uid"]
    response: dict[str, Any] = {"uid": uid, "allowed": injection.allowed}
    if injection.outcome is Outcome.REFUSED:
        response["status"] = {"code": 403, "reason": "Forbidden", "message": injection.message}
    elif injection.patch:
        body = json.dumps(list(injection.patch), separators=(",", ":")).encode()
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(body).decode()
    return {"apiVersion": _REVIEW_API, "kind": "AdmissionReview", "response": response}
