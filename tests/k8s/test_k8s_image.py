"""What can be checked of the Dockerfile without a Docker engine (none runs here):
its stages, user, entrypoint and final-stage contents, and that every manifest names
the image it builds."""

from __future__ import annotations

import re
import tomllib

import pytest
from k8s_support import K8S, REPO

DOCKERFILE = (REPO / "Dockerfile").read_text()
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"trustmesh/trustmesh:{VERSION}"
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cc ", "clang", "python3-dev", "libc6-dev")


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    joined = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")),
    )
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for instr in instructions(DOCKERFILE):
        if instr[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(instr)
    return out


def test_multi_stage_with_a_slim_python_runtime() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    final = all_stages[-1]
    base = final[0][1].split()[0]
    assert re.fullmatch(r"python:3\.11-slim(-[a-z]+)?", base), base
    builder_names = [s[0][1].split()[-1] for s in all_stages[:-1]]
    assert "builder" in builder_names


def test_final_stage_runs_as_a_numeric_non_root_user() -> None:
    users = [args for word, args in stages()[-1] if word == "USER"]
    assert users, "no USER in the final stage"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0 and (not gid or gid.isdigit())
    # The same UID the manifests run as.
    assert f"runAsUser: {uid}" in (K8S / "base" / "registry" / "deployment.yaml").read_text()


def test_entrypoint_is_trustmesh() -> None:
    entrypoints = [args for word, args in stages()[-1] if word == "ENTRYPOINT"]
    assert entrypoints == ['["trustmesh"]']


def test_no_build_tools_in_the_final_stage() -> None:
    for word, args in stages()[-1]:
        if word == "RUN":
            lowered = args.lower()
            assert "apt-get install" not in lowered and "apk add" not in lowered, args
            for tool in BUILD_TOOLS:
                assert tool not in lowered, (tool, args)
        # Sources go in as wheels from the builder, never copied into the runtime.
        if word == "COPY":
            assert "--from=builder" in args, args
    final = "\n".join(args for _, args in stages()[-1])
    assert "trustmesh[k8s]" in final  # the reconciler's client is in the image
    assert "--no-index" in final  # nothing fetched at this stage


def test_labels_and_manifests_name_this_version() -> None:
    assert f'org.opencontainers.image.version="{VERSION}"' in DOCKERFILE
    assert f"docker build -t {IMAGE} ." in DOCKERFILE
    found = set()
    for path in K8S.rglob("*.yaml"):
        for ref in re.findall(r"trustmesh/trustmesh:[^\s\"']+", path.read_text()):
            found.add(ref)
            assert ref == IMAGE, f"{path}: {ref}"
    assert IMAGE in found


@pytest.mark.parametrize(
    "needed", ["pyproject.toml", "README.md", "trustmesh", "sidecar", "registry"]
)
def test_dockerignore_lets_the_build_inputs_through(needed: str) -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    # Everything is excluded first (tests, .git, k8s, venvs), then the inputs let back in.
    assert lines.index(f"!{needed}") > lines.index("*")
