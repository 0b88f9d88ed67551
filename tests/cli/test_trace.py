"""`flywheel trace` on a cluster's logs: piped in from a log export, or read from the pods through kubectl.

No cluster exists here, so `kubectl` is a test double: an executable on PATH that records the arguments it was
given and prints pod log lines recorded from the platform (`kubectl logs --prefix` form, JSON and not). The
`flywheel` command itself runs as a real process, reading a real pipe.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli.trace import POD_SELECTOR
from tests.deploy.manifests import render, selector_matches, workloads

FLYWHEEL = Path(sys.executable).with_name("flywheel")
POD_LOGS = Path(__file__).with_name("data") / "pod-logs.txt"

FAKE_KUBECTL = """#!{python}
import json, os, sys
with open(os.environ["FAKE_KUBECTL_RECORD"], "a") as record:
    record.write(json.dumps(sys.argv[1:]) + "\\n")
if os.environ.get("FAKE_KUBECTL_FAIL"):
    sys.stderr.write("error: You must be logged in to the server (Unauthorized)\\n")
    sys.exit(1)
sys.stdout.write(open(os.environ["FAKE_KUBECTL_LOGS"]).read())
"""


@pytest.fixture
def fake_kubectl(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH starts with a fake `kubectl`; its calls are recorded in `FAKE_KUBECTL_RECORD`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL.format(python=sys.executable))
    kubectl.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "KUBECTL"}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_KUBECTL_RECORD=str(tmp_path / "kubectl-calls.jsonl"),
        FAKE_KUBECTL_LOGS=str(POD_LOGS),
        FLYWHEEL_HOME=str(tmp_path / "home"),
    )
    return env


def kubectl_calls(env: dict[str, str]) -> list[list[str]]:
    record = Path(env["FAKE_KUBECTL_RECORD"])
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def flywheel(*args: str, env: dict[str, str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(FLYWHEEL), *args], input=stdin, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def assert_push_timeline(output: str) -> None:
    lines = output.splitlines()
    assert lines[0] == "trace push-7f3a: 4 lines across ingestion, labeling"
    timeline = [line for line in lines[2:] if line]
    assert [line.split()[3] for line in timeline] == [
        "items_ingested",
        "http_request",
        "event_received",
        "tasks_created",
    ]
    assert timeline[0].startswith("+   0.000s  ingestion")
    assert timeline[3].startswith("+   0.280s  labeling")
    assert "pod=labeling-worker-5b8c9d7f6-q8v4m" in timeline[3] and "created=2" in timeline[3]
    assert "ds_77aa" not in output and "not JSON" not in output


def test_a_log_export_piped_in_through_a_shell_pipe(fake_kubectl: dict[str, str]) -> None:
    # What the docs tell an operator to type, through a real shell pipe.
    export = f"kubectl logs -n flywheel -l {POD_SELECTOR} --all-containers --prefix --tail=-1"
    pipeline = f"{export} | {FLYWHEEL} trace push-7f3a -"
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", pipeline],
        env=fake_kubectl,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert_push_timeline(result.stdout)


def test_a_log_export_without_kubectl_prefixes_reads_the_same(fake_kubectl: dict[str, str]) -> None:
    export = "\n".join(line.split("] ", 1)[1] for line in POD_LOGS.read_text().splitlines())
    result = flywheel("trace", "push-7f3a", "-", env=fake_kubectl, stdin=export)
    assert result.returncode == 0, result.stderr
    assert "4 lines across ingestion, labeling" in result.stdout
    assert "pod=" not in result.stdout
    missing = flywheel("trace", "push-404", "-", env=fake_kubectl, stdin=export)
    assert missing.returncode == 1
    assert "no log line carries trace_id push-404 in standard input" in missing.stdout


def test_kubernetes_reads_every_flywheel_pod_through_kubectl_logs(fake_kubectl: dict[str, str]) -> None:
    result = flywheel("trace", "push-7f3a", "--kubernetes", env=fake_kubectl)
    assert result.returncode == 0, result.stderr
    assert_push_timeline(result.stdout)
    assert kubectl_calls(fake_kubectl) == [
        [
            "logs",
            "--namespace=flywheel",
            "--selector=app.kubernetes.io/part-of=flywheel,tier=app",
            "--all-containers=true",
            "--prefix=true",
            "--tail=-1",
            "--ignore-errors=true",
        ]
    ]


def test_kubernetes_takes_a_context_namespace_and_window(fake_kubectl: dict[str, str]) -> None:
    args = ["trace", "push-7f3a", "-k", "--namespace", "flywheel-staging", "--context", "prod-eu", "--since", "2h"]
    result = flywheel(*args, env=fake_kubectl)
    assert result.returncode == 0, result.stderr
    assert kubectl_calls(fake_kubectl) == [
        [
            "--context=prod-eu",
            "logs",
            "--namespace=flywheel-staging",
            "--selector=app.kubernetes.io/part-of=flywheel,tier=app",
            "--all-containers=true",
            "--prefix=true",
            "--tail=-1",
            "--ignore-errors=true",
            "--since=2h",
        ]
    ]


def test_a_failing_kubectl_is_reported_not_mistaken_for_no_lines(fake_kubectl: dict[str, str]) -> None:
    result = flywheel("trace", "push-7f3a", "--kubernetes", env={**fake_kubectl, "FAKE_KUBECTL_FAIL": "1"})
    assert result.returncode == 2
    assert "kubectl logs failed (exit 1): error: You must be logged in to the server (Unauthorized)" in result.stderr


def test_without_kubectl_the_command_says_so(fake_kubectl: dict[str, str], tmp_path: Path) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    env = {**fake_kubectl, "PATH": str(empty)}
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "trace", "push-7f3a", "--kubernetes"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert result.returncode == 2
    assert "kubectl is not installed" in result.stderr


def test_a_source_and_kubernetes_are_not_both_taken(fake_kubectl: dict[str, str]) -> None:
    result = flywheel("trace", "push-7f3a", "-", "--kubernetes", env=fake_kubectl, stdin="")
    assert result.returncode == 2
    assert kubectl_calls(fake_kubectl) == []


def test_a_named_log_file_is_read(fake_kubectl: dict[str, str], tmp_path: Path) -> None:
    result = flywheel("trace", "push-7f3a", str(POD_LOGS), env=fake_kubectl)
    assert result.returncode == 0, result.stderr
    assert_push_timeline(result.stdout)
    assert flywheel("trace", "push-7f3a", str(tmp_path / "nothing.log"), env=fake_kubectl).returncode == 2


@pytest.mark.parametrize("overlay", ["overlays/dev", "overlays/gpu", "distributed-training"])
def test_the_selector_names_exactly_the_flywheel_processes(overlay: str) -> None:
    """The labels the trace reads by are the manifests' own: every pod that runs Flywheel code, nothing else."""
    key_values = dict(pair.split("=", 1) for pair in POD_SELECTOR.split(","))
    for workload in workloads(render(overlay)):
        labels = workload["spec"]["template"]["metadata"]["labels"]
        images = [c["image"] for c in workload["spec"]["template"]["spec"]["containers"]]
        runs_flywheel = any(image.rsplit("/", 1)[-1].startswith("flywheel") for image in images)
        matched = selector_matches({"matchLabels": key_values}, labels)
        assert matched == runs_flywheel, f"k8s/{overlay} {workload['metadata']['name']}: {labels}"
