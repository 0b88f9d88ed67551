"""Encryption at rest as deployed: compose and Kubernetes turn S3_SERVER_SIDE_ENCRYPTION on for every Flywheel
process and give MinIO the KMS key SSE-S3 needs (checked offline, on the files and the rendered manifests)."""

from __future__ import annotations

import base64
import re

import pytest

from tests.deploy.manifests import (
    OVERLAYS,
    compose,
    container_env,
    containers,
    find,
    is_flywheel,
    pod_spec,
    render,
    workloads,
)
from tests.deploy.test_compose import _flywheel_services


def _interpolate(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set, as on a fresh machine."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


KMS_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*:(?P<key>[A-Za-z0-9+/=]+)$")


def assert_valid_kms_key(value: str) -> None:
    """MinIO's static KMS key: `<key name>:<base64 of exactly 32 bytes>`."""
    match = KMS_KEY.match(value)
    assert match, f"not <name>:<base64>: {value!r}"
    assert len(base64.b64decode(match["key"], validate=True)) == 32


def test_compose_encrypts_every_object_with_a_kms_key_minio_has() -> None:
    for name, service in _flywheel_services().items():
        assert _interpolate(str(service["environment"]["S3_SERVER_SIDE_ENCRYPTION"])) == "true", name
        assert "MINIO_KMS_SECRET_KEY" not in service["environment"], f"{name} must not hold MinIO's KMS key"
    assert_valid_kms_key(_interpolate(compose()["services"]["minio"]["environment"]["MINIO_KMS_SECRET_KEY"]))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kubernetes_encrypts_every_object_and_only_minio_mounts_the_kms_key(overlay: str) -> None:
    objects = render(overlay)
    for workload in workloads(objects):
        for container in filter(is_flywheel, containers(workload)):
            env = container_env(objects, container)
            assert env.get("S3_SERVER_SIDE_ENCRYPTION") == "true", f"{workload['metadata']['name']}"
            assert "MINIO_KMS_SECRET_KEY" not in env
        if workload["metadata"]["name"] != "minio":
            secrets = {v["secret"]["secretName"] for v in pod_spec(workload).get("volumes", []) if "secret" in v}
            assert "minio-kms" not in secrets, f"{workload['metadata']['name']} mounts MinIO's KMS key"

    minio = find(objects, "StatefulSet", "minio")
    container = pod_spec(minio)["containers"][0]
    key_file = {item["name"]: item.get("value") for item in container["env"]}["MINIO_KMS_SECRET_KEY_FILE"]
    mount = next(m for m in container["volumeMounts"] if key_file.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod_spec(minio)["volumes"] if v["name"] == mount["name"])
    item = next(i for i in volume["secret"]["items"] if f"{mount['mountPath']}/{i['path']}" == key_file)
    secret = find(objects, "Secret", volume["secret"]["secretName"])
    assert_valid_kms_key(secret["stringData"][item["key"]])
    assert any("example" in key for key in secret["metadata"].get("annotations", {})), "marked as an example"
