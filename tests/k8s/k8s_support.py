"""Helpers for tests/k8s: render the kustomizations, validate objects offline.

* `render(path)` runs the real kustomize: `kustomize build`, or `kubectl kustomize`
  (kubectl has kustomize built in). No renderer on PATH skips the rendering tests,
  except under CI (`CI=true`), where it fails: CI must never pass by rendering nothing.
* `validate(obj, version)` checks one object against the Kubernetes OpenAPI schemas
  that the `kubernetes-validate` package ships (strict: unknown fields are errors),
  with the same schema files and resolution as `kubernetes_validate.validate`, but
  with the validators cached (that function re-reads a 1 MB file per call).
* Our own kinds are checked against the `openAPIV3Schema` of our CRDs; ClusterSPIFFEID
  (SPIRE's, no offline schema) against a minimal hand-written schema in `schemas/`.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import referencing
import yaml
from kubernetes_validate import utils as kv

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
HERE = Path(__file__).resolve().parent
KUSTOMIZATIONS = (
    "base",
    "overlays/spire",
    "overlays/observability",
    "overlays/examples",
    "overlays/demo",
)
# The oldest Kubernetes these manifests support (native sidecars are on by default
# from 1.29) and the newest that kubernetes-validate knows.
MIN_VERSION = "1.30"
CLUSTER_SCOPED = {
    "Namespace",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleBinding",
    "MutatingWebhookConfiguration",
    "ClusterSPIFFEID",
    "AgentBlueprint",
    "Agent",
    "AccessPolicy",
    "DelegationPolicy",
}


def newest_version() -> str:
    return kv.major_minor(kv.latest_version())


def renderer() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    kubectl = shutil.which("kubectl")
    if kubectl:
        probe = subprocess.run([kubectl, "kustomize", "--help"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [kubectl, "kustomize"]
    return None


def need_renderer() -> list[str]:
    cmd = renderer()
    if cmd is None:
        message = (
            "no kustomize renderer: install kustomize, or kubectl (which includes it); "
            "Debian's kubernetes-client is too old (kustomize v2)"
        )
        pytest.fail(message)  # a missing renderer must not pass as a green run
    return cmd


@functools.cache
def render(kustomization: str) -> tuple[dict[str, Any], ...]:
    cmd = need_renderer()
    out = subprocess.run(
        [*cmd, str(K8S / kustomization)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, f"{' '.join(cmd)} {kustomization} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def ident(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata", {})
    ns = meta.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{meta.get('name')}"


@functools.cache
def _definitions(schema_dir: str) -> referencing.Registry[Any]:
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", schema_dir)
    return referencing.Resource.from_contents(defs) @ referencing.Registry()


@functools.cache
def _k8s_validator(version: str, kind: str, api_version: str) -> jsonschema.Validator:
    full = [v for v in kv.all_versions() if kv.major_minor(v) == version]
    assert full, f"kubernetes-validate has no schemas for {version}"
    schema_dir = f"v{full[-1]}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group}.json", version
        )
    except FileNotFoundError:
        raise LookupError(f"no schema for {kind} {api_version} in Kubernetes {version}") from None
    registry = referencing.Resource.from_contents(schema) @ _definitions(schema_dir)
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def crd_validators() -> dict[tuple[str, str], jsonschema.Validator]:
    """(apiVersion, kind) -> a validator for our CRDs' schemas and the hand-written ones."""
    out: dict[tuple[str, str], jsonschema.Validator] = {}
    for path in sorted((K8S / "base" / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            schema = v["schema"]["openAPIV3Schema"]
            out[(f"{group}/{v['name']}", kind)] = jsonschema.Draft4Validator(schema)
    for path in sorted((HERE / "schemas").glob("*.json")):
        schema = json.loads(path.read_text())
        key = (schema["x-api-version"], schema["x-kind"])
        out[key] = jsonschema.Draft4Validator(schema)
    return out


def errors(obj: Mapping[str, Any], version: str) -> list[str]:
    """Schema errors of one object ([] when valid), each with the path it is at."""
    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    validator = crd_validators().get(key) or _k8s_validator(version, key[1], key[0])
    return [
        f"{ident(obj)}: {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(obj)
    ]


def containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return [*spec.get("initContainers", []), *spec.get("containers", [])]


def load(path: Path) -> Any:
    return (
        json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    )
