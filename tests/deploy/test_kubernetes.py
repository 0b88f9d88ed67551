"""The Kubernetes manifests: they render, validate against the Kubernetes schemas, and say what the design says."""

from __future__ import annotations

import copy
import math
import re
from typing import Any
from urllib.parse import urlparse

import pytest

from shared.settings import BUCKETS, DEFAULT_PORTS, SERVICES
from tests.deploy.manifests import (
    DEPLOYMENT_VARIABLES,
    K8S,
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    OVERLAYS,
    WORKER_SERVICES,
    WORKERS,
    argv,
    container_env,
    containers,
    cpu_cores,
    find,
    image_name,
    is_flywheel,
    kubernetes_schemas,
    pod_spec,
    render,
    settings_variables,
    with_context,
    workloads,
)

GPU_WORKLOADS = {"training-worker", "inference"}
SECRET_KEYS = {"FLYWHEEL_INTERNAL_TOKEN", "S3_ACCESS_KEY", "S3_SECRET_KEY", "POSTGRES_PASSWORD"}


def _service_of(workload: dict[str, Any]) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]


def _quantity(value: str | int) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    text = str(value)
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_each_kustomization_renders(path: str) -> None:
    objects = render(path)
    assert objects, f"k8s/{path} renders nothing"
    assert all(o["metadata"].get("namespace") == "flywheel" for o in objects if o["kind"] != "Namespace")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_rendered_object_validates_against_the_kubernetes_schema(path: str, version: str) -> None:
    schemas = kubernetes_schemas(version)
    problems = [f"{o['kind']}/{o['metadata']['name']}: {error}" for o in render(path) for error in schemas.errors(o)]
    assert not problems, f"k8s/{path} against Kubernetes {version}:\n" + "\n".join(problems)


def test_the_schema_check_rejects_what_kubernetes_would() -> None:
    deployment = copy.deepcopy(find(render("overlays/dev"), "Deployment", "ingestion"))
    schemas = kubernetes_schemas(KUBERNETES_VERSIONS[0])
    container = pod_spec(deployment)["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")  # a typo: unknown field
    container["resources"]["limits"]["cpu"] = ["1"]  # a wrong type
    errors = " ".join(schemas.errors(deployment))
    assert "readinesProbe" in errors
    assert "limits.cpu" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_overlay_holds_the_whole_platform(overlay: str) -> None:
    objects = render(overlay)
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    expected = {("Namespace", "flywheel"), ("ConfigMap", "flywheel-config"), ("Secret", "flywheel-secrets")}
    expected |= {("StatefulSet", name) for name in ("redis", "postgres", "minio")}
    expected |= {("Service", name) for name in ("redis", "postgres", "minio")}
    expected |= {("Job", "bucket-bootstrap"), ("HorizontalPodAutoscaler", "inference")}
    for service in SERVICES:
        expected |= {("Deployment", service), ("Service", service), ("PodDisruptionBudget", service)}
    expected |= {("Deployment", worker) for worker in WORKERS}
    assert expected <= names, f"missing from k8s/{overlay}: {sorted(expected - names)}"
    deployments = {n for k, n in names if k == "Deployment"}
    assert deployments == {*SERVICES, *WORKERS}, f"k8s/{overlay}: a worker for a service that runs none?"
    for kind in ("PersistentVolumeClaim",):
        assert not [n for k, n in names if k == kind], "storage comes from the StatefulSets' volumeClaimTemplates"
    for name in ("redis", "postgres", "minio"):
        assert find(objects, "StatefulSet", name)["spec"]["volumeClaimTemplates"], f"{name} keeps its data on a PVC"


def test_the_example_secret_is_marked_as_an_example() -> None:
    secret = find(render("overlays/dev"), "Secret", "flywheel-secrets")
    assert any("example" in key for key in secret["metadata"].get("annotations", {}))
    assert set(secret["stringData"]) == SECRET_KEYS
    assert all("example" in value or value == "flywheel" for value in secret["stringData"].values())
    assert "EXAMPLE SECRET" in (K8S / "base" / "secret.example.yaml").read_text()


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_is_locked_down(path: str) -> None:
    for workload in workloads(render(path)):
        _check_locked_down(path, workload)


def _check_locked_down(path: str, workload: dict[str, Any]) -> None:
    spec = pod_spec(workload)
    name = f"k8s/{path} {workload['kind']}/{workload['metadata']['name']}"
    pod_security = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False, f"{name}: no pod here talks to the Kubernetes API"
    assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
    for container in containers(workload):
        security = container.get("securityContext", {})
        where = f"{name} container {container['name']}"
        assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True, where
        assert security.get("runAsUser", pod_security.get("runAsUser", 1)) != 0, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert not security.get("capabilities", {}).get("add"), where
        assert not security.get("privileged"), where


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_has_requests_and_limits(path: str) -> None:
    for workload in workloads(render(path)):
        _check_resources(path, workload)


def _check_resources(path: str, workload: dict[str, Any]) -> None:
    for container in containers(workload):
        where = f"k8s/{path} {workload['metadata']['name']} container {container['name']}"
        resources = container.get("resources", {})
        for resource in ("cpu", "memory"):
            request, limit = resources.get("requests", {}).get(resource), resources.get("limits", {}).get(resource)
            assert request is not None and limit is not None, f"{where}: {resource} request and limit"
            assert _quantity(request) <= _quantity(limit), f"{where}: {resource} request above its limit"
        gpus = resources.get("limits", {}).get("nvidia.com/gpu")
        if gpus is not None:
            assert resources.get("requests", {}).get("nvidia.com/gpu", gpus) == gpus, (
                f"{where}: GPUs are not overcommitted"
            )


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_writable_paths_are_volumes(path: str) -> None:
    """Under a read-only root filesystem, every place a process writes is a mounted volume."""
    for workload in workloads(render(path)):
        _check_writable_paths(path, with_context(path), workload)


def _check_writable_paths(path: str, objects: list[dict[str, Any]], workload: dict[str, Any]) -> None:
    volumes = {v["name"] for v in pod_spec(workload).get("volumes", [])}
    volumes |= {t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])}
    for container in containers(workload):
        mounts = {m["mountPath"]: m for m in container.get("volumeMounts", [])}
        assert all(m["name"] in volumes for m in mounts.values())
        env = container_env(objects, container)
        if is_flywheel(container):
            needed = [env["HOME"], env["TMPDIR"], env["FLYWHEEL_HOME"], "/tmp"]
        else:
            needed = {
                "redis": ["/data"],
                "postgres": [
                    env.get("PGDATA", "/var/lib/postgresql/data").rsplit("/", 1)[0],
                    "/var/run/postgresql",
                    "/tmp",
                ],
                "minio": ["/data", env.get("HOME", "/root")],
                "mc": [env.get("MC_CONFIG_DIR", "/root/.mc").rsplit("/", 1)[0]],
            }[image_name(container["image"])]
        for writable in needed:
            mount = next(
                (m for p, m in mounts.items() if writable == p or writable.startswith(p.rstrip("/") + "/")), None
            )
            where = f"k8s/{path} {workload['metadata']['name']}/{container['name']}"
            assert mount is not None, f"{where} writes {writable}, which is on the read-only root filesystem"
            assert not mount.get("readOnly"), f"{where}: {writable} is mounted read-only"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_flywheel_processes_get_their_configuration(path: str) -> None:
    for workload in workloads(render(path)):
        _check_configuration(path, with_context(path), workload)


def _check_configuration(path: str, objects: list[dict[str, Any]], workload: dict[str, Any]) -> None:
    services = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Service"}
    for container in filter(is_flywheel, containers(workload)):
        env = container_env(objects, container)
        where = f"k8s/{path} {workload['metadata']['name']}/{container['name']}"
        unknown = set(env) - settings_variables() - DEPLOYMENT_VARIABLES
        assert not unknown, f"{where}: variables nothing reads (typos?): {sorted(unknown)}"
        for variable in ("REDIS_URL", "S3_ENDPOINT", "FLYWHEEL_INTERNAL_TOKEN", "S3_ACCESS_KEY", "S3_SECRET_KEY"):
            assert env.get(variable), f"{where}: {variable} is not set"
        for variable, service, port in (
            ("INGESTION_URL", "ingestion", 8001),
            ("INFERENCE_URL", "inference", 8005),
            ("REGISTRY_URL", "registry", 8004),
            ("REDIS_URL", "redis", 6379),
        ):
            url = urlparse(env[variable])
            assert (url.hostname, url.port) == (service, port), f"{where}: {variable}={env[variable]}"
            assert port in [p["port"] for p in services[service]["spec"]["ports"]], f"{where}: {variable}"
        host, _, s3_port = env["S3_ENDPOINT"].partition(":")
        assert int(s3_port) in [p["port"] for p in services[host]["spec"]["ports"]]
        own = _service_of(workload)
        database = urlparse(env[f"{own.upper()}_DATABASE_URL"])
        assert database.scheme == "postgresql+psycopg"
        assert (database.hostname, database.port, database.path) == ("postgres", 5432, f"/{own}")
        assert database.password == env["POSTGRES_PASSWORD"] and "$(" not in database.netloc


THREAD_POOLS = {("training-worker", "worker"): "OMP_NUM_THREADS", ("inference", "http"): "INFERENCE_INTRA_OP_THREADS"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_runtimes_size_their_threads_to_the_cpu_limit(overlay: str) -> None:
    """PyTorch and ONNX Runtime size their thread pools from the node's cores unless told otherwise; in a
    container limited to fewer cores the threads oversubscribe it, and training ran 10-50x slower that way."""
    objects = render(overlay)
    seen = set()
    for workload in workloads(objects):
        for container in containers(workload):
            variable = THREAD_POOLS.get((workload["metadata"]["name"], container["name"]))
            if variable is None:
                continue
            seen.add(variable)
            limit = cpu_cores(container["resources"]["limits"]["cpu"])
            threads = container_env(objects, container).get(variable)
            assert threads == str(math.ceil(limit)), f"k8s/{overlay} {workload['metadata']['name']}: {variable}"
    assert seen == set(THREAD_POOLS.values())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_stay_out_of_the_configmap(overlay: str) -> None:
    config = find(render(overlay), "ConfigMap", "flywheel-config")["data"]
    assert not SECRET_KEYS & set(config)
    assert not [value for value in config.values() if "password" in value.lower() or "secret" in value.lower()]


def test_one_database_per_service_is_created() -> None:
    script = (K8S / "base" / "postgres" / "create-databases.sh").read_text()
    created = re.search(r"for database in ([a-z ]+); do", script)
    assert created and tuple(created[1].split()) == SERVICES
    config_map = find(render("overlays/dev"), "ConfigMap", "postgres-init")
    assert config_map["data"]["create-databases.sh"] == script
    postgres = find(render("overlays/dev"), "StatefulSet", "postgres")
    mounts = pod_spec(postgres)["containers"][0]["volumeMounts"]
    assert {"name": "init", "mountPath": "/docker-entrypoint-initdb.d", "readOnly": True} in mounts


def test_the_bucket_bootstrap_creates_every_bucket() -> None:
    job = find(render("overlays/dev"), "Job", "bucket-bootstrap")
    container = pod_spec(job)["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert tuple(env["BUCKETS"].split()) == BUCKETS
    script = " ".join(argv(container))
    assert "mc mb --ignore-existing" in script and "${BUCKETS}" in script


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_redis_persists_and_never_evicts(overlay: str) -> None:
    redis = pod_spec(find(render(overlay), "StatefulSet", "redis"))["containers"][0]
    args = argv(redis)
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert [m["mountPath"] for m in redis["volumeMounts"]] == [args[args.index("--dir") + 1]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_http_service_has_a_service_and_a_disruption_budget(overlay: str) -> None:
    objects = render(overlay)
    for service in SERVICES:
        deployment = find(objects, "Deployment", service)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        container = pod_spec(deployment)["containers"][0]
        port = container["ports"][0]
        assert (port["name"], port["containerPort"]) == ("http", DEFAULT_PORTS[service])
        svc = find(objects, "Service", service)
        assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
        assert svc["spec"]["ports"] == [{"name": "http", "port": DEFAULT_PORTS[service], "targetPort": "http"}]
        pdb = find(objects, "PodDisruptionBudget", service)
        assert all(labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
        if service in WORKER_SERVICES:
            worker = find(objects, "Deployment", f"{service}-worker")
            worker_labels = worker["spec"]["template"]["metadata"]["labels"]
            assert not all(worker_labels.get(k) == v for k, v in pdb["spec"]["selector"]["matchLabels"].items())
        assert "minAvailable" in pdb["spec"] or pdb["spec"]["maxUnavailable"] >= 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_inference_scales_on_cpu(overlay: str) -> None:
    objects = render(overlay)
    hpa = find(objects, "HorizontalPodAutoscaler", "inference")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "inference"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    deployment = find(objects, "Deployment", "inference")
    assert "replicas" not in deployment["spec"], "the autoscaler owns inference's replicas; apply must not reset them"
    assert pod_spec(deployment)["containers"][0]["resources"]["requests"]["cpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_training_worker_has_time_to_checkpoint(overlay: str) -> None:
    objects = render(overlay)
    training = find(objects, "Deployment", "training-worker")
    grace = pod_spec(training)["terminationGracePeriodSeconds"]
    assert grace >= 1800
    others = [pod_spec(d).get("terminationGracePeriodSeconds", 30) for d in workloads(objects) if d is not training]
    assert grace > max(others)
    assert training["spec"]["strategy"]["type"] == "Recreate"


def test_gpu_overlay_puts_training_and_inference_on_gpu_nodes() -> None:
    for workload in workloads(render("overlays/gpu")):
        spec = pod_spec(workload)
        name = workload["metadata"]["name"]
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in containers(workload)]
        if name in GPU_WORKLOADS:
            assert gpus == ["1"], f"{name}: one GPU"
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
            assert [image_name(c["image"]) for c in containers(workload)] == ["flywheel-gpu"]
        else:
            assert gpus == [None] * len(gpus), f"{name} needs no GPU"
            assert "nodeSelector" not in spec and "tolerations" not in spec, name
            assert "flywheel-gpu" not in [image_name(c["image"]) for c in containers(workload)], name


def test_dev_overlay_is_cpu_only_and_small() -> None:
    objects = render("overlays/dev")
    for workload in workloads(objects):
        spec = pod_spec(workload)
        for container in containers(workload):
            assert "nvidia.com/gpu" not in container["resources"]["limits"]
            assert image_name(container["image"]) != "flywheel-gpu"
        assert "nodeSelector" not in spec and "tolerations" not in spec
        assert workload["spec"].get("replicas", 1) == 1, workload["metadata"]["name"]
    assert find(objects, "HorizontalPodAutoscaler", "inference")["spec"]["maxReplicas"] <= 2


def test_distributed_training_runs_torchrun_across_gpu_pods() -> None:
    objects = render("distributed-training")
    job = next(o for o in objects if o["kind"] == "Job")
    spec = pod_spec(job)
    container = spec["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    args = argv(container)
    assert args[0] == "torchrun" and args[args.index("-m") + 1] == "services.training.distributed"
    options = dict(arg.removeprefix("--").split("=", 1) for arg in args if arg.startswith("--") and "=" in arg)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == int(env["NNODES"]) >= 2
    assert options["nnodes"] == "$(NNODES)" and options["node-rank"] == "$(JOB_COMPLETION_INDEX)"
    assert options["nproc-per-node"] == "$(NPROC_PER_NODE)"
    assert env["NPROC_PER_NODE"] == container["resources"]["limits"]["nvidia.com/gpu"]
    index = next(item for item in container["env"] if item["name"] == "JOB_COMPLETION_INDEX")
    assert "job-completion-index" in index["valueFrom"]["fieldRef"]["fieldPath"]
    # Pod 0 is the master, reached through the headless Service named by the pods' subdomain.
    service = find(objects, "Service", spec["subdomain"])
    assert options["master-addr"] == f"{job['metadata']['name']}-0.{spec['subdomain']}"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    assert int(options["master-port"]) in [p["containerPort"] for p in container["ports"]]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert image_name(container["image"]) == "flywheel-gpu"
    assert "/dev/shm" in [m["mountPath"] for m in container["volumeMounts"]]
