"""`mutate()` on AdmissionReview (v1) JSON: the patch, applied with `jsonpatch`, gives a
valid pod (validated with the Kubernetes schemas, strict).

`recorded/admission-review-pod-create.json` is a Pod CREATE as the API server sends it
for a ReplicaSet's pod (defaulted spec, generateName, no name). It is written by hand in
that wire format: no API server runs here. Each case edits a copy of it.
"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import jsonpatch
import pytest
from k8s_support import HERE, MIN_VERSION, errors, newest_version

from trustmesh.k8s.webhook import (
    InvalidAdmissionReviewError,
    Outcome,
    admission_request,
    decide,
    mutate,
)
from trustmesh.k8s.webhook_config import WebhookConfig

RECORDED = json.loads((HERE / "recorded" / "admission-review-pod-create.json").read_text())
FINGERPRINT = "sha256:" + "0f" * 32
SETTINGS = {
    "trustDomain": "example.org",
    "image": "trustmesh/trustmesh:0.1.0",
    "registry": "trustmesh-registry.trustmesh-system.svc:8443",
    "registryBootstrap": "trustmesh-registry.trustmesh-system.svc:8444",
    "caFingerprint": FINGERPRINT,
}
CONFIG = WebhookConfig.from_flat(SETTINGS)
Edit = Callable[[dict[str, Any]], None]


def review(*edits: Edit) -> dict[str, Any]:
    r = copy.deepcopy(RECORDED)
    for edit in edits:
        edit(r)
    return r


def pod_of(r: dict[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = r["request"]["object"]
    return obj


def annotate(value: str | None) -> Edit:
    def edit(r: dict[str, Any]) -> None:
        ann = pod_of(r)["metadata"].setdefault("annotations", {})
        if value is None:
            ann.pop("trustmesh.dev/inject")
        else:
            ann["trustmesh.dev/inject"] = value

    return edit


def spec(**changes: Any) -> Edit:
    def edit(r: dict[str, Any]) -> None:
        s = pod_of(r)["spec"]
        for k, v in changes.items():
            if v is None:
                s.pop(k, None)
            else:
                s[k] = v

    return edit


def patched(
    r: dict[str, Any], config: WebhookConfig = CONFIG
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the response, the pod with the response's patch applied)."""
    out = mutate(r, config)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    resp = out["response"]
    assert resp["uid"] == r["request"]["uid"]
    pod = pod_of(r)
    if "patch" in resp:
        assert resp["patchType"] == "JSONPatch"
        ops = json.loads(base64.b64decode(resp["patch"]))
        pod = jsonpatch.apply_patch(pod, ops)
    return resp, pod


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [
        c
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]
        if c["name"] == "trustmesh-sidecar"
    ]
    return sidecar


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def assert_valid(pod: dict[str, Any]) -> None:
    for version in (MIN_VERSION, newest_version()):
        assert errors(pod, version) == []


# -- injected --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "namespace", "account"),
    [
        pytest.param((), "trustmesh-examples", "planner", id="annotated"),
        pytest.param(
            (spec(serviceAccountName=None, serviceAccount=None),),
            "trustmesh-examples",
            "default",
            id="no-service-account-uses-default",
        ),
        pytest.param(
            (lambda r: pod_of(r)["metadata"].pop("namespace"),),
            "trustmesh-examples",
            "planner",
            id="namespace-from-the-request",
        ),
        pytest.param(
            (lambda r: pod_of(r)["metadata"].pop("labels"), spec(volumes=None)),
            "trustmesh-examples",
            "planner",
            id="no-labels-no-volumes",
        ),
    ],
)
def test_annotated_pod_is_injected(edits: tuple[Edit, ...], namespace: str, account: str) -> None:
    r = review(*edits)
    resp, pod = patched(r)
    assert resp["allowed"] is True
    assert_valid(pod)
    sid = f"spiffe://example.org/ns/{namespace}/sa/{account}"
    assert pod["metadata"]["labels"]["trustmesh.dev/injected"] == "true"
    assert pod["metadata"]["annotations"]["trustmesh.dev/spiffe-id"] == sid
    sidecar = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "trustmesh-sidecar" and sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == ["sidecar", "run"]
    env = env_of(sidecar)
    assert env["TRUSTMESH_SPIFFE_ID"] == sid
    assert env["TRUSTMESH_JOIN_TOKEN"] == {
        "secretKeyRef": {"name": f"trustmesh-join-{account}", "key": "token"}
    }
    assert env["TRUSTMESH_CA_FINGERPRINT"] == FINGERPRINT
    assert env["TRUSTMESH_REGISTRY"] == SETTINGS["registry"]
    assert env["TRUSTMESH_REGISTRY_BOOTSTRAP"] == SETTINGS["registryBootstrap"]
    assert env["TRUSTMESH_APP"] == "127.0.0.1:50051"
    assert env["TRUSTMESH_ADVERTISE"] == "$(POD_IP):15443"
    assert sidecar["env"][0]["name"] == "POD_IP"  # defined before $(POD_IP) is used
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"] == {"port": 15000}, probe
    assert env["TRUSTMESH_ADMIN"] == "0.0.0.0:15000"
    sc = sidecar["securityContext"]
    assert (
        sc["runAsNonRoot"]
        and sc["readOnlyRootFilesystem"]
        and sc["capabilities"] == {"drop": ["ALL"]}
    )
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {"trustmesh-data", "trustmesh-tmp"} <= volumes
    # The app is untouched.
    assert pod["spec"]["containers"] == pod_of(r)["spec"]["containers"]


def test_injection_is_idempotent() -> None:
    _, once = patched(review())
    again = review(lambda r: r["request"].update(object=once))
    resp, twice = patched(again)
    assert resp == {"uid": RECORDED["request"]["uid"], "allowed": True}
    assert twice == once
    assert decide(admission_request(again), CONFIG).reason == "already_injected"


def test_existing_init_containers_run_after_the_sidecar() -> None:
    init = {"name": "migrate", "image": "busybox:1.36", "command": ["true"]}
    _, pod = patched(review(spec(initContainers=[init])))
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["trustmesh-sidecar", "migrate"]
    assert_valid(pod)


def test_app_port_annotation() -> None:
    def edit(r: dict[str, Any]) -> None:
        pod_of(r)["metadata"]["annotations"]["trustmesh.dev/app-port"] = "8080"

    _, pod = patched(review(edit))
    assert env_of(sidecar_of(pod))["TRUSTMESH_APP"] == "127.0.0.1:8080"


def test_spire_mode_uses_the_csi_socket() -> None:
    config = WebhookConfig.from_flat({**SETTINGS, "credentials": "spiffe", "caFingerprint": ""})
    _, pod = patched(review(), config)
    assert_valid(pod)
    sidecar = sidecar_of(pod)
    env = env_of(sidecar)
    assert env["TRUSTMESH_CREDENTIALS"] == "spiffe"
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///spiffe-workload-api/spire-agent.sock"
    assert "TRUSTMESH_JOIN_TOKEN" not in env and "TRUSTMESH_CA_FINGERPRINT" not in env
    (csi,) = [v for v in pod["spec"]["volumes"] if "csi" in v]
    assert csi == {
        "name": "spiffe-workload-api",
        "csi": {"driver": "csi.spiffe.io", "readOnly": True},
    }
    assert {
        "name": "spiffe-workload-api",
        "mountPath": "/spiffe-workload-api",
        "readOnly": True,
    } in sidecar["volumeMounts"]


def test_classic_sidecar_and_extra_env() -> None:
    config = WebhookConfig.from_flat(
        {
            **SETTINGS,
            "nativeSidecar": "false",
            "env.OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317",
        }
    )
    _, pod = patched(review(), config)
    assert_valid(pod)
    assert "initContainers" not in pod["spec"]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent", "trustmesh-sidecar"]
    sidecar = sidecar_of(pod)
    assert "restartPolicy" not in sidecar
    assert env_of(sidecar)["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel:4317"


# -- untouched and refused ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("edits", "reason"),
    [
        pytest.param((annotate(None),), "not_requested", id="not-annotated"),
        pytest.param((annotate("false"),), "not_requested", id="annotated-false"),
        pytest.param(
            (lambda r: r["request"].update(operation="UPDATE"),), "not_pod_create", id="update"
        ),
        pytest.param(
            (
                lambda r: r["request"].update(
                    kind={"group": "apps", "version": "v1", "kind": "Deployment"}
                ),
            ),
            "not_pod_create",
            id="not-a-pod",
        ),
        pytest.param(
            (lambda r: r["request"].update(subResource="ephemeralcontainers"),),
            "not_pod_create",
            id="subresource",
        ),
        # Not asked: a broken pod is not ours to judge.
        pytest.param(
            (annotate(None), spec(containers="nonsense")), "not_requested", id="not-asked-broken"
        ),
    ],
)
def test_untouched(edits: tuple[Edit, ...], reason: str) -> None:
    r = review(*edits)
    resp, pod = patched(r)
    assert resp == {"uid": r["request"]["uid"], "allowed": True}
    assert pod == pod_of(r)
    assert decide(admission_request(r), CONFIG).reason == reason


@pytest.mark.parametrize(
    ("edits", "reason", "message"),
    [
        pytest.param(
            (annotate("yes"),),
            "bad_annotation",
            'trustmesh.dev/inject must be "true" or "false", got \'yes\'',
            id="annotation-yes",
        ),
        pytest.param(
            (
                lambda r: pod_of(r)["metadata"]["annotations"].update(
                    {"trustmesh.dev/app-port": "http"}
                ),
            ),
            "bad_annotation",
            "trustmesh.dev/app-port: 'http' is not a port (1-65535)",
            id="app-port",
        ),
        pytest.param(
            (spec(volumes=[{"name": "trustmesh-data", "emptyDir": {}}]),),
            "name_conflict",
            "the pod already has volume(s) trustmesh-data",
            id="volume-conflict",
        ),
        pytest.param(
            (spec(containers="nonsense"),),
            "bad_pod",
            "spec.containers and spec.initContainers must be lists",
            id="containers-not-list",
        ),
        pytest.param(
            (lambda r: (r["request"].pop("namespace"), pod_of(r)["metadata"].pop("namespace")),),
            "bad_pod",
            "the request names no namespace",
            id="no-namespace",
        ),
    ],
)
def test_refused(edits: tuple[Edit, ...], reason: str, message: str) -> None:
    r = review(*edits)
    resp = mutate(r, CONFIG)["response"]
    assert resp["allowed"] is False and "patch" not in resp
    assert resp["status"] == {
        "code": 403,
        "reason": "Forbidden",
        "message": f"trustmesh: cannot inject the sidecar: {message}",
    }
    injection = decide(admission_request(r), CONFIG)
    assert (injection.outcome, injection.reason) == (Outcome.REFUSED, reason)


def test_refused_when_the_template_cannot_make_an_id() -> None:
    config = WebhookConfig.from_flat(
        {**SETTINGS, "spiffeIdTemplate": "spiffe://{trustDomain}/sa/{serviceAccount}"}
    )
    r = review(spec(serviceAccountName="Bad Name"))
    resp = mutate(r, config)["response"]
    assert resp["allowed"] is False
    assert resp["status"]["message"].startswith(
        "trustmesh: cannot inject the sidecar: spiffeIdTemplate gives an invalid SPIFFE ID: "
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param([], "the body is not a JSON object", id="not-an-object"),
        pytest.param(
            {**RECORDED, "apiVersion": "admission.k8s.io/v1beta1"},
            "expected apiVersion 'admission.k8s.io/v1' kind 'AdmissionReview', "
            "got 'admission.k8s.io/v1beta1' 'AdmissionReview'",
            id="v1beta1",
        ),
        pytest.param(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"},
            "the AdmissionReview has no request",
            id="no-request",
        ),
        pytest.param(
            review(lambda r: r["request"].pop("uid")),
            "the AdmissionReview request has no uid",
            id="no-uid",
        ),
        pytest.param(
            review(lambda r: r["request"].update(object=None)),
            "a Pod CREATE request carries no object",
            id="no-object",
        ),
    ],
)
def test_bad_reviews_are_errors(body: Any, message: str) -> None:
    with pytest.raises(InvalidAdmissionReviewError) as raised:
        mutate(body, CONFIG)
    assert raised.value.message == message
    assert raised.value.reason == "invalid_admission_review"
