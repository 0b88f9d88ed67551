"""What the training tests share: real data sets, snapshots written to S3 exactly as labeling writes them,
`training.requested` events sent through Redis, and readers for the runs and events that come out.

Data:
- Images: scikit-learn's bundled handwritten digits (`load_digits`, 8x8 grayscale), stored as 8x8 grayscale
  PNGs; the service converts them to RGB and scales them up, as it does any small grayscale image.
- Text: the first sentence of the docstrings of installed packages, labeled by the package family they come
  from: `numerics` (numpy), `web` (werkzeug, flask, requests, urllib3, http, urllib) and `databases`
  (sqlalchemy, sqlite3). Real English written by people, shipped with packages in this virtualenv.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
import json
import random
import re
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from functools import cache
from typing import Any

from PIL import Image
from sqlalchemy import select

from services.training.models import TrainingRun
from shared.artifacts import DATASETS_BUCKET, RAW_BUCKET, snapshot_prefix
from shared.events.envelope import make_envelope
from shared.events.tables import event_tables
from shared.settings import BUCKETS
from shared.storage import ObjectStore
from tests.helpers import eventually

DOCSTRING_SOURCES = {
    "numerics": ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.polynomial.polynomial", "numpy.ma"),
    "web": (
        "werkzeug.http",
        "werkzeug.utils",
        "werkzeug.urls",
        "werkzeug.routing",
        "werkzeug.datastructures",
        "werkzeug.exceptions",
        "werkzeug.security",
        "flask",
        "requests",
        "requests.sessions",
        "requests.models",
        "requests.utils",
        "urllib3",
        "http.client",
        "http.cookies",
        "urllib.request",
        "urllib.parse",
    ),
    "databases": (
        "sqlalchemy",
        "sqlalchemy.orm",
        "sqlalchemy.engine",
        "sqlalchemy.types",
        "sqlalchemy.sql.functions",
        "sqlalchemy.pool",
        "sqlalchemy.dialects.postgresql",
        "sqlite3",
    ),
}
_SPHINX_ROLE = re.compile(r":\w+:`[~.!]*([^`<]+?)(?:\s*<[^>]+>)?`")
_SIGNATURE = re.compile(r"^[\w.]+\(")


def _summary(doc: Any) -> str | None:
    if not isinstance(doc, str):
        return None
    paragraph = inspect.cleandoc(doc).split("\n\n")[0].replace("\n", " ").strip()
    sentence = _SPHINX_ROLE.sub(r"\1", re.split(r"(?<=[.!?])\s", paragraph)[0]).replace("``", "").strip()
    if not 25 <= len(sentence) <= 200 or not sentence[0].isalpha() or _SIGNATURE.match(sentence):
        return None
    return sentence


@cache
def docstring_corpus() -> dict[str, tuple[str, ...]]:
    corpus: dict[str, set[str]] = {}
    for label, modules in DOCSTRING_SOURCES.items():
        sentences = corpus.setdefault(label, set())
        for module_name in modules:
            module = importlib.import_module(module_name)
            package = module_name.split(".")[0]
            for name, obj in sorted(vars(module).items()):
                if name.startswith("_") or not callable(obj):
                    continue
                members = [obj]
                if inspect.isclass(obj):
                    members += [v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and callable(v)]
                for member in members:
                    if not str(getattr(member, "__module__", "") or package).startswith(package):
                        continue  # inherited builtins (str methods and the like) say nothing about the package
                    sentence = _summary(getattr(member, "__doc__", None))
                    if sentence:
                        sentences.add(sentence)
    return {label: tuple(sorted(sentences)) for label, sentences in corpus.items()}


def text_items(per_label: int, *, seed: int = 7, validation_share: float = 0.25) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    items = []
    for label, sentences in sorted(docstring_corpus().items()):
        chosen = rng.sample(sentences, per_label)
        cut = int(per_label * (1 - validation_share))
        for index, sentence in enumerate(chosen):
            split = "train" if index < cut else "validation"
            items.append({"content": sentence.encode(), "label": label, "split": split})
    return items


def digit_items(count: int | None = None, *, digits: tuple[int, ...] = tuple(range(10))) -> list[dict[str, Any]]:
    """The first `count` scikit-learn digits of the given classes as 8x8 grayscale PNGs; every 5th validates."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    items = []
    for image, target in zip(bunch.images, bunch.target, strict=True):
        if int(target) not in digits:
            continue
        buffer = io.BytesIO()
        Image.fromarray((image * (255.0 / 16.0)).round().astype("uint8"), mode="L").save(buffer, format="PNG")
        split = "validation" if len(items) % 5 == 4 else "train"
        items.append({"content": buffer.getvalue(), "label": str(int(target)), "split": split})
        if count is not None and len(items) >= count:
            break
    return items


def write_snapshot(
    store: ObjectStore,
    *,
    tenant: str,
    dataset_id: str,
    task_type: str,
    labels: list[str],
    items: list[dict[str, Any]],
    snapshot_id: str | None = None,
) -> dict[str, Any]:
    """Write content, `manifest.jsonl` and `snapshot.json` as the labeling service does; returns the snapshot's
    id and manifest reference. Text items are byte ranges of one packed object; images are one object each."""
    store.ensure_buckets(*BUCKETS)
    snapshot_id = snapshot_id or f"snap_{uuid.uuid4().hex[:12]}"
    lines = []
    if task_type == "text_classification":
        packed = b"".join(item["content"] for item in items)
        key = f"{tenant}/{dataset_id}/text/{uuid.uuid4().hex}.bin"
        store.put(RAW_BUCKET, key, packed)
        offset = 0
        for number, item in enumerate(items):
            length = len(item["content"])
            content = {
                "bucket": RAW_BUCKET,
                "key": key,
                "sha256": hashlib.sha256(item["content"]).hexdigest(),
                "offset": offset,
                "length": length,
            }
            offset += length
            lines.append(_line(f"itm_{number:06d}", "text", content, item))
    else:
        keys = [f"{tenant}/{dataset_id}/images/{number:06d}.png" for number in range(len(items))]
        with ThreadPoolExecutor(max_workers=8) as pool:
            stored = list(
                pool.map(lambda pair: store.put(RAW_BUCKET, pair[0], pair[1]["content"]), zip(keys, items, strict=True))
            )
        for number, (item, info) in enumerate(zip(items, stored, strict=True)):
            content = {"bucket": RAW_BUCKET, "key": info.key, "sha256": info.sha256}
            lines.append(_line(f"itm_{number:06d}", "image", content, item))
    manifest = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()
    prefix = snapshot_prefix(tenant, dataset_id, snapshot_id)
    info = store.put(DATASETS_BUCKET, f"{prefix}/manifest.jsonl", manifest, content_type="application/x-ndjson")
    description = {
        "snapshot_id": snapshot_id,
        "dataset_id": dataset_id,
        "tenant": tenant,
        "task_type": task_type,
        "labels": labels,
        "label_counts": dict(Counter(item["label"] for item in items)),
        "split_counts": dict(Counter(item["split"] for item in items)),
        "item_count": len(items),
        "manifest_sha256": info.sha256,
        "created_at": datetime.now(UTC).isoformat(),
    }
    store.put(DATASETS_BUCKET, f"{prefix}/snapshot.json", json.dumps(description).encode())
    return {
        "snapshot_id": snapshot_id,
        "manifest": {"bucket": DATASETS_BUCKET, "key": f"{prefix}/manifest.jsonl", "sha256": info.sha256},
    }


def _line(item_id: str, kind: str, content: dict[str, Any], item: dict[str, Any]) -> dict[str, Any]:
    return {"item_id": item_id, "kind": kind, "content": content, "label": item["label"], "split": item["split"]}


def request_training(
    runtime: Any,
    *,
    tenant: str,
    dataset_id: str,
    snapshot: dict[str, Any],
    task_type: str,
    labels: list[str],
    hyperparameters: dict[str, Any] | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    trace_id: str | None = None,
    search: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Send a `training.requested` event (as labeling would) over Redis to the training queue."""
    payload = {
        "dataset_id": dataset_id,
        "snapshot_id": snapshot["snapshot_id"],
        "manifest": snapshot["manifest"],
        "task_type": task_type,
        "labels": labels,
        "reason": "test",
        "model_name": model_name,
        "base_model": base_model,
        "hyperparameters": hyperparameters or {},
        "search": search,
    }
    message = make_envelope("training.requested", payload, tenant=tenant, trace_id=trace_id).to_dict()
    runtime.bus.send(message, "training")
    return message


def published(runtime: Any, event_type: str, run_id: str | None = None) -> list[dict[str, Any]]:
    """Envelopes of `event_type` the training service wrote to its outbox (for one run, if given)."""
    outbox = event_tables(runtime.db.metadata).outbox
    with runtime.db.session() as session:
        rows = session.scalars(select(outbox.c.envelope).where(outbox.c.event_type == event_type)).all()
    return [row for row in rows if run_id is None or row["payload"]["run_id"] == run_id]


def all_runs(runtime: Any) -> list[TrainingRun]:
    with runtime.db.session() as session:
        return list(session.scalars(select(TrainingRun).order_by(TrainingRun.seq)).all())


def wait_for_run(runtime: Any, *, status: str | tuple[str, ...], timeout: float = 120.0, run_id: str | None = None):
    wanted = (status,) if isinstance(status, str) else status

    def probe() -> TrainingRun | None:
        for run in all_runs(runtime):
            if (run_id is None or run.id == run_id) and run.status in wanted:
                return run
        return None

    return eventually(probe, timeout=timeout, interval=0.2, what=f"a run in status {wanted}")


def digits_run_body(
    store: ObjectStore, *, digits: tuple[int, ...], count: int, hyperparameters: dict[str, Any], **fields: Any
) -> dict[str, Any]:
    """A small digits snapshot for tenant acme (`count` items of `digits`) and the `POST /v1/runs` body that
    trains mobilenet_v3_small on it at 32x32 with `hyperparameters`; `fields` add to the body (e.g. `launch`)."""
    snapshot = write_snapshot(
        store,
        tenant="acme",
        dataset_id="ds_digits",
        task_type="image_classification",
        labels=[str(d) for d in digits],
        items=digit_items(count, digits=digits),
    )
    return {
        "tenant": "acme",
        "dataset_id": "ds_digits",
        "snapshot_id": snapshot["snapshot_id"],
        "base_model": "mobilenet_v3_small",
        **fields,
        "hyperparameters": {"image_size": 32, **hyperparameters},
    }
