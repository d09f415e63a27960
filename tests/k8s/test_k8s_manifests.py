"""Every kustomization renders with the real kustomize and every object is valid offline.

Rendering needs `kustomize` or `kubectl` on PATH (k8s_support.renderer); validation
uses the schemas shipped by `kubernetes-validate` (strict), our CRDs' schemas for our
kinds, and a hand-written schema for SPIRE's ClusterSPIFFEID.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import pytest
from k8s_support import (
    CLUSTER_SCOPED,
    KUSTOMIZATIONS,
    MIN_VERSION,
    containers,
    errors,
    ident,
    newest_version,
    render,
)

from trustmesh.k8s.webhook_config import CredentialMode, WebhookConfig
from trustmesh.manifest import parse_resource, validate_batch

FAKE_FINGERPRINT = "sha256:" + "ab" * 32
TRUSTMESH_IMAGE = "trustmesh/trustmesh:0.1.0"


def by_kind(objs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: tuple[dict[str, Any], ...], kind: str, name_prefix: str) -> dict[str, Any]:
    found = [o for o in by_kind(objs, kind) if o["metadata"]["name"].startswith(name_prefix)]
    assert len(found) == 1, f"{kind}/{name_prefix}*: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("version", [MIN_VERSION, newest_version()])
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_rendered_object_is_valid(kustomization: str, version: str) -> None:
    objs = render(kustomization)
    assert objs
    problems = [p for o in objs for p in errors(o, version)]
    assert problems == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_scopes_and_unique_names(kustomization: str) -> None:
    objs = render(kustomization)
    for o in objs:
        namespaced = o["kind"] not in CLUSTER_SCOPED
        assert ("namespace" in o["metadata"]) is namespaced, ident(o)
    names = [ident(o) for o in objs]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_references_resolve(kustomization: str) -> None:
    """Every ConfigMap and ServiceAccount a pod names is rendered (Secrets are the operator's)."""
    objs = render(kustomization)
    present = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    # Made by the operator after install (docs/kubernetes.md), never rendered.
    external = {"trustmesh-trust-bundle"}
    for d in by_kind(objs, "Deployment"):
        ns, spec = d["metadata"]["namespace"], d["spec"]["template"]["spec"]
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", ns, spec["serviceAccountName"]) in present, ident(d)
        refs = [v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v]
        refs += [
            e["valueFrom"]["configMapKeyRef"]["name"]
            for c in containers(d)
            for e in c.get("env", [])
            if "configMapKeyRef" in e.get("valueFrom", {})
        ]
        for name in refs:
            assert name in external or ("ConfigMap", ns, name) in present, f"{ident(d)}: {name}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_containers_are_locked_down(kustomization: str) -> None:
    for d in by_kind(render(kustomization), "Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, ident(d)
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, ident(d)
        assert (
            isinstance(pod["securityContext"]["runAsUser"], int)
            and pod["securityContext"]["runAsUser"] > 0
        )
        for c in containers(d):
            where = f"{ident(d)} {c['name']}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert set(c["resources"]) == {"requests", "limits"}, where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where


def test_registry_deployment() -> None:
    objs = render("base")
    reg = one(objs, "Deployment", "trustmesh-registry")
    spec = reg["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    (init,) = spec["template"]["spec"]["initContainers"]
    assert init["command"] == ["/bin/sh", "/etc/trustmesh/init/init-datadir.sh"]
    (server,) = spec["template"]["spec"]["containers"]
    assert server["args"] == ["registry", "serve"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["TRUSTMESH_LISTEN"] == "0.0.0.0:8443"
    assert env["TRUSTMESH_BOOTSTRAP_LISTEN"] == "0.0.0.0:8444"
    assert env["TRUSTMESH_HEALTH_LISTEN"] == "0.0.0.0:8445"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        # gRPC health on the plaintext health-only port: the API ports are TLS.
        assert server[probe]["grpc"] == {"port": 8445}, probe
    volumes = {v["name"]: v for v in spec["template"]["spec"]["volumes"]}
    assert volumes["data"]["persistentVolumeClaim"]["claimName"] == "trustmesh-registry-data"
    assert volumes["ca"]["secret"] == {
        "secretName": "trustmesh-ca",
        "optional": True,
        "defaultMode": 0o440,
    }
    one(objs, "PersistentVolumeClaim", "trustmesh-registry-data")
    one(objs, "ServiceAccount", "trustmesh-registry")
    svc = one(objs, "Service", "trustmesh-registry")
    assert {p["port"] for p in svc["spec"]["ports"]} == {8443, 8444}


def test_reconciler_rbac_reads_only_our_crds() -> None:
    objs = render("base")
    (role,) = by_kind(objs, "ClusterRole")
    crd_plurals = {c["spec"]["names"]["plural"] for c in by_kind(objs, "CustomResourceDefinition")}
    assert role["rules"] == [
        {
            "apiGroups": ["trustmesh.dev"],
            "resources": sorted(
                crd_plurals,
                key=["agentblueprints", "agents", "accesspolicies", "delegationpolicies"].index,
            ),
            "verbs": ["get", "list", "watch"],
        }
    ]
    (binding,) = by_kind(objs, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "trustmesh-reconciler", "namespace": "trustmesh-system"}
    ]
    rec = one(objs, "Deployment", "trustmesh-reconciler")
    assert rec["spec"]["template"]["spec"]["serviceAccountName"] == "trustmesh-reconciler"
    assert containers(rec)[0]["args"] == ["reconcile"]


def test_mutating_webhook_configuration() -> None:
    objs = render("base")
    (mwc,) = by_kind(objs, "MutatingWebhookConfiguration")
    (hook,) = mwc["webhooks"]
    assert hook["failurePolicy"] == "Fail"  # docs/adr/0008-webhook-failure-policy.md
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]
    assert hook["clientConfig"]["service"] == {
        "name": "trustmesh-webhook",
        "namespace": "trustmesh-system",
        "path": "/mutate",
        "port": 443,
    }
    selector = hook["namespaceSelector"]
    assert selector["matchLabels"] == {"trustmesh.dev/injection": "enabled"}
    (excluded,) = selector["matchExpressions"]
    assert {"trustmesh-system", "kube-system"} <= set(excluded["values"])
    assert excluded["operator"] == "NotIn"
    # The injector's own namespace can never opt in by label.
    (ns,) = [n for n in by_kind(objs, "Namespace") if n["metadata"]["name"] == "trustmesh-system"]
    assert "trustmesh.dev/injection" not in ns["metadata"].get("labels", {})
    one(objs, "PodDisruptionBudget", "trustmesh-webhook")


def webhook_config(objs: tuple[dict[str, Any], ...]) -> WebhookConfig:
    data = dict(one(objs, "ConfigMap", "trustmesh-webhook")["data"])
    if data.get("credentials", "join-token") == "join-token":
        data["caFingerprint"] = FAKE_FINGERPRINT  # from the trust-bundle ConfigMap in a cluster
    return WebhookConfig.from_flat(data)


@pytest.mark.parametrize(
    ("kustomization", "credentials", "otlp"),
    [
        ("base", CredentialMode.JOIN_TOKEN, None),
        ("overlays/spire", CredentialMode.SPIFFE, None),
        (
            "overlays/observability",
            CredentialMode.JOIN_TOKEN,
            "http://otel-collector.trustmesh-system.svc:4317",
        ),
        ("overlays/examples", CredentialMode.JOIN_TOKEN, None),
        (
            "overlays/demo",
            CredentialMode.JOIN_TOKEN,
            "http://otel-collector.trustmesh-system.svc:4317",
        ),
    ],
)
def test_webhook_config_map_is_a_valid_config(
    kustomization: str, credentials: CredentialMode, otlp: str | None
) -> None:
    objs = render(kustomization)
    config = webhook_config(objs)
    assert config.credentials is credentials
    assert dict(config.extra_env).get("OTEL_EXPORTER_OTLP_ENDPOINT") == otlp
    assert config.image == TRUSTMESH_IMAGE
    registry = one(objs, "Service", "trustmesh-registry")
    assert config.registry == f"trustmesh-registry.{registry['metadata']['namespace']}.svc:8443"
    if otlp:
        collector = one(objs, "Service", "otel-collector")
        assert otlp.endswith(f"otel-collector.{collector['metadata']['namespace']}.svc:4317")
        reg_env = {
            e["name"]: e.get("value")
            for e in containers(one(objs, "Deployment", "trustmesh-registry"))[1]["env"]
        }
        assert reg_env["OTEL_EXPORTER_OTLP_ENDPOINT"] == otlp


def test_spire_overlay_registers_what_the_webhook_derives() -> None:
    objs = render("overlays/spire")
    cid = one(objs, "ClusterSPIFFEID", "trustmesh-agents")
    config = webhook_config(objs)
    # Our template with SPIRE's placeholders gives SPIRE's template.
    as_spire = (
        config.spiffe_id_template.replace("{trustDomain}", "{{ .TrustDomain }}")
        .replace("{namespace}", "{{ .PodMeta.Namespace }}")
        .replace("{serviceAccount}", "{{ .PodSpec.ServiceAccountName }}")
    )
    assert cid["spec"]["spiffeIDTemplate"] == as_spire
    assert cid["spec"]["podSelector"] == {"matchLabels": {"trustmesh.dev/injected": "true"}}
    (hook,) = one(objs, "MutatingWebhookConfiguration", "trustmesh")["webhooks"]
    assert (
        cid["spec"]["namespaceSelector"]["matchLabels"] == hook["namespaceSelector"]["matchLabels"]
    )


def test_spire_overlay_runs_the_registry_on_spiffe_credentials() -> None:
    objs = render("overlays/spire")
    reg = one(objs, "Deployment", "trustmesh-registry")
    pod = reg["spec"]["template"]["spec"]
    server = next(c for c in pod["containers"] if c["name"] == "registry")
    assert server["args"] == ["registry", "serve"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["TRUSTMESH_CREDENTIALS"] == "spiffe"
    assert env["SPIFFE_ENDPOINT_SOCKET"] == "unix:///spiffe-workload-api/spire-agent.sock"
    # The base's settings survive the patch.
    assert env["TRUSTMESH_LISTEN"] == "0.0.0.0:8443"
    assert env["TRUSTMESH_DATA_DIR"] == "/var/lib/trustmesh/data"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["spiffe-workload-api"] == {
        "name": "spiffe-workload-api",
        "csi": {"driver": "csi.spiffe.io", "readOnly": True},
    }
    assert {"data", "init", "ca", "tmp"} <= set(volumes)
    mounts = {m["name"]: m for m in server["volumeMounts"]}
    assert mounts["spiffe-workload-api"]["mountPath"] == "/spiffe-workload-api"
    assert mounts["spiffe-workload-api"]["readOnly"] is True
    # The socket path is under the mount, and matches what the injector gives sidecars.
    assert env["SPIFFE_ENDPOINT_SOCKET"].startswith("unix:///spiffe-workload-api/")

    # The flags `registry serve` reads from that environment select SPIFFE mode.
    from trustmesh.cli.main import build_parser

    parser_env = {k: v for k, v in env.items() if v is not None}
    with mock.patch.dict(os.environ, parser_env):
        args = build_parser().parse_args(["registry", "serve"])
    assert args.credentials == "spiffe"
    assert args.spiffe_endpoint_socket == "unix:///spiffe-workload-api/spire-agent.sock"

    # SPIRE gives the registry pod exactly the ID sidecars and operators expect.
    cid = one(objs, "ClusterSPIFFEID", "trustmesh-registry")
    assert cid["spec"]["spiffeIDTemplate"] == "spiffe://{{ .TrustDomain }}/trustmesh/registry"
    selected = cid["spec"]["podSelector"]["matchLabels"]
    assert selected.items() <= pod_labels(reg).items()
    assert cid["spec"]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": reg["metadata"]["namespace"]
    }
    # ...and the agents' entry can't also match it (two IDs for one pod).
    agents = one(objs, "ClusterSPIFFEID", "trustmesh-agents")
    assert not agents["spec"]["podSelector"]["matchLabels"].items() <= pod_labels(reg).items()
    # Without SPIRE the registry keeps its embedded-CA mode.
    base_reg = one(render("base"), "Deployment", "trustmesh-registry")
    base_env = {e["name"] for c in containers(base_reg) for e in c.get("env", [])}
    assert not {"TRUSTMESH_CREDENTIALS", "SPIFFE_ENDPOINT_SOCKET"} & base_env


def pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    return dict(deployment["spec"]["template"]["metadata"]["labels"])


def test_observability_overlay_wires_collector_to_jaeger() -> None:
    import yaml

    objs = render("overlays/observability")
    collector_cfg = yaml.safe_load(one(objs, "ConfigMap", "otel-collector")["data"]["config.yaml"])
    jaeger = one(objs, "Service", "jaeger")
    endpoint = collector_cfg["exporters"]["otlp/jaeger"]["endpoint"]
    assert endpoint == f"jaeger.{jaeger['metadata']['namespace']}.svc:4317"
    assert collector_cfg["service"]["pipelines"]["traces"]["exporters"] == ["otlp/jaeger"]
    assert {p["port"] for p in jaeger["spec"]["ports"]} == {16686, 4317}
    assert collector_cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")


def test_examples_resources_are_accepted_by_trustmesh_apply() -> None:
    """The example CRs parse as `trustmesh apply` documents and agree with the pods' IDs."""
    objs = render("overlays/examples")
    crs = [o for o in objs if o["apiVersion"] == "trustmesh.dev/v1alpha1"]
    assert {o["kind"] for o in crs} == {
        "AgentBlueprint",
        "Agent",
        "AccessPolicy",
        "DelegationPolicy",
    }
    resources = [
        parse_resource(
            {k: o[k] for k in ("apiVersion", "kind", "spec")}
            | {"metadata": {"name": o["metadata"]["name"]}},
            ident(o),
        )
        for o in crs
    ]
    validate_batch(resources, set())
    config = webhook_config(objs)
    agents = {o["metadata"]["name"]: o["spec"]["spiffeId"] for o in crs if o["kind"] == "Agent"}
    deployments = [
        d for d in by_kind(objs, "Deployment") if d["metadata"]["namespace"] == "trustmesh-examples"
    ]
    assert len(deployments) == 2
    for d in deployments:
        pod = d["spec"]["template"]
        assert pod["metadata"]["annotations"]["trustmesh.dev/inject"] == "true"
        sa = pod["spec"]["serviceAccountName"]
        assert str(config.spiffe_id(d["metadata"]["namespace"], sa)) == agents[sa]
    (ns,) = [n for n in by_kind(objs, "Namespace") if n["metadata"]["name"] == "trustmesh-examples"]
    assert ns["metadata"]["labels"]["trustmesh.dev/injection"] == "enabled"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_trustmesh_images_match_the_dockerfile_tag(kustomization: str) -> None:
    for d in by_kind(render(kustomization), "Deployment"):
        for c in containers(d):
            if "trustmesh" in c["image"]:
                assert c["image"] == TRUSTMESH_IMAGE, f"{ident(d)} {c['name']}"


def _edit(kind: str, name: str, change: Any) -> Any:
    import copy

    def make(objs: tuple[dict[str, Any], ...]) -> dict[str, Any]:
        obj = copy.deepcopy(one(objs, kind, name))
        change(obj)
        return obj

    return make


@pytest.mark.parametrize(
    ("case", "make", "expected"),
    [
        pytest.param(
            "unknown container field",
            _edit(
                "Deployment",
                "trustmesh-registry",
                lambda o: o["spec"]["template"]["spec"]["containers"][0].update(imagePolicy="x"),
            ),
            "spec.template.spec.containers.0: Additional properties are not allowed "
            "('imagePolicy' was unexpected)",
            id="unknown-field",
        ),
        pytest.param(
            "probe port of the wrong type",
            _edit(
                "Deployment",
                "trustmesh-webhook",
                lambda o: o["spec"]["template"]["spec"]["containers"][0]["readinessProbe"][
                    "httpGet"
                ].update(port=1.5),
            ),
            "spec.template.spec.containers.0.readinessProbe.httpGet.port",
            id="wrong-type",
        ),
        pytest.param(
            "Agent CR without sponsor",
            _edit("Agent", "planner", lambda o: o["spec"].pop("sponsor")),
            "Agent/planner: spec: 'sponsor' is a required property",
            id="cr-missing-field",
        ),
        pytest.param(
            "AccessPolicy selector with two keys",
            _edit("AccessPolicy", "example", lambda o: o["spec"]["callers"][0].update(name="x")),
            "spec.callers.0: {'blueprint': 'example-orchestrator', 'name': 'x'} has too many properties",
            id="cr-two-selector-keys",
        ),
        pytest.param(
            "ClusterSPIFFEID typo",
            _edit(
                "ClusterSPIFFEID", "trustmesh-agents", lambda o: o["spec"].update(podSelecter={})
            ),
            "Additional properties are not allowed ('podSelecter' was unexpected)",
            id="spire-typo",
        ),
    ],
)
def test_validation_catches_mistakes(case: str, make: Any, expected: str) -> None:
    objs = render("overlays/examples") + tuple(by_kind(render("overlays/spire"), "ClusterSPIFFEID"))
    problems = errors(make(objs), MIN_VERSION)
    assert any(expected in p for p in problems), (case, problems)
