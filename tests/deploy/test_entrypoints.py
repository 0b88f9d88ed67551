"""What the containers run exists in the repo, and what probes them is what the apps serve."""

from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from werkzeug.routing import Map
from werkzeug.serving import make_server

from cli.main import build_parser
from shared.settings import DEFAULT_PORTS, SERVICES
from tests.deploy.manifests import (
    KUSTOMIZATIONS,
    REPO,
    WORKER_SERVICES,
    argv,
    compose,
    compose_argv,
    containers,
    is_flywheel,
    pod_spec,
    render,
    workloads,
)

ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - a container's server listens on its pod's address
IMAGE_GRANIAN_LOG_CONFIG = "/etc/flywheel/granian-logging.json"  # where both Dockerfiles put it
GUNICORN_OPTIONS = {
    "--worker-class": "gthread",
    "--workers": "1",
    "--threads": "8",
    "--logger-class": "shared.server_logging.GunicornLogger",
}
GRANIAN_OPTIONS = {
    "--interface": "wsgi",
    "--workers": "1",
    "--blocking-threads": "64",
    "--log-config": IMAGE_GRANIAN_LOG_CONFIG,
}
GRANIAN_SERVICES = {"inference"}  # the partners' hot path; the others run under gunicorn


def _load_healthcheck() -> Any:
    spec = importlib.util.spec_from_file_location("flywheel_healthcheck", REPO / "deploy" / "healthcheck.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


healthcheck = _load_healthcheck()


def _options(arguments: list[str]) -> dict[str, str]:
    options, index = {}, 0
    while index < len(arguments):
        arg = arguments[index]
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            options[key] = value
        elif arg.startswith("--") and index + 1 < len(arguments):
            options[arg] = arguments[index + 1]
            index += 1
        index += 1
    return options


def _app_factory(target: str, expected: str, where: str) -> str:
    """The service whose app factory `target` (`services.<service>.app:<expected>`) names, checked to exist."""
    module_name, _, factory = target.partition(":")
    assert factory == expected, f"{where}: the server must call the app factory ({expected}), got {target!r}"
    service = module_name.removeprefix("services.").removesuffix(".app")
    assert module_name == f"services.{service}.app" and service in SERVICES, f"{where}: {target!r}"
    module = importlib.import_module(module_name)
    assert callable(getattr(module, "create_app", None)), f"{where}: {module_name} has no create_app"
    return service


def check_command(command: list[str], where: str) -> tuple[str, str, int]:
    """Checks one Flywheel container command against the code; returns (kind, service, port)."""
    if command[0] == "gunicorn":
        service = _app_factory(command[-1], "create_app()", where)
        assert service not in GRANIAN_SERVICES, f"{where}: {service} runs under granian"
        options = _options(command[1:-1])
        host, _, port = options["--bind"].rpartition(":")
        assert host == ALL_INTERFACES and int(port) == DEFAULT_PORTS[service], f"{where}: --bind {options['--bind']}"
        for option, value in GUNICORN_OPTIONS.items():
            assert options.get(option) == value, f"{where}: {option} {options.get(option)}"
        return "http", service, int(port)
    if command[0] == "granian":
        service = _app_factory(command[-1], "create_app", where)
        assert service in GRANIAN_SERVICES and "--factory" in command, f"{where}: granian must call the factory"
        options = dict(arg.split("=", 1) for arg in command[1:-1] if "=" in arg)
        port = int(options["--port"])
        assert options["--host"] == ALL_INTERFACES and port == DEFAULT_PORTS[service], f"{where}: {options}"
        for option, value in GRANIAN_OPTIONS.items():
            assert options.get(option) == value, f"{where}: {option} {options.get(option)}"
        return "http", service, port
    if command[:2] == ["flywheel", "worker"]:
        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        module_name, _, function = scripts["flywheel"].partition(":")
        assert callable(getattr(importlib.import_module(module_name), function))
        try:
            args = build_parser().parse_args(command[1:])
        except SystemExit:
            pytest.fail(f"{where}: `{' '.join(command)}` is not a command the flywheel CLI accepts")
        module = importlib.import_module(f"services.{args.service}.app")
        assert module.SPEC.runs_worker, f"{where}: {args.service} runs no worker"
        assert callable(module.create_celery) and module.SPEC.name == args.service, where
        return "worker", args.service, 0
    if command[0] == "torchrun":
        module_name = command[command.index("-m") + 1]
        if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
            pytest.fail(f"{where}: package of {module_name} does not exist")
        return "torchrun", module_name, 0
    pytest.fail(f"{where}: {command[0]!r} is not a command of the Flywheel image")


def _flywheel_containers() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    for path in KUSTOMIZATIONS:
        for workload in workloads(render(path)):
            for container in filter(is_flywheel, containers(workload)):
                yield f"k8s/{path} {workload['metadata']['name']}", workload, container


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_kubernetes_command_names_code_that_exists(path: str) -> None:
    for workload in workloads(render(path)):
        for container in filter(is_flywheel, containers(workload)):
            where = f"k8s/{path} {workload['metadata']['name']}"
            kind, service, port = check_command(argv(container), where)
            if kind == "http":
                assert [p["containerPort"] for p in container["ports"]] == [port], where
            if kind in {"http", "worker"}:
                labels = workload["spec"]["template"]["metadata"]["labels"]
                assert (labels["app.kubernetes.io/name"], labels["app.kubernetes.io/component"]) == (service, kind)
                suffix = "" if kind == "http" else "-worker"
                assert workload["metadata"]["name"] == f"{service}{suffix}", where


def test_every_service_runs_an_http_server_and_its_worker_in_each_overlay() -> None:
    for path in ("overlays/dev", "overlays/gpu"):
        found = set()
        for workload in workloads(render(path)):
            for container in filter(is_flywheel, containers(workload)):
                kind, service, _ = check_command(argv(container), path)
                found.add((kind, service))
        assert found == {("http", s) for s in SERVICES} | {("worker", s) for s in WORKER_SERVICES}, path


class _ArgumentsParsed(Exception):
    """Raised where the entry point would start joining the process group: its arguments parsed."""


def test_the_distributed_training_entry_point_accepts_the_job_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    job = next(o for o in render("distributed-training") if o["kind"] == "Job")
    container = pod_spec(job)["containers"][0]
    command = argv(container)
    module_name = command[command.index("-m") + 1]
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} is not in the repo yet; this checks it once it is")
    env = {item["name"]: item.get("value", "") for item in container["env"]}
    arguments = [env.get(a[2:-1], a) if a.startswith("$(") else a for a in command[command.index("-m") + 2 :]]
    module = importlib.import_module(module_name)

    def joined(*_args: object, **_kwargs: object) -> None:
        raise _ArgumentsParsed

    monkeypatch.setattr(module.World, "from_launcher", classmethod(joined))
    try:
        module.main(arguments)
    except SystemExit as exc:
        pytest.fail(f"python -m {module_name} {' '.join(arguments)} does not parse (exit {exc.code})")
    except (_ArgumentsParsed, ImportError):
        pass  # parsed; what runs next (the training pipeline) is the training service's to test


def test_every_compose_command_names_code_that_exists() -> None:
    found = set()
    for name, service in compose()["services"].items():
        if service.get("image", "").split(":")[0] not in {"flywheel", "flywheel-gpu"}:
            continue
        kind, svc, _ = check_command(compose_argv(service), f"docker-compose.yml {name}")
        found.add((kind, svc))
        expected_name = svc if kind == "http" else f"{svc}-worker"
        assert name.removesuffix("-gpu") == expected_name, name
    assert found == {("http", s) for s in SERVICES} | {("worker", s) for s in WORKER_SERVICES}


# ---------------------------------------------------------------------------------------------- probes


def _probe_paths(container: dict[str, Any]) -> dict[str, str]:
    return {
        kind: container[kind]["httpGet"]["path"]
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        if "httpGet" in container.get(kind, {})
    }


def _serves(app: Flask, path: str) -> bool:
    adapter: Map = app.url_map.bind("localhost")
    try:
        adapter.match(path, method="GET")
    except Exception:
        return False
    return True


def test_the_apps_serve_the_health_paths(service_apps: dict[str, Flask]) -> None:
    for service, app in service_apps.items():
        client = app.test_client()
        assert client.get(healthcheck.LIVENESS_PATH).status_code == 200, service
        assert _serves(app, healthcheck.READINESS_PATH) and _serves(app, "/metrics"), service
        assert not _serves(app, "/no-such-health-path"), "the route check must be able to fail"


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_probe_path_is_one_the_app_serves(path: str, service_apps: dict[str, Flask]) -> None:
    for workload in workloads(render(path)):
        for container in filter(is_flywheel, containers(workload)):
            kind, service, port = check_command(argv(container), path)
            probes = _probe_paths(container)
            if kind != "http":
                assert not probes, f"{workload['metadata']['name']}: only HTTP servers have health paths"
                continue
            assert probes == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
            for probe, probe_path in probes.items():
                assert _serves(service_apps[service], probe_path), f"{service} does not serve {probe_path}"
                assert container[probe]["httpGet"]["port"] in ("http", port)


# ---------------------------------------------------------------------------------------------- the health check


def test_the_health_check_recognises_every_deployed_command() -> None:
    commands = [argv(c) for _, _, c in _flywheel_containers()]
    commands += [compose_argv(s) for s in compose()["services"].values() if s.get("image", "").startswith("flywheel")]
    for command in commands:
        if command[0] == "torchrun":
            continue
        kind, service, port = check_command(command, "health check")
        # As /proc shows it: the console script run by the virtualenv's interpreter.
        seen = healthcheck.classify(["/opt/venv/bin/python", f"/opt/venv/bin/{command[0]}", *command[1:]])
        assert seen == healthcheck.Process(kind, port=port, service="" if kind == "http" else service)
    assert healthcheck.classify(["/bin/sh", "-c", "sleep 1"]) is None
    assert healthcheck.classify(["python", "-m", "cli.main", "worker", "labeling"]).kind == "worker"


@pytest.fixture
def served_ingestion(service_apps: dict[str, Flask]) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, service_apps["ingestion"], threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(5)


def test_the_health_check_reports_what_answers(served_ingestion: str) -> None:
    assert healthcheck.main(["--url", served_ingestion + healthcheck.LIVENESS_PATH]) == 0
    assert healthcheck.main(["--url", served_ingestion + "/no-such-path"]) == 1
    closed = served_ingestion.rsplit(":", 1)[0] + ":9"
    assert healthcheck.main(["--url", closed + healthcheck.LIVENESS_PATH]) == 1


def test_the_health_check_runs_as_a_script(served_ingestion: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "healthcheck.py"), "--url", served_ingestion + "/healthz"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "answered 200" in result.stdout
