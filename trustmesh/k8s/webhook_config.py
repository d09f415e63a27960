"""The injector's configuration: a flat string mapping (one ConfigMap) as a frozen value.

Each ConfigMap key is one setting, so a kustomize overlay changes one setting with a
`configMapGenerator` merge instead of rewriting a YAML document:

| key | default: meaning |
|---|---|
| `trustDomain` | required: the mesh's trust domain |
| `image` | required: the sidecar image (the TrustMesh image) |
| `registry` | required: the registry's mTLS address, `host:port` |
| `registryBootstrap` | the sidecar's default (port + 1): the bootstrap address |
| `spiffeIdTemplate` | `spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}` |
| `credentials` | `join-token` (embedded CA), or `spiffe` (SPIRE Workload API) |
| `caFingerprint` | required for `join-token`: `sha256:<hex>` of the registry CA |
| `joinTokenSecret` | `trustmesh-join-{serviceAccount}`: a Secret (key `token`) in the pod's namespace |
| `appPort` | `50051`: the agent's gRPC port on localhost (`trustmesh.dev/app-port` overrides) |
| `nativeSidecar` | `true`: an init container with `restartPolicy: Always` (Kubernetes >= 1.29) |
| `imagePullPolicy` | `IfNotPresent` |
| `cpuRequest`, `memoryRequest` | `50m`, `64Mi` |
| `cpuLimit`, `memoryLimit` | `500m`, `256Mi` |
| `env.NAME` | extra environment for every sidecar (`env.OTEL_EXPORTER_OTLP_ENDPOINT`) |

Invariants: unknown keys are rejected (a typo is never ignored); templates may use only
their documented placeholders, and the SPIFFE ID template must yield an ID in
`trustDomain` for any namespace and service account; `env.TRUSTMESH_*` is refused, so
the identity settings can be changed only through their own keys.
"""

from __future__ import annotations

import enum
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from trustmesh.errors import ConfigError, InvalidSpiffeIdError
from trustmesh.spiffe_id import SpiffeId, TrustDomain

__all__ = [
    "DEFAULT_JOIN_TOKEN_SECRET",
    "DEFAULT_SPIFFE_ID_TEMPLATE",
    "CredentialMode",
    "WebhookConfig",
    "load_config_dir",
]

DEFAULT_SPIFFE_ID_TEMPLATE = "spiffe://{trustDomain}/ns/{namespace}/sa/{serviceAccount}"
DEFAULT_JOIN_TOKEN_SECRET = "trustmesh-join-{serviceAccount}"  # noqa: S105 - a Secret name
_ID_FIELDS = frozenset({"trustDomain", "namespace", "serviceAccount"})
_SECRET_FIELDS = frozenset({"namespace", "serviceAccount"})
_FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
_ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ADDRESS_RE = re.compile(r"[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}")
_QUANTITY_RE = re.compile(r"[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|M|G)?")
_DNS_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEYS = frozenset(
    {
        "trustDomain",
        "image",
        "registry",
        "registryBootstrap",
        "spiffeIdTemplate",
        "credentials",
        "caFingerprint",
        "joinTokenSecret",
        "appPort",
        "nativeSidecar",
        "imagePullPolicy",
        "cpuRequest",
        "memoryRequest",
        "cpuLimit",
        "memoryLimit",
    }
)


class CredentialMode(enum.StrEnum):
    JOIN_TOKEN = "join-token"  # noqa: S105 - a mode name
    SPIFFE = "spiffe"


def _placeholders(template: str, allowed: frozenset[str], key: str) -> None:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(f"webhook config {key}: {template!r} is not a valid template: {e}") from e
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in allowed or spec or conversion:
            known = ", ".join("{" + n + "}" for n in sorted(allowed))
            raise ConfigError(
                f"webhook config {key}: {template!r} uses {{{name}}}; known placeholders: {known}"
            )


def _fill(template: str, values: Mapping[str, str]) -> str:
    # Placeholders were checked at load time, so plain replacement is exact.
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    trust_domain: TrustDomain
    image: str
    registry: str
    registry_bootstrap: str = ""
    spiffe_id_template: str = DEFAULT_SPIFFE_ID_TEMPLATE
    credentials: CredentialMode = CredentialMode.JOIN_TOKEN
    ca_fingerprint: str = ""
    join_token_secret: str = DEFAULT_JOIN_TOKEN_SECRET
    app_port: int = 50051
    native_sidecar: bool = True
    image_pull_policy: str = "IfNotPresent"
    cpu_request: str = "50m"
    memory_request: str = "64Mi"
    cpu_limit: str = "500m"
    memory_limit: str = "256Mi"
    extra_env: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise ConfigError("webhook config trustDomain: must be a TrustDomain")
        if not self.image or any(c.isspace() for c in self.image):
            raise ConfigError(f"webhook config image: {self.image!r} is not an image reference")
        for key, address in (
            ("registry", self.registry),
            ("registryBootstrap", self.registry_bootstrap),
        ):
            if (address or key == "registry") and not _ADDRESS_RE.fullmatch(address):
                raise ConfigError(f"webhook config {key}: {address!r} is not host:port")
        _placeholders(self.spiffe_id_template, _ID_FIELDS, "spiffeIdTemplate")
        _placeholders(self.join_token_secret, _SECRET_FIELDS, "joinTokenSecret")
        # Any namespace and service account must give an ID in our trust domain.
        self.spiffe_id("probe-ns", "probe-sa")
        self.secret_name("probe-ns", "probe-sa")
        if self.credentials is CredentialMode.JOIN_TOKEN and not self.ca_fingerprint:
            raise ConfigError(
                "webhook config caFingerprint: required with credentials 'join-token' (sidecars "
                "pin the registry CA); set it, or mount the trust bundle (docs/kubernetes.md)"
            )
        if self.ca_fingerprint and not _FINGERPRINT_RE.fullmatch(self.ca_fingerprint):
            raise ConfigError(
                f"webhook config caFingerprint: {self.ca_fingerprint!r} is not 'sha256:<64 hex>'"
            )
        check_port(self.app_port, "webhook config appPort")
        if self.image_pull_policy not in ("Always", "IfNotPresent", "Never"):
            raise ConfigError(
                f"webhook config imagePullPolicy: {self.image_pull_policy!r} is not "
                "Always, IfNotPresent or Never"
            )
        for key, qty in (
            ("cpuRequest", self.cpu_request),
            ("memoryRequest", self.memory_request),
            ("cpuLimit", self.cpu_limit),
            ("memoryLimit", self.memory_limit),
        ):
            if not _QUANTITY_RE.fullmatch(qty):
                raise ConfigError(f"webhook config {key}: {qty!r} is not a Kubernetes quantity")
        for name, _ in self.extra_env:
            if not _ENV_NAME_RE.fullmatch(name):
                raise ConfigError(f"webhook config env.{name}: not a valid variable name")
            if name.upper().startswith("TRUSTMESH_"):
                raise ConfigError(
                    f"webhook config env.{name}: TRUSTMESH_* variables are set by the injector "
                    "from their own keys"
                )

    def spiffe_id(self, namespace: str, service_account: str) -> SpiffeId:
        """The SPIFFE ID of a pod; raises `ConfigError` quoting the result if it is invalid."""
        text = _fill(
            self.spiffe_id_template,
            {
                "trustDomain": self.trust_domain.name,
                "namespace": namespace,
                "serviceAccount": service_account,
            },
        )
        try:
            sid = SpiffeId.parse(text)
        except InvalidSpiffeIdError as e:
            raise ConfigError(f"spiffeIdTemplate gives an invalid SPIFFE ID: {e}") from e
        if sid.trust_domain != self.trust_domain or not sid.path:
            raise ConfigError(
                f"spiffeIdTemplate gives {text!r}: expected a workload ID in trust domain "
                f"'{self.trust_domain}'"
            )
        return sid

    def secret_name(self, namespace: str, service_account: str) -> str:
        name = _fill(
            self.join_token_secret, {"namespace": namespace, "serviceAccount": service_account}
        )
        if len(name) > 253 or not _DNS_SUBDOMAIN_RE.fullmatch(name):
            raise ConfigError(f"joinTokenSecret gives {name!r}, which is not a valid Secret name")
        return name

    @classmethod
    def from_flat(cls, values: Mapping[str, str]) -> WebhookConfig:
        """Build from ConfigMap-style keys (see the module docstring)."""
        unknown = sorted(k for k in values if k not in _KEYS and not k.startswith("env."))
        if unknown:
            raise ConfigError(
                f"webhook config: unknown key(s) {', '.join(map(repr, unknown))} "
                f"(known: {', '.join(sorted(_KEYS))}, env.NAME)"
            )
        for key in ("trustDomain", "image", "registry"):
            if not values.get(key, "").strip():
                raise ConfigError(f"webhook config {key}: required")

        def get(key: str, default: str) -> str:
            return values.get(key, default).strip()

        try:
            trust_domain = TrustDomain.parse(get("trustDomain", ""))
        except InvalidSpiffeIdError as e:
            raise ConfigError(f"webhook config trustDomain: {e}") from e
        mode = get("credentials", CredentialMode.JOIN_TOKEN.value)
        if mode not in {m.value for m in CredentialMode}:
            raise ConfigError(f"webhook config credentials: {mode!r} is not join-token or spiffe")
        native = get("nativeSidecar", "true").lower()
        if native not in ("true", "false"):
            raise ConfigError(f"webhook config nativeSidecar: {native!r} is not true or false")
        return cls(
            trust_domain=trust_domain,
            image=get("image", ""),
            registry=get("registry", ""),
            registry_bootstrap=get("registryBootstrap", ""),
            spiffe_id_template=get("spiffeIdTemplate", DEFAULT_SPIFFE_ID_TEMPLATE),
            credentials=CredentialMode(mode),
            ca_fingerprint=get("caFingerprint", ""),
            join_token_secret=get("joinTokenSecret", DEFAULT_JOIN_TOKEN_SECRET),
            app_port=parse_port(get("appPort", "50051"), "webhook config appPort"),
            native_sidecar=native == "true",
            image_pull_policy=get("imagePullPolicy", "IfNotPresent"),
            cpu_request=get("cpuRequest", "50m"),
            memory_request=get("memoryRequest", "64Mi"),
            cpu_limit=get("cpuLimit", "500m"),
            memory_limit=get("memoryLimit", "256Mi"),
            extra_env=tuple(sorted((k[4:], v) for k, v in values.items() if k.startswith("env."))),
        )


def check_port(value: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{what}: {value!r} is not a port (1-65535)")
    return value


def parse_port(text: str, what: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"{what}: {text!r} is not a port (1-65535)")
    return check_port(int(text), what)


def load_config_dir(directory: Path, *, ca_bundle: Path | None = None) -> WebhookConfig:
    """Read a mounted ConfigMap (one file per key; dotfiles are the kubelet's own).

    Without `caFingerprint`, and with `ca_bundle` present, the fingerprint is taken
    from the bundle's first certificate: the bundle is public, and a ConfigMap of it
    is what `docs/kubernetes.md` has operators create after `registry init`.
    """
    try:
        entries = sorted(p for p in directory.iterdir() if not p.name.startswith("."))
        values = {p.name: p.read_text() for p in entries if p.is_file()}
    except OSError as e:
        raise ConfigError(f"cannot read webhook config from {directory}: {e.strerror}") from e
    if not values.get("caFingerprint", "").strip() and ca_bundle is not None and ca_bundle.exists():
        from cryptography import x509

        from trustmesh.x509svid import ca_fingerprint

        try:
            certs = x509.load_pem_x509_certificates(ca_bundle.read_bytes())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the trust bundle {ca_bundle}: {e}") from e
        values["caFingerprint"] = ca_fingerprint(certs[0])
    return WebhookConfig.from_flat(values)
