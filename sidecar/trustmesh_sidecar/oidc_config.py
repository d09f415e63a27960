"""The sidecar's trusted user-token issuers, from a YAML file (`--oidc-issuers`).

```yaml
issuers:
  - issuer: https://idp.example.com
    audience: trustmesh            # or a list
    jwksFile: /etc/trustmesh/idp-jwks.json
    claims: [groups]               # recorded in the chain's user origin
```
Keys come from files: the sidecar fetches nothing from the network at call time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from trustmesh.errors import ConfigError
from trustmesh.user_token import FileJwks, IssuerConfig

__all__ = ["load_issuers"]

_FIELDS = {"issuer", "audience", "jwksFile", "claims"}


def load_issuers(path: Path) -> tuple[IssuerConfig, ...]:
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: malformed YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("issuers"), list):
        raise ConfigError(f"{path}: expected a mapping with an 'issuers' list")
    out = []
    for i, item in enumerate(raw["issuers"]):
        where = f"{path}: issuers[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping")
        unknown = set(item) - _FIELDS
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(unknown))}")
        missing = [f for f in ("issuer", "audience", "jwksFile") if not item.get(f)]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(missing)}")
        audience = item["audience"]
        jwks = Path(str(item["jwksFile"]))
        if not jwks.is_absolute():
            jwks = path.parent / jwks
        out.append(
            IssuerConfig(
                issuer=str(item["issuer"]),
                audience=tuple(str(a) for a in audience)
                if isinstance(audience, list)
                else str(audience),
                jwks=FileJwks(jwks),
                claims=tuple(str(c) for c in item.get("claims") or ()),
            )
        )
    return tuple(out)
