"""The operating documentation says what the deployment files do: commands, paths, names."""

from __future__ import annotations

import re

import pytest

from tests.deploy.manifests import REPO, compose, render

DEPLOYMENT_DOC = REPO / "docs" / "deployment.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DEPLOYMENT_DOC.read_text()


def test_the_deployment_doc_covers_compose_kubernetes_gpu_scaling_and_upgrading(doc: str) -> None:
    for command in (
        "docker compose up --build",
        "docker compose --profile gpu up --build --scale training-worker=0 --scale inference=0",
        "kubectl apply -k k8s/overlays/dev",
        "kubectl apply -k k8s/overlays/gpu",
        "kubectl apply -k k8s/distributed-training",
        "docker build -f deploy/Dockerfile ",
        "docker build -f deploy/Dockerfile.gpu ",
    ):
        assert command in doc, command
    for heading in ("## docker compose", "### GPU nodes", "### Distributed training", "## Scaling", "## Upgrading"):
        assert heading in doc, heading
    assert "nvidia.com/gpu" in doc and "R580" in doc


def test_every_path_the_doc_names_exists(doc: str) -> None:
    paths = set(re.findall(r"(?<![\w/.])((?:k8s|deploy|docs|tests)/[\w./-]*\w)", doc))
    assert paths, "the doc names the deployment files"
    missing = sorted(p for p in paths if not (REPO / p).exists())
    assert not missing, f"docs/deployment.md names paths that do not exist: {missing}"


def test_every_workload_the_doc_names_exists(doc: str) -> None:
    kubernetes = {o["metadata"]["name"] for path in ("overlays/gpu", "distributed-training") for o in render(path)}
    # `deployment/labeling-worker`, not a path such as `deploy/healthcheck.py` or `tests/deploy/test_checkov.py`
    named = set(re.findall(r"(?<![\w/])(?:deployment|deploy|svc|job)/([a-z-]+)(?![\w.-])", doc))
    named |= set(re.findall(r"kubectl -n flywheel (?:delete job|rollout status deployment/) ?([a-z-]+)", doc))
    assert named, "the doc names workloads"
    assert not named - kubernetes - {"name"}, f"not in the manifests: {sorted(named - kubernetes)}"
    services = set(compose()["services"])
    scaled = set(re.findall(r"--scale ([a-z-]+)=", doc)) | set(re.findall(r"docker compose logs -f ([a-z-]+)", doc))
    assert scaled and scaled <= services, f"not in docker-compose.yml: {sorted(scaled - services)}"


def test_the_doc_lists_every_network_flow_the_policies_open(doc: str) -> None:
    policies = {o["metadata"]["name"] for o in render("overlays/dev") if o["kind"] == "NetworkPolicy"}
    assert "default-deny-all" in policies and "`default-deny-all`" in doc
    for port in ("6379", "5432", "9000", "8001", "8004", "8005", "53"):
        assert f"| {port}" in doc or f", {port}" in doc or f"{port} |" in doc, port


def test_the_readme_points_operators_at_compose_and_kubectl() -> None:
    """The README's operating section (the lead keeps README.md) names both ways in and this document."""
    readme = (REPO / "README.md").read_text()
    assert "docker compose up" in readme
    assert "kubectl apply -k k8s/overlays/" in readme
    assert "docs/deployment.md" in readme
