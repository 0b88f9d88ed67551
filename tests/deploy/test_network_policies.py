"""NetworkPolicies: default deny, then exactly the flows of the design, evaluated pod by pod and port by port."""

from __future__ import annotations

import pytest

from shared.settings import DEFAULT_PORTS, SERVICES
from tests.deploy.manifests import OVERLAYS, WORKERS, NetworkPolicies, Pod, render, workload_pods

NAMESPACE = "flywheel"
INGRESS_CONTROLLER = Pod("ingress-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
PROMETHEUS = Pod("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"})
STRANGER_OUTSIDE = Pod("stranger-outside", "default", {"app.kubernetes.io/name": "ingestion", "tier": "app"})
STRANGER_INSIDE = Pod("stranger-inside", NAMESPACE, {"run": "debug"})
KUBE_DNS = Pod("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")))

# Who calls whose HTTP API (DESIGN.md): partner-key checks at ingestion, pre-labels from inference, and the
# versions to serve from the registry.
HTTP_CALLERS = {
    "ingestion": {"labeling", "training", "registry", "inference"},
    "inference": {"labeling"},
    "registry": {"inference"},
}


def _policies(objects: list[dict]) -> NetworkPolicies:
    return NetworkPolicies([o for o in objects if o["kind"] == "NetworkPolicy"])


def _app_pods() -> set[str]:
    return {*SERVICES, *WORKERS}


def _service(pod_name: str) -> str:
    return pod_name.removesuffix("-worker")


def expected_flows() -> set[tuple[str, str, int, str]]:
    flows = set()
    for pod in _app_pods():
        flows |= {(pod, "redis", 6379, "TCP"), (pod, "postgres", 5432, "TCP"), (pod, "minio", 9000, "TCP")}
        for callee, callers in HTTP_CALLERS.items():
            if _service(pod) in callers:
                flows.add((pod, callee, DEFAULT_PORTS[callee], "TCP"))
    flows.add(("bucket-bootstrap", "minio", 9000, "TCP"))
    for outsider in (INGRESS_CONTROLLER, PROMETHEUS):
        flows |= {(outsider.name, service, DEFAULT_PORTS[service], "TCP") for service in SERVICES}
    return flows


def actual_flows(policies: NetworkPolicies, pods: list[Pod]) -> set[tuple[str, str, int, str]]:
    sources = [*pods, INGRESS_CONTROLLER, PROMETHEUS, STRANGER_OUTSIDE, STRANGER_INSIDE]
    return {
        (source.name, destination.name, port, protocol)
        for source in sources
        for destination in pods
        for _name, port, protocol in destination.ports
        if source is not destination and policies.allows(source, destination, port, protocol)
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_exactly_the_designed_flows_are_allowed(overlay: str) -> None:
    objects = render(overlay)
    pods = workload_pods(objects)
    assert {p.name for p in pods} >= _app_pods() | {"redis", "postgres", "minio", "bucket-bootstrap"}
    actual = actual_flows(_policies(objects), pods)
    expected = expected_flows()
    assert not expected - actual, f"designed flows that are blocked: {sorted(expected - actual)}"
    assert not actual - expected, f"flows nobody designed: {sorted(actual - expected)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_starts_from_default_deny(overlay: str) -> None:
    policies = [o for o in render(overlay) if o["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {} and not p["spec"].get("ingress")]
    assert any(set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and not p["spec"].get("egress") for p in deny)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_resolves_names_and_nothing_else_leaves(overlay: str) -> None:
    objects = render(overlay)
    policies = _policies(objects)
    for pod in [*workload_pods(objects), STRANGER_INSIDE]:
        assert policies.allows(pod, KUBE_DNS, 53, "UDP") and policies.allows(pod, KUBE_DNS, 53, "TCP"), pod.name
        assert not policies.allows(pod, KUBE_DNS, 443), pod.name
        internet = Pod("internet", "elsewhere", {})
        assert not policies.allows(pod, internet, 443), f"{pod.name} reaches outside the cluster"


def test_distributed_training_ranks_talk_to_each_other_and_to_the_backing_services() -> None:
    objects = [*render("overlays/gpu"), *render("distributed-training")]
    policies = _policies(objects)
    pods = {p.name: p for p in workload_pods(objects)}
    rank = pods["flywheel-distributed-training"]
    other_rank = Pod("rank-1", NAMESPACE, rank.labels, rank.ports)
    assert policies.allows(rank, other_rank, 29500) and policies.allows(rank, other_rank, 41234)
    for backing, port in (("redis", 6379), ("postgres", 5432), ("minio", 9000), ("ingestion", 8001)):
        assert policies.allows(rank, pods[backing], port), backing
    assert not policies.allows(rank, pods["inference"], 8005)
    assert not policies.allows(pods["inference"], rank, 29500)


def test_the_evaluator_sees_a_missing_ingress_rule() -> None:
    """The matrix above is only worth something if a broken policy changes it."""
    objects = [o for o in render("overlays/dev") if o["metadata"]["name"] != "registry-http-ingress"]
    actual = actual_flows(_policies(objects), workload_pods(objects))
    assert ("inference", "registry", 8004, "TCP") not in actual
    assert ("inference", "registry", 8004, "TCP") in expected_flows()
