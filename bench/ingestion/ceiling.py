"""The raw ceiling: the same backend's put + one bulk INSERT of equivalent item rows, in-process."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from bench.ingestion import LABELS
from bench.ingestion.workload import ImageSource, TextSource
from testkit.s3 import S3Server


@dataclass
class RawBatch:
    objects: list[tuple[str, bytes, str]]  # key, bytes, content type
    rows: list[dict[str, Any]]


class RawCeiling:
    """The same backend's put + one bulk INSERT of equivalent item rows, in-process, with no service around it."""

    TENANT = "ptn_benchraw"
    DATASET = "ds_benchraw"

    def __init__(self, backend: str, workdir: Path, s3_endpoint: str | None, threads: int) -> None:
        from services.ingestion.ingest import IMAGE_UPLOAD_THREADS
        from services.ingestion.models import Base, Dataset, Partner
        from shared.db import Database
        from shared.storage import FileStore, S3Store

        self.threads = threads
        self.upload_threads = IMAGE_UPLOAD_THREADS
        workdir.mkdir(parents=True, exist_ok=True)
        if backend == "s3":
            assert s3_endpoint
            self.store: Any = S3Store(s3_endpoint, S3Server.access_key, S3Server.secret_key)
        else:
            self.store = FileStore(workdir / "objects")
        self.store.ensure_buckets("raw")
        self.db = Database(f"sqlite:///{workdir / 'raw.sqlite3'}", Base.metadata)
        self.db.create_all()
        with self.db.session() as session:
            session.add(Partner(id=self.TENANT, name="bench-raw"))
            session.flush()
            session.add(Dataset(id=self.DATASET, tenant=self.TENANT, name="raw", task_type="text", labels=LABELS))

    def _row(self, push_id: str, now: datetime, data: bytes, kind: str, content_type: str, key: str,
             object_sha256: str, offset: int | None, index: int) -> dict[str, Any]:  # fmt: skip
        return {
            "id": f"itm_{uuid.uuid4().hex[:20]}",
            "tenant": self.TENANT,
            "dataset_id": self.DATASET,
            "kind": kind,
            "sha256": hashlib.sha256(data).hexdigest(),
            "content_type": content_type,
            "bucket": "raw",
            "object_key": key,
            "object_sha256": object_sha256,
            "offset": offset,
            "length": len(data),
            "label": LABELS[index % 2],
            "item_metadata": {},
            "redactions": {},
            "push_id": push_id,
            "created_at": now,
        }

    def text_batch(self, source: TextSource, size: int) -> RawBatch:
        push_id = f"push_{uuid.uuid4().hex[:20]}"
        now = datetime.now(UTC)
        texts = [source.next().encode("utf-8") for _ in range(size)]
        pack = b"".join(texts)
        key = f"{self.TENANT}/{self.DATASET}/text/{push_id}.txt"
        digest = hashlib.sha256(pack).hexdigest()
        rows, offset = [], 0
        for index, data in enumerate(texts):
            rows.append(self._row(push_id, now, data, "text", "text/plain; charset=utf-8", key, digest, offset, index))
            offset += len(data)
        return RawBatch([(key, pack, "application/octet-stream")], rows)

    def image_batch(self, source: ImageSource, size: int) -> RawBatch:
        push_id = f"push_{uuid.uuid4().hex[:20]}"
        now = datetime.now(UTC)
        objects, rows = [], []
        for index in range(size):
            data = source.next()
            digest = hashlib.sha256(data).hexdigest()
            key = f"{self.TENANT}/{self.DATASET}/images/{push_id}/{digest}"
            objects.append((key, data, "image/png"))
            rows.append(self._row(push_id, now, data, "image", "image/png", key, digest, None, index))
        return RawBatch(objects, rows)

    def _write(self, batch: RawBatch) -> None:
        from services.ingestion.models import Item

        def put(obj: tuple[str, bytes, str]) -> None:
            self.store.put("raw", obj[0], obj[1], content_type=obj[2])

        if len(batch.objects) == 1:
            put(batch.objects[0])
        else:  # as ingestion does: the objects of one push go up through IMAGE_UPLOAD_THREADS at a time
            with ThreadPoolExecutor(max_workers=self.upload_threads) as uploads:
                list(uploads.map(put, batch.objects))
        with self.db.session() as session:
            session.execute(insert(Item), batch.rows)

    def run(self, batches: list[RawBatch]) -> tuple[float, int]:
        pending = list(reversed(batches))
        lock = threading.Lock()
        abort = threading.Event()  # Ctrl-C or an error: the other writers stop after their current batch

        def worker() -> None:
            while not abort.is_set():
                with lock:
                    if not pending:
                        return
                    batch = pending.pop()
                self._write(batch)

        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            try:
                for future in [pool.submit(worker) for _ in range(self.threads)]:
                    future.result()
            except BaseException:
                abort.set()
                raise
        return time.perf_counter() - started, sum(len(b.rows) for b in batches)

    def close(self) -> None:
        self.db.dispose()
