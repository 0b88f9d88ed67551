"""The Dockerfiles, read statically (no Docker engine here): stages, user, health check, what gets installed."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass

import pytest

from shared.settings import DEFAULT_PORTS
from tests.deploy.manifests import REPO

DOCKERFILES = ("deploy/Dockerfile", "deploy/Dockerfile.gpu")
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cmake", "git", "python3-dev", "libpq-dev")


@dataclass
class Instruction:
    keyword: str
    arguments: str


def instructions(path: str) -> list[Instruction]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in (REPO / path).read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    return [Instruction(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def stages(path: str) -> list[list[Instruction]]:
    result: list[list[Instruction]] = []
    for instruction in instructions(path):
        if instruction.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


@pytest.mark.parametrize("path", DOCKERFILES)
def test_multi_stage_with_a_lean_final_stage(path: str) -> None:
    build, final = stages(path)[0], stages(path)[-1]
    assert len(stages(path)) >= 2
    assert any("pip install" in i.arguments for i in build if i.keyword == "RUN")
    final_runs = " ".join(i.arguments for i in final if i.keyword == "RUN")
    assert "pip install" not in final_runs and "apt-get install" not in final_runs, "the final stage installs nothing"
    assert not [tool for tool in BUILD_TOOLS if re.search(rf"(^|\s){re.escape(tool)}(\s|$)", final_runs)]
    copies = [i.arguments for i in final if i.keyword == "COPY"]
    assert any("--from=build /opt/venv /opt/venv" in c for c in copies), "the final stage takes the built virtualenv"


@pytest.mark.parametrize("path", DOCKERFILES)
def test_runs_as_a_non_root_user_with_writable_places_declared(path: str) -> None:
    final = stages(path)[-1]
    users = [i.arguments for i in final if i.keyword == "USER"]
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) != 0
    env = " ".join(i.arguments for i in final if i.keyword == "ENV")
    for variable in ("HOME=/home/flywheel", "TMPDIR=/tmp", "FLYWHEEL_HOME=/var/lib/flywheel", "PATH=/opt/venv/bin"):
        assert variable in env, variable


@pytest.mark.parametrize("path", DOCKERFILES)
def test_has_a_health_check_that_the_image_contains(path: str) -> None:
    final = stages(path)[-1]
    healthchecks = [i.arguments for i in final if i.keyword == "HEALTHCHECK"]
    assert healthchecks and 'CMD ["flywheel-healthcheck"]' in healthchecks[-1]
    copies = [i.arguments for i in final if i.keyword == "COPY"]
    assert any(c.endswith("deploy/healthcheck.py /usr/local/bin/flywheel-healthcheck") and "0755" in c for c in copies)


@pytest.mark.parametrize("path", DOCKERFILES)
def test_installs_the_project_as_pyproject_says_and_never_the_cpu_onnxruntime(path: str) -> None:
    text = " ".join(f"{i.keyword} {i.arguments}" for i in instructions(path))
    assert "pip install --no-deps ." in text and "tomllib" in text, "dependencies come from pyproject.toml"
    assert not re.search(r"(torch|torchvision|onnxruntime[-\w]*)==", text), "no second copy of the pins"
    commands = [part for i in instructions(path) if i.keyword == "RUN" for part in re.split(r"&&|;", i.arguments)]
    installs = [c for c in commands if "pip install" in c]
    assert not [c for c in installs if re.search(r"\bonnxruntime\b(?!-gpu)", c)], "never `pip install onnxruntime`"
    assert "pip show -q onnxruntime" in text and "exit 1" in text, "the build fails if the CPU onnxruntime got in"
    python = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert "3.11" in python and "ARG PYTHON_IMAGE=python:3.11-slim" in text


def test_the_gpu_image_carries_cuda_13_and_cudnn_9_for_both_torch_and_onnxruntime() -> None:
    text = (REPO / "deploy/Dockerfile.gpu").read_text()
    assert "torch.version.cuda.startswith('13')" in text
    assert "'CUDAExecutionProvider' in ort.get_available_providers()" in text
    assert "/etc/ld.so.conf.d/" in text and "RUN ldconfig" in text, "onnxruntime finds the wheels' CUDA libraries"
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert "NVIDIA_VISIBLE_DEVICES=all" not in text.replace("No NVIDIA_VISIBLE_DEVICES=all", "")
    assert "TORCH_INDEX_URL" not in text, "the GPU image takes PyPI's CUDA 13 build of torch"
    cpu = (REPO / "deploy/Dockerfile").read_text()
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in cpu


@pytest.mark.parametrize("path", DOCKERFILES)
def test_the_build_context_holds_what_the_dockerfile_copies(path: str) -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def included(relative: str) -> bool:
        keep = True
        for pattern in patterns:
            negated = pattern.startswith("!")
            body = pattern.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(relative, body) or relative.startswith(body + "/"):
                keep = negated
        return keep

    for instruction in instructions(path):
        if instruction.keyword != "COPY" or "--from=" in instruction.arguments:
            continue
        sources = [a for a in instruction.arguments.split()[:-1] if not a.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"{path} copies {source}, which is not in the repo"
            assert included(source), f"{path} copies {source}, which .dockerignore leaves out"
    assert not included(".venv") and not included(".git") and not included("tests/conftest.py")


def test_the_cpu_image_exposes_every_service_port() -> None:
    exposed = next(i.arguments for i in stages("deploy/Dockerfile")[-1] if i.keyword == "EXPOSE")
    assert {int(p) for p in exposed.split()} == set(DEFAULT_PORTS.values())


@pytest.mark.parametrize("path", DOCKERFILES)
def test_the_final_stage_holds_the_servers_log_configuration(path: str) -> None:
    # granian's --log-config in every manifest names this path (tests/deploy/test_entrypoints.py).
    copies = [i.arguments for i in stages(path)[-1] if i.keyword == "COPY"]
    assert "shared/granian_logging.json /etc/flywheel/granian-logging.json" in copies


def test_every_console_file_ships_in_the_package() -> None:
    """The images install the project without -e: the console's static files must be package data."""
    import fnmatch
    import tomllib

    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["shared"]
    static = REPO / "shared" / "console" / "static"
    files = [path.relative_to(REPO / "shared").as_posix() for path in static.rglob("*") if path.is_file()]
    assert "console/static/index.html" in files and "console/static/vendor/uPlot.iife.min.js" in files
    missing = [name for name in files if not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
    assert missing == [], f"not package data: {missing}"
