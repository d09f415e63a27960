"""Regenerate trustmesh/v1 from proto/ with grpcio-tools (a dev dependency).

`python scripts/gen_proto.py --check` exits 1 when the committed code is stale.
"""

from __future__ import annotations

import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "trustmesh" / "v1"


def generate(into: Path) -> None:
    from grpc_tools import protoc  # imported late: only a dev dependency

    protos = sorted(str(p.relative_to(PROTO_DIR)) for p in PROTO_DIR.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_DIR}",
        f"--python_out={into}",
        f"--pyi_out={into}",
        f"--grpc_python_out={into}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> int:
    check = "--check" in sys.argv[1:]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh = Path(tmp) / "trustmesh" / "v1"
        names = sorted(p.name for p in fresh.iterdir() if p.is_file())
        if check:
            stale = [
                n
                for n in names
                if not (OUT_DIR / n).exists() or not filecmp.cmp(fresh / n, OUT_DIR / n, False)
            ]
            if stale:
                print("generated code is stale; run python scripts/gen_proto.py:", *stale)
                return 1
            return 0
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(fresh / n, OUT_DIR / n)
        (OUT_DIR / "__init__.py").write_text('"""Generated protobuf code; see proto/."""\n')
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
