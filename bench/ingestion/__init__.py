"""The ingestion benchmark (`python -m bench.ingestion`): one module per tool.

- ``workload``: the texts and images pushed, and the push bodies made of them;
- ``service``: the real ingestion service under gunicorn, and the load generator;
- ``ceiling``: the raw storage-write + DB-insert ceiling, in-process;
- ``throughput``: service against ceiling, repeat by repeat, with the CPU each process burnt;
- ``profiler``: the text push in-process under cProfile, broken down by product module and function;
- ``__main__``: runs them and reports.
"""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/9"  # a DB nobody else uses: the bench flushes it, and only it
TOKEN = "bench-internal-token"  # noqa: S105 - a throwaway service's token
LABELS = ["neg", "pos"]
