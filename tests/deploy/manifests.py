"""What the deployment tests read: rendered kustomizations, the compose file, the Kubernetes schemas (offline).

Rendering uses `kubectl kustomize` (KUBECTL, else kubectl on PATH; .ci/run installs one when absent) and is done
once per kustomization per session. Schemas come from the `kubernetes-validate` package (JSON schemas for each
Kubernetes minor release, shipped in the wheel) and the compose specification from `check-jsonschema`'s vendored
copy: nothing is downloaded at test time.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from referencing import Registry, Resource

from cli.launcher import services_with_workers
from shared.settings import SERVICES, Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
OVERLAYS = ("overlays/dev", "overlays/gpu")
# Everything `kubectl apply -k` may be pointed at: the two overlays and the distributed-training template.
KUSTOMIZATIONS = ("overlays/dev", "overlays/gpu", "distributed-training")
# The oldest Kubernetes minor the manifests support (docs/deployment.md) and a current one.
KUBERNETES_VERSIONS = ("1.30", "1.35")
FLYWHEEL_IMAGES = ("flywheel", "flywheel-gpu")
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job")
# The services that run a Celery worker beside their HTTP server, as their ServiceSpecs say (inference runs none):
# every deployment runs exactly these workers.
WORKER_SERVICES = services_with_workers()
WORKERS = {f"{service}-worker" for service in WORKER_SERVICES}


def settings_variables() -> set[str]:
    """Every environment variable shared/settings.py reads."""
    names = {"home": "FLYWHEEL_HOME", "internal_token": "FLYWHEEL_INTERNAL_TOKEN"}
    variables = {names.get(f.name, f.name.upper()) for f in fields(Settings) if f.name not in {"port", "service"}}
    for service in SERVICES:
        variables |= {f"{service.upper()}_DATABASE_URL", f"{service.upper()}_PORT"}
    return variables


# Variables the deployment sets besides Flywheel's own: the process environment, the pieces of the database URLs,
# and the distributed-training Job's parameters.
DEPLOYMENT_VARIABLES = {
    "HOME",
    "TMPDIR",
    "PYTHONUNBUFFERED",
    "POSTGRES_HOST",
    "POSTGRES_USER",
    "POSTGRES_PASSWORD",
    "NNODES",
    "NPROC_PER_NODE",
    "TRAINING_RUN_ID",
    "JOB_COMPLETION_INDEX",
    "OMP_NUM_THREADS",  # read by PyTorch's and OpenMP's runtimes, not by Settings
}


def kubectl() -> str | None:
    return os.environ.get("KUBECTL") or shutil.which("kubectl")


@functools.cache
def _render(path: str) -> tuple[dict[str, Any], ...]:
    binary = kubectl()
    if binary is None:
        pytest.skip("kubectl is not installed (.ci/run installs it): the Kubernetes manifests cannot be rendered")
    result = subprocess.run(
        [binary, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"kubectl kustomize k8s/{path} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def render(path: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k k8s/<path>` would create."""
    return list(_render(path))


def with_context(path: str) -> list[dict[str, Any]]:
    """The objects of `path` plus those it relies on being there: the distributed-training Job runs beside an
    overlay and uses its ConfigMap, Secret and Services."""
    objects = render(path)
    return [*objects, *render("overlays/dev")] if path == "distributed-training" else objects


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} {name}, found {len(matches)}"
    return matches[0]


def workloads(objects: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    yield from (o for o in objects if o["kind"] in WORKLOAD_KINDS)


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def image_name(image: str) -> str:
    """`registry.example.com/team/flywheel-gpu:0.1.0` -> `flywheel-gpu`."""
    return image.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0]


def is_flywheel(container: dict[str, Any]) -> bool:
    return image_name(container["image"]) in FLYWHEEL_IMAGES


def argv(container: dict[str, Any]) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """A container's environment: envFrom ConfigMaps/Secrets, then env, $(VAR) expanded as the kubelet does."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(find(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        if "secretRef" in source:
            env.update(_secret_data(find(objects, "Secret", source["secretRef"]["name"])))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m[1], m[0]), item["value"])
        elif "configMapKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["configMapKeyRef"]
            env[item["name"]] = find(objects, "ConfigMap", ref["name"])["data"][ref["key"]]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = _secret_data(find(objects, "Secret", ref["name"]))[ref["key"]]
        elif "resourceFieldRef" in item["valueFrom"]:
            env[item["name"]] = _resource_field(container, item["valueFrom"]["resourceFieldRef"])
        else:
            env[item["name"]] = "<from the downward API>"
    return env


def cpu_cores(quantity: str | int | float) -> float:
    """A Kubernetes CPU quantity ("2", "500m", 1.5) in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _resource_field(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """What the kubelet puts in a `resourceFieldRef` variable: the quantity over the divisor, rounded up."""
    section, _, resource = ref["resource"].partition(".")
    quantity = container.get("resources", {}).get(section, {}).get(resource)
    if quantity is None or resource != "cpu":
        return "<from the downward API>"
    return str(math.ceil(cpu_cores(quantity) / cpu_cores(ref.get("divisor", "1"))))


def _secret_data(secret: dict[str, Any]) -> dict[str, str]:
    import base64

    data = {key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()}
    data.update(secret.get("stringData", {}))
    return data


# ---------------------------------------------------------------------------------------------- Kubernetes schemas


class KubernetesSchemas:
    """Validates objects against the `kubernetes-validate` package's strict schemas (unknown fields are errors)."""

    def __init__(self, version: str) -> None:
        from kubernetes_validate import utils

        self.version = version
        self._utils = utils
        self._directory = f"kubernetes-json-schema/v{version}.0-local-strict"
        definitions = utils.schema_contents(f"{self._directory}/_definitions.json", version)
        self._registry: Registry = Resource.from_contents(definitions) @ Registry()
        self._validators: dict[tuple[str, str], jsonschema.protocols.Validator] = {}

    def validator(self, api_version: str, kind: str) -> jsonschema.protocols.Validator:
        key = (api_version, kind)
        if key not in self._validators:
            # rbac.authorization.k8s.io/v1 -> rbac-v1 (the package's file naming)
            group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
            path = f"{self._directory}/{kind.lower()}-{group_version}.json"
            try:
                schema = self._utils.schema_contents(path, self.version)
            except FileNotFoundError:
                pytest.fail(f"no Kubernetes {self.version} schema for {kind} {api_version}")
            registry = Resource.from_contents(schema) @ self._registry
            self._validators[key] = jsonschema.Draft202012Validator(schema, registry=registry)
        return self._validators[key]

    def errors(self, obj: dict[str, Any]) -> list[str]:
        validator = self.validator(obj["apiVersion"], obj["kind"])
        return [
            f"{'.'.join(str(p) for p in error.absolute_path) or '<root>'}: {error.message[:300]}"
            for error in validator.iter_errors(obj)
        ]


@functools.cache
def kubernetes_schemas(version: str) -> KubernetesSchemas:
    return KubernetesSchemas(version)


# ---------------------------------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def compose_schema() -> dict[str, Any]:
    text = resources.files("check_jsonschema").joinpath("builtin_schemas/vendor/compose-spec.json").read_text()
    return json.loads(text)


def compose_argv(service: dict[str, Any]) -> list[str]:
    entrypoint = service.get("entrypoint", [])
    command = service.get("command", [])
    return [*([entrypoint] if isinstance(entrypoint, str) else entrypoint), *command]


# ---------------------------------------------------------------------------------------------- network policies


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    ports: tuple[tuple[str, int, str], ...] = ()  # (name, number, protocol)

    def port_number(self, name: str, protocol: str) -> int | None:
        return next((number for n, number, proto in self.ports if n == name and proto == protocol), None)


def workload_pods(objects: list[dict[str, Any]]) -> list[Pod]:
    pods = []
    for workload in workloads(objects):
        labels = dict(workload["spec"]["template"]["metadata"].get("labels", {}))
        if workload["kind"] == "Job":  # the Job controller adds these to its pods
            labels.setdefault("job-name", workload["metadata"]["name"])
            labels.setdefault("batch.kubernetes.io/job-name", workload["metadata"]["name"])
        ports = tuple(
            (port.get("name", ""), port["containerPort"], port.get("protocol", "TCP"))
            for container in containers(workload)
            for port in container.get("ports", [])
        )
        pods.append(Pod(workload["metadata"]["name"], workload["metadata"]["namespace"], labels, ports))
    return pods


def selector_matches(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class NetworkPolicies:
    """Evaluates NetworkPolicy objects the way the API defines them (pod and namespace selectors, ports)."""

    policies: list[dict[str, Any]]
    namespace_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def _ns_labels(self, namespace: str) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": namespace, **self.namespace_labels.get(namespace, {})}

    def _selecting(self, pod: Pod, direction: str) -> list[dict[str, Any]]:
        return [
            p
            for p in self.policies
            if p["metadata"]["namespace"] == pod.namespace
            and direction in p["spec"].get("policyTypes", ["Ingress"])
            and selector_matches(p["spec"]["podSelector"], pod.labels)
        ]

    def _peer_matches(self, peer: dict[str, Any], policy_namespace: str, other: Pod) -> bool:
        assert "ipBlock" not in peer, "no policy should open IP blocks: every flow is between known pods"
        if "namespaceSelector" in peer:
            if not selector_matches(peer["namespaceSelector"], self._ns_labels(other.namespace)):
                return False
        elif other.namespace != policy_namespace:
            return False
        return "podSelector" not in peer or selector_matches(peer["podSelector"], other.labels)

    @staticmethod
    def _port_matches(rule: dict[str, Any], destination: Pod, port: int, protocol: str) -> bool:
        if not rule.get("ports"):
            return True
        for allowed in rule["ports"]:
            if allowed.get("protocol", "TCP") != protocol:
                continue
            value = allowed.get("port")
            if value is None:
                return True
            number = destination.port_number(value, protocol) if isinstance(value, str) else value
            if number is not None and number <= port <= allowed.get("endPort", number):
                return True
        return False

    def _allowed(self, subject: Pod, other: Pod, destination: Pod, port: int, protocol: str, direction: str) -> bool:
        selecting = self._selecting(subject, direction)
        if not selecting:
            return True  # not isolated in this direction
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for policy in selecting:
            for rule in policy["spec"].get(key, []):
                peers = rule.get(peers_key)
                peer_ok = not peers or any(
                    self._peer_matches(peer, policy["metadata"]["namespace"], other) for peer in peers
                )
                if peer_ok and self._port_matches(rule, destination, port, protocol):
                    return True
        return False

    def allows(self, source: Pod, destination: Pod, port: int, protocol: str = "TCP") -> bool:
        return self._allowed(source, destination, destination, port, protocol, "Egress") and self._allowed(
            destination, source, destination, port, protocol, "Ingress"
        )
