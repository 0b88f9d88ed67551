"""docker-compose.yml: valid against the compose specification, and the same platform as the Kubernetes one."""

from __future__ import annotations

import copy
import re
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest

from shared.settings import BUCKETS, SERVICES
from tests.deploy.manifests import (
    DEPLOYMENT_VARIABLES,
    REPO,
    WORKERS,
    compose,
    compose_argv,
    compose_schema,
    render,
    settings_variables,
    workloads,
)

BACKING = {"redis", "postgres", "minio", "minio-init"}
GPU_SERVICES = {"training-worker-gpu": "training-worker", "inference-gpu": "inference"}


def _flywheel_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if name not in BACKING}


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set, as on a fresh machine."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def test_compose_file_validates_against_the_compose_specification() -> None:
    validator = jsonschema.Draft202012Validator(compose_schema())
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message[:200]}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)


def test_the_specification_check_rejects_a_broken_file() -> None:
    broken = copy.deepcopy(compose())
    broken["services"]["ingestion"]["healthcheck"] = {"tset": ["CMD", "true"]}
    broken["services"]["labeling"]["depends_on"]["redis"]["condition"] = "service_up"
    errors = list(jsonschema.Draft202012Validator(compose_schema()).iter_errors(broken))
    assert len(errors) >= 2


def test_compose_names_the_same_services_as_kubernetes() -> None:
    deployments = {w["metadata"]["name"] for w in workloads(render("overlays/dev")) if w["kind"] == "Deployment"}
    cpu = {name for name, s in _flywheel_services().items() if "gpu" not in s.get("profiles", [])}
    assert cpu == deployments == {*SERVICES, *WORKERS}
    statefulsets = {w["metadata"]["name"] for w in workloads(render("overlays/dev")) if w["kind"] == "StatefulSet"}
    assert statefulsets == BACKING - {"minio-init"}


def test_every_flywheel_container_is_locked_down_and_healthchecked() -> None:
    for name, service in _flywheel_services().items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service or service["user"] not in {"0", "root"}, name
        assert {"/tmp", "/home/flywheel"} <= set(service["tmpfs"]), name
        assert any(v.endswith(":/var/lib/flywheel") for v in service["volumes"]), name
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "flywheel-healthcheck"], name
        http = compose_argv(service)[0] in ("gunicorn", "granian")
        assert ("--ready" in check) == http, f"{name}: HTTP services are healthy when /readyz answers"
        assert service["depends_on"] == {
            "redis": {"condition": "service_healthy"},
            "postgres": {"condition": "service_healthy"},
            "minio": {"condition": "service_healthy"},
            "minio-init": {"condition": "service_completed_successfully"},
        }, name


def test_backing_services_have_health_checks_and_volumes() -> None:
    services = compose()["services"]
    for name in ("redis", "postgres", "minio"):
        assert services[name]["healthcheck"]["test"], name
        assert any(not v.startswith("./") for v in services[name]["volumes"]), f"{name} keeps its data in a volume"
    assert services["minio-init"]["depends_on"] == {"minio": {"condition": "service_healthy"}}
    assert set(compose()["volumes"]) >= {"redis-data", "postgres-data", "minio-data"}


def test_redis_persists_and_never_evicts() -> None:
    command = compose()["services"]["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"


def test_minio_init_creates_every_bucket() -> None:
    init = compose()["services"]["minio-init"]
    assert tuple(init["environment"]["BUCKETS"].split()) == BUCKETS
    assert "mc mb --ignore-existing" in " ".join(compose_argv(init))


def test_postgres_creates_one_database_per_service_with_the_kubernetes_script() -> None:
    postgres = compose()["services"]["postgres"]
    script, target = next(v.split(":")[:2] for v in postgres["volumes"] if v.startswith("./"))
    assert (REPO / script).resolve() == REPO / "k8s" / "base" / "postgres" / "create-databases.sh"
    assert target.startswith("/docker-entrypoint-initdb.d/")
    assert (REPO / script).stat().st_mode & 0o111, "the entrypoint runs it (not sources it) when executable"


@pytest.mark.parametrize("name", sorted({*SERVICES, *WORKERS}))
def test_each_process_gets_its_configuration(name: str) -> None:
    service = compose()["services"][name]
    env = {key: _interpolate(str(value)) for key, value in service["environment"].items()}
    unknown = set(env) - settings_variables() - DEPLOYMENT_VARIABLES
    assert not unknown, f"{name}: variables nothing reads (typos?): {sorted(unknown)}"
    own = name.removesuffix("-worker")
    database = urlparse(env[f"{own.upper()}_DATABASE_URL"])
    assert database.scheme == "postgresql+psycopg"
    assert (database.hostname, database.port, database.path) == ("postgres", 5432, f"/{own}")
    assert database.password == _interpolate(compose()["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"])
    services = compose()["services"]
    for variable, target in (
        ("INGESTION_URL", "ingestion"),
        ("INFERENCE_URL", "inference"),
        ("REGISTRY_URL", "registry"),
    ):
        assert urlparse(env[variable]).hostname in services, variable
        assert urlparse(env[variable]).hostname == target
    assert env["REDIS_URL"].startswith("redis://redis:6379/")
    assert env["S3_ENDPOINT"] == "minio:9000"
    minio = services["minio"]["environment"]
    assert (env["S3_ACCESS_KEY"], env["S3_SECRET_KEY"]) == (
        _interpolate(minio["MINIO_ROOT_USER"]),
        _interpolate(minio["MINIO_ROOT_PASSWORD"]),
    )


def test_the_gpu_profile_gives_training_and_inference_a_gpu() -> None:
    services = compose()["services"]
    in_profile = {name for name, s in services.items() if "gpu" in s.get("profiles", [])}
    assert in_profile == set(GPU_SERVICES)
    for name, replaces in GPU_SERVICES.items():
        gpu, cpu = services[name], services[replaces]
        devices = gpu["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], name
        assert gpu["image"].startswith("flywheel-gpu:") and gpu["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
        assert compose_argv(gpu) == compose_argv(cpu), f"{name} runs what {replaces} runs"
        assert gpu["environment"] == cpu["environment"]
    assert "inference" in services["inference-gpu"]["networks"]["default"]["aliases"]
    for name, service in services.items():
        if name not in GPU_SERVICES:
            assert "deploy" not in service, f"{name} asks for no device"
    header = (REPO / "docker-compose.yml").read_text().split("\nname:")[0]
    assert "--profile gpu" in header
    assert all(f"--scale {cpu}=0" in header for cpu in GPU_SERVICES.values())


def test_the_training_worker_has_time_to_checkpoint() -> None:
    services = compose()["services"]
    for name in ("training-worker", "training-worker-gpu"):
        assert services[name]["stop_grace_period"] == "30m", name


def test_compose_builds_the_images_kubernetes_runs() -> None:
    images = {s["image"].split(":")[0]: s["build"]["dockerfile"] for s in _flywheel_services().values()}
    assert images == {"flywheel": "deploy/Dockerfile", "flywheel-gpu": "deploy/Dockerfile.gpu"}
    kubernetes = {
        c["image"].split(":")[0]
        for path in ("overlays/gpu",)
        for w in workloads(render(path))
        for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert set(images) <= kubernetes
    third_party = {s["image"] for name, s in compose()["services"].items() if name in BACKING}
    third_party_k8s = {
        c["image"] for w in workloads(render("overlays/dev")) for c in w["spec"]["template"]["spec"]["containers"]
    }
    assert third_party <= third_party_k8s, "compose and Kubernetes run the same Redis, PostgreSQL and MinIO"
    assert all(":" in image and not image.endswith(":latest") for image in third_party)
