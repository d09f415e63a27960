"""The CLI's config file, like a kubeconfig: where the registry is and who we are.

```yaml
apiVersion: trustmesh.dev/v1alpha1
kind: ClientConfig
registry: 127.0.0.1:8443
registryId: spiffe://example.org/trustmesh/registry
bundle: /path/bundle.pem
certificate: /path/operator/admin.crt
key: /path/operator/admin.key
```
Relative paths are relative to the config file. The credential is an operator SVID,
presented over mTLS; there is no shared key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from trustmesh.errors import ConfigError
from trustmesh.spiffe_id import SpiffeId

__all__ = ["ClientConfig", "default_config_path"]

_FIELDS = {"apiVersion", "kind", "registry", "registryId", "bundle", "certificate", "key"}


def default_config_path() -> Path:
    env = os.environ.get("TRUSTMESH_CONFIG")
    if env:
        return Path(env)
    return (
        Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config"))
        / "trustmesh"
        / "config.yaml"
    )


@dataclass(frozen=True)
class ClientConfig:
    registry: str
    registry_id: SpiffeId
    bundle: Path
    certificate: Path
    key: Path

    @classmethod
    def load(cls, path: Path) -> ClientConfig:
        try:
            raw = yaml.safe_load(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(
                f"no client config at {path}: run `trustmesh registry init` or pass "
                "--config / set TRUSTMESH_CONFIG"
            ) from e
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"{path}: cannot read client config: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping")
        unknown = set(raw) - _FIELDS
        if unknown:
            raise ConfigError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}")
        if raw.get("kind") != "ClientConfig":
            raise ConfigError(f"{path}: kind must be ClientConfig")
        missing = [
            f for f in ("registry", "registryId", "bundle", "certificate", "key") if not raw.get(f)
        ]
        if missing:
            raise ConfigError(f"{path}: missing field(s) {', '.join(missing)}")
        base = path.parent
        return cls(
            registry=str(raw["registry"]),
            registry_id=SpiffeId.parse(str(raw["registryId"])),
            bundle=base / str(raw["bundle"]),
            certificate=base / str(raw["certificate"]),
            key=base / str(raw["key"]),
        )

    def dump(self) -> str:
        return yaml.safe_dump(
            {
                "apiVersion": "trustmesh.dev/v1alpha1",
                "kind": "ClientConfig",
                "registry": self.registry,
                "registryId": str(self.registry_id),
                "bundle": str(self.bundle),
                "certificate": str(self.certificate),
                "key": str(self.key),
            },
            sort_keys=False,
        )
