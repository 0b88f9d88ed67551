"""`flywheel trace ID`: every log line that carries one trace id, from any deployment, as one timeline.

Where the lines come from:
- a local run: the log files `flywheel up` writes (FLYWHEEL_HOME/logs/*.log), or a folder or file named;
- a log export piped in: `kubectl logs ... | flywheel trace ID -`, or any file of JSON lines;
- a Kubernetes deployment: `flywheel trace ID --kubernetes` reads the logs of every Flywheel pod through
  `kubectl logs`, selected by the labels the manifests put on them (k8s/base: `app.kubernetes.io/part-of=flywheel`
  on everything, `tier=app` on the platform's own processes, not Redis, PostgreSQL or MinIO).

Lines that are not JSON, or whose `trace_id` is another one, are skipped.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

# The labels of the platform's own pods (k8s/base/*.yaml): every Flywheel HTTP server and worker.
POD_SELECTOR = "app.kubernetes.io/part-of=flywheel,tier=app"
DEFAULT_NAMESPACE = "flywheel"
# `kubectl logs --prefix` starts each line with `[pod/<pod>/<container>] `.
_PREFIX = re.compile(r"^\[pod/(?P<pod>[^/\]]+)/(?P<container>[^\]]+)\] ")
_SKIPPED_FIELDS = {"timestamp", "trace_id", "service", "event", "level", "logger", "pod"}


@dataclass(frozen=True)
class Cluster:
    """Which cluster's logs: kubectl's current context unless named, the platform's namespace by default."""

    namespace: str = DEFAULT_NAMESPACE
    context: str | None = None
    since: str | None = None

    def kubectl_logs_argv(self, kubectl: str) -> list[str]:
        argv = [kubectl]
        if self.context:
            argv.append(f"--context={self.context}")
        argv += [
            "logs",
            f"--namespace={self.namespace}",
            f"--selector={POD_SELECTOR}",
            "--all-containers=true",
            "--prefix=true",
            # With a selector kubectl shows only the last 10 lines of each container unless told otherwise.
            "--tail=-1",
            # Pods that crashed and restarted: their previous container's lines are gone, the current one's are
            # here; one pod that cannot be read must not hide the others'.
            "--ignore-errors=true",
        ]
        if self.since:
            argv.append(f"--since={self.since}")
        return argv


def add_trace_parser(sub: Any) -> None:
    trace = sub.add_parser(
        "trace",
        help="a trace id's journey through every service's logs",
        description="Local log files by default; `-` reads a log export from standard input "
        "(`kubectl logs ... | flywheel trace ID -`); --kubernetes reads every Flywheel pod's logs with kubectl.",
    )
    trace.add_argument("trace_id")
    trace.add_argument("source", nargs="?", help="a log file or folder, or - for standard input")
    trace.add_argument("--logs", type=Path, help="log folder (default: FLYWHEEL_HOME/logs)")
    trace.add_argument("--kubernetes", "-k", action="store_true", help="read the pods' logs with kubectl logs")
    trace.add_argument("--namespace", "-n", default=DEFAULT_NAMESPACE, help="with --kubernetes (default: flywheel)")
    trace.add_argument("--context", help="with --kubernetes: a kubeconfig context (default: the current one)")
    trace.add_argument("--since", help="with --kubernetes: only lines newer than this (5m, 2h; default: all)")


class TraceSourceError(Exception):
    """The logs cannot be read (no kubectl, kubectl failed, no such file)."""


def run_trace(
    trace_id: str,
    *,
    source: str | None,
    log_dir: Path,
    cluster: Cluster | None,
    stdin: TextIO | None = None,
) -> int:
    """Print the trace's timeline; 0 when some line carries it, 1 when none does, 2 when the logs cannot be read."""
    try:
        if cluster is not None:
            where = f"the pods {POD_SELECTOR} in namespace {cluster.namespace}"
            lines = collect_trace(kubectl_lines(cluster), trace_id)
        elif source == "-":
            where = "standard input"
            lines = collect_trace(stdin or sys.stdin, trace_id)
        else:
            path = Path(source) if source else log_dir
            where = str(path)
            lines = collect_trace(file_lines(path), trace_id)
    except TraceSourceError as exc:
        print(f"flywheel: {exc}", file=sys.stderr)
        return 2
    if not lines:
        print(f"no log line carries trace_id {trace_id} in {where}")
        return 1
    print_timeline(trace_id, lines)
    return 0


def print_timeline(trace_id: str, lines: list[dict[str, Any]]) -> None:
    start = _when(lines[0])
    services = sorted({line.get("service", "?") for line in lines})
    print(f"trace {trace_id}: {len(lines)} lines across {', '.join(services)}\n")
    for line in lines:
        offset = (_when(line) - start).total_seconds()
        details = " ".join(
            f"{k}={v}" for k, v in line.items() if k not in _SKIPPED_FIELDS and not isinstance(v, dict | list)
        )
        if "pod" in line:
            details = f"pod={line['pod']} {details}".rstrip()
        print(f"+{offset:8.3f}s  {line.get('service', '?'):<10} {line.get('event', ''):<28} {details[:160]}")


def collect_trace(raw_lines: Iterable[str], trace_id: str) -> list[dict[str, Any]]:
    """The JSON lines that carry `trace_id`, oldest first."""
    found: list[dict[str, Any]] = []
    for raw in raw_lines:
        if trace_id not in raw:
            continue
        pod = None
        prefixed = _PREFIX.match(raw)
        if prefixed:
            pod, raw = prefixed["pod"], raw[prefixed.end() :]
        try:
            line = json.loads(raw)
        except json.JSONDecodeError:
            continue
        if not isinstance(line, dict) or line.get("trace_id") != trace_id:
            continue
        if pod is not None:
            line.setdefault("pod", pod)
        found.append(line)
    return sorted(found, key=_when)


def file_lines(path: Path) -> Iterator[str]:
    """The lines of one log file, or of every `*.log` in a folder."""
    if not path.exists():
        raise TraceSourceError(f"{path} does not exist")
    for file in sorted(path.glob("*.log")) if path.is_dir() else [path]:
        with file.open(errors="replace") as handle:
            yield from handle


def kubectl_lines(cluster: Cluster) -> Iterator[str]:
    """The lines `kubectl logs` prints for every Flywheel pod, streamed as they come."""
    kubectl = os.environ.get("KUBECTL") or shutil.which("kubectl")
    if kubectl is None:
        raise TraceSourceError("kubectl is not installed (or set KUBECTL to it): it reads the pods' logs")
    argv = cluster.kubectl_logs_argv(kubectl)
    # stderr goes to a file, not a pipe: a pipe nobody reads while stdout streams could fill and stall kubectl.
    with tempfile.TemporaryFile("w+", errors="replace") as errors:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=errors, text=True, errors="replace") as proc:
            assert proc.stdout is not None
            yield from proc.stdout
        if proc.returncode != 0:
            errors.seek(0)
            raise TraceSourceError(f"kubectl logs failed (exit {proc.returncode}): {errors.read().strip()[:500]}")


def _when(line: dict[str, Any]) -> datetime:
    try:
        when = datetime.fromisoformat(str(line.get("timestamp")).replace("Z", "+00:00"))
    except ValueError:
        return datetime.fromtimestamp(0, UTC)
    return when if when.tzinfo else when.replace(tzinfo=UTC)
