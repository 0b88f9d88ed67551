"""checkov's Kubernetes checks on what `kubectl apply -k` would create: nothing fails, and whatever is skipped
is skipped in the manifest with its reason (a `checkov.io/skipN: ID=why` annotation) and listed in
docs/deployment.md.

checkov pins dependencies the project's own cannot share (packaging<24, cachetools<6), so it lives in a
virtualenv of its own: `.venv/checkov` (deploy/checkov-requirements.txt), or CHECKOV, or checkov on PATH.
It runs offline (`--skip-download`): no guideline or policy download.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.manifests import KUSTOMIZATIONS, REPO, find, pod_spec, render

pytestmark = pytest.mark.slow

DOCS = REPO / "docs" / "deployment.md"


def checkov_binary() -> str:
    candidates = [os.environ.get("CHECKOV"), str(Path(sys.prefix) / "checkov" / "bin" / "checkov")]
    for candidate in [*candidates, shutil.which("checkov")]:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    message = (
        "checkov is not installed: python -m venv .venv/checkov && "
        ".venv/checkov/bin/pip install -r deploy/checkov-requirements.txt"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_checkov(objects: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "rendered.yaml"
    manifest.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    result = subprocess.run(
        [
            checkov_binary(),
            "--file",
            str(manifest),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"},
    )
    assert result.returncode in (0, 1), f"checkov did not run ({result.returncode}):\n{result.stderr[-3000:]}"
    report = json.loads(result.stdout)
    report = report[0] if isinstance(report, list) else report
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    return report


def documented_skips() -> set[str]:
    """The check ids docs/deployment.md lists as skipped (its table of checkov skips)."""
    section = DOCS.read_text().split("### checkov", 1)
    assert len(section) == 2, "docs/deployment.md has no `### checkov` section"
    return set(re.findall(r"^\| `(CKV2?_K8S_\d+)` \|", section[1].split("\n## ", 1)[0], re.M))


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_checkov_finds_nothing_unexplained(path: str, tmp_path: Path) -> None:
    report = run_checkov(render(path), tmp_path)
    failed = [f"{f['check_id']} {f['resource']}: {f['check_name']}" for f in report["results"]["failed_checks"]]
    assert not failed, f"k8s/{path}: checkov fails:\n" + "\n".join(failed)
    assert report["summary"]["passed"] > 0
    skipped = report["results"]["skipped_checks"]
    unexplained = [
        f"{s['check_id']} {s['resource']}" for s in skipped if len(s["check_result"].get("suppress_comment", "")) < 20
    ]
    assert not unexplained, f"k8s/{path}: skipped without a reason: {unexplained}"
    undocumented = {s["check_id"] for s in skipped} - documented_skips()
    assert not undocumented, f"k8s/{path}: skipped but not listed in docs/deployment.md: {sorted(undocumented)}"


def test_checkov_catches_a_worker_without_probes_or_a_skip_without_reason(tmp_path: Path) -> None:
    """The check above can fail: a worker that loses its probes, and a workload that loses a skip, fail it."""
    objects = copy.deepcopy(render("overlays/gpu"))
    worker = find(objects, "Deployment", "labeling-worker")
    container = pod_spec(worker)["containers"][0]
    del container["livenessProbe"], container["readinessProbe"]
    redis = find(objects, "StatefulSet", "redis")
    pod_spec(redis)["securityContext"]["runAsUser"] = 999
    inference = find(objects, "Deployment", "inference")
    inference["metadata"]["annotations"] = {
        key: value for key, value in inference["metadata"]["annotations"].items() if not value.startswith("CKV_K8S_43=")
    }
    failed = {(f["check_id"], f["resource"]) for f in run_checkov(objects, tmp_path)["results"]["failed_checks"]}
    assert ("CKV_K8S_8", "Deployment.flywheel.labeling-worker") in failed
    assert ("CKV_K8S_9", "Deployment.flywheel.labeling-worker") in failed
    assert ("CKV_K8S_40", "StatefulSet.flywheel.redis") in failed
    assert ("CKV_K8S_43", "Deployment.flywheel.inference") in failed
