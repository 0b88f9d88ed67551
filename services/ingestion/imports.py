"""Bulk imports: a JSONL file, a zip of images or a CoNLL-style BIO file (token_classification), uploaded as a
stream and processed by the worker.

The upload is streamed into object storage (never held whole in memory) and an `ingestion.process_import`
task is queued through the outbox in the transaction that records the import. The worker reads the file
back as a stream, in batches of `BATCH_SIZE`, through the same pipeline as a push; each batch's progress
commits with its items, so a worker that dies resumes where the last batch ended.

A tenant with an item or byte quota (daily or monthly) has its import admitted whole before anything is stored
(`quotas.admit_import`): a first pass counts what the import would add (`_count`), the import fails with the
quota's error and stores no item if that would pass a quota, and otherwise holds that much on its row until it
ends, so that concurrent pushes and imports cannot take the room its later batches need. Each batch spends from
the hold in the transaction that stores it; the transaction that finishes the import releases the rest.

Zip files are checked before anything is read: entry count, total and per-entry uncompressed size and
compression ratio (zip bombs), and every name for absolute paths or `..` (path traversal). An image's
label is its top-level folder (`cat/001.png`), the ImageFolder convention. A CoNLL file's sentences become
text items with their entity spans (`services/ingestion/spans.py`); errors name the sentence's first line.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import IO, Any

from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.ingestion import quotas, spans
from services.ingestion.images import MAX_IMAGE_BYTES, InvalidImage, prepare_image
from services.ingestion.ingest import BatchOutcome, Candidate, ingest_batch, text_candidate
from services.ingestion.models import Dataset, Import, Item, new_id
from services.ingestion.schemas import MAX_TEXT_CHARS, ImportLineSchema
from shared import json_input
from shared.artifacts import RAW_BUCKET
from shared.errors import DomainError, PayloadTooLarge, Unprocessable, error_body
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

TASK_NAME = "ingestion.process_import"
BATCH_SIZE = 500
MAX_IMPORT_BYTES = 2 * 1024**3
MAX_RECORDED_ERRORS = 1000
COUNT_CHUNK = 1000  # content hashes looked up per query when an import is counted against a quota
MAX_LINE_BYTES = 30 * 1024 * 1024
ZIP_MAX_ENTRIES = 100_000
ZIP_MAX_TOTAL_BYTES = 8 * 1024**3
ZIP_MAX_RATIO = 200
FORMATS = {
    "application/x-ndjson": "jsonl",
    "application/jsonl": "jsonl",
    "application/jsonlines": "jsonl",
    "application/zip": "zip",
    "application/x-zip-compressed": "zip",
    "text/x-conll": "conll",
    "application/x-conll": "conll",
}
CONLL_SUFFIXES = {".conll", ".bio", ".iob", ".iob2"}


class _LimitedReader(io.RawIOBase):
    """Passes a request stream through, refusing it once it exceeds the import size limit."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self.stream = stream
        self.limit = limit
        self.seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self.stream.read(len(buffer))
        self.seen += len(chunk)
        if self.seen > self.limit:
            raise PayloadTooLarge(f"imports are limited to {self.limit} bytes")
        buffer[: len(chunk)] = chunk
        return len(chunk)


def import_format(content_type: str | None, filename: str | None = None) -> str:
    mime = (content_type or "").split(";")[0].strip().lower()
    if mime in FORMATS:
        return FORMATS[mime]
    suffix = PurePosixPath(filename or "").suffix.lower()
    if suffix in {".jsonl", ".ndjson"}:
        return "jsonl"
    if suffix == ".zip":
        return "zip"
    if suffix in CONLL_SUFFIXES:
        return "conll"
    raise Unprocessable(
        "send a JSONL file (application/x-ndjson), a zip of images (application/zip) or a CoNLL BIO file "
        "(text/x-conll)",
        {"content_type": mime or None},
    )


def create_import(runtime: Runtime, dataset: Dataset, stream: IO[bytes], fmt: str, trace_id: str | None) -> Import:
    if fmt == "zip" and dataset.task_type != "image_classification":
        raise Unprocessable("zip imports are for image datasets; send JSONL to a text dataset")
    if fmt == "conll" and dataset.task_type != "token_classification":
        raise Unprocessable("CoNLL imports are for token_classification datasets; send JSONL to this dataset")
    record = Import(id=new_id("imp"), tenant=dataset.tenant, dataset_id=dataset.id, format=fmt, object_key="", size=0)
    key = f"{dataset.tenant}/{dataset.id}/imports/{record.id}.{fmt}"
    stored = runtime.storage.put(RAW_BUCKET, key, io.BufferedReader(_LimitedReader(stream, MAX_IMPORT_BYTES)))
    if stored.size == 0:
        runtime.storage.delete(RAW_BUCKET, key)
        raise Unprocessable("the uploaded file is empty")
    record.object_key = key
    record.size = stored.size
    record.trace_id = trace_id
    with runtime.db.session() as session:
        session.add(record)
        session.flush()
        runtime.bus.enqueue(session, TASK_NAME, [record.id])
    log.info("import_created", import_id=record.id, dataset_id=dataset.id, format=fmt, bytes=stored.size)
    return record


def register_tasks(runtime: Runtime) -> None:
    @runtime.celery.task(name=TASK_NAME, bind=True, acks_late=True, ignore_result=True, shared=False)
    def process_import(_task: Any, import_id: str) -> str:
        with runtime.db.session() as session:
            record = session.get(Import, import_id)
            trace_id = record.trace_id if record else None
        with log_context(service=runtime.service, trace_id=trace_id, import_id=import_id):
            return run_import(runtime, import_id)


def run_import(runtime: Runtime, import_id: str) -> str:
    with runtime.db.session() as session:
        record = session.get(Import, import_id)
        if record is None:
            log.error("import_missing")
            return "missing"
        if record.status in {"succeeded", "failed"}:
            return record.status
        dataset = session.get(Dataset, record.dataset_id)
        record.status = "running"
    with log_context(tenant=record.tenant, dataset_id=record.dataset_id):
        try:
            with tempfile.TemporaryDirectory(prefix="flywheel-import-") as workdir:
                path = f"{workdir}/upload"
                runtime.storage.download(RAW_BUCKET, record.object_key, path)
                read = {"jsonl": _jsonl_entries, "zip": _zip_entries, "conll": _conll_entries}[record.format]
                if _needs_admission(runtime, record):  # counted, and refused whole or held, before anything is stored
                    items, size = _count(runtime, dataset, read(path, dataset)[1], record.processed)
                    quotas.admit_import(runtime, import_id, items, size)
                _process(runtime, dataset, record, read(path, dataset))
        except DomainError as exc:
            _finish(runtime, import_id, "failed", exc)
            return "failed"
        except Exception as exc:
            log.exception("import_crashed", error=repr(exc))
            crash = DomainError(f"the import stopped on an unexpected error: {exc}", code="internal")
            _finish(runtime, import_id, "failed", crash)
            return "failed"
    _finish(runtime, import_id, "succeeded", None)
    return "succeeded"


def _needs_admission(runtime: Runtime, record: Import) -> bool:
    """Whether the import must be counted and admitted against its tenant's quotas first: it has some, and it
    is not a resumed import (its worker died) that still holds the room it was admitted with."""
    if not quotas.needs_hold(runtime, record.tenant):
        return False
    return record.processed == 0 or not quotas.resume_hold(runtime, record.id)


def _finish(runtime: Runtime, import_id: str, status: str, failure: DomainError | None) -> None:
    """Ends the import and, in the same transaction, releases what it still holds of its tenant's quotas."""
    with runtime.db.session() as session:
        record = session.get(Import, import_id)
        record.status = status
        record.failure = failure.message if failure else None
        record.error = None if failure is None else error_body(failure.code, failure.message, failure.details)["error"]
        record.finished_at = datetime.now(UTC)
        quotas.release_hold(record)
        summary = {"processed": record.processed, "accepted": record.accepted, "rejected": record.rejected}
    log.info("import_finished", status=status, failure=record.failure, **summary)


# An entry is (position, candidate or None, error or None): errors are recorded against their position.
Entry = tuple[int, Candidate | None, str | None]


def _process(
    runtime: Runtime,
    dataset: Dataset,
    record: Import,
    entries: tuple[int, Iterator[Entry]],
) -> None:
    total, stream = entries
    with runtime.db.session() as session:
        session.get(Import, record.id).total = total
        resume_from = session.get(Import, record.id).processed
    batch: list[Candidate] = []
    errors: list[dict[str, Any]] = []
    position = 0
    for position, candidate, error in stream:
        if position <= resume_from:
            continue
        if error is not None:
            errors.append({"line": position, "error": error})
        elif candidate is not None:
            batch.append(candidate)
        if len(batch) + len(errors) >= BATCH_SIZE:
            _commit_batch(runtime, dataset, record.id, batch, errors, position)
            batch, errors = [], []
    if batch or errors or position > resume_from:
        _commit_batch(runtime, dataset, record.id, batch, errors, position)


def _count(runtime: Runtime, dataset: Dataset, stream: Iterator[Entry], resume_from: int) -> tuple[int, int]:
    """What the import would add past `resume_from`: its items and their bytes, an item repeated in the file or
    already in the dataset counted never or once, as the batches will bill them. An item the dataset then
    rejects (a label outside its set) is counted: the figure may be above what is billed, never below."""
    sizes: dict[str, int] = {}
    for position, candidate, _error in stream:
        if position > resume_from and candidate is not None:
            sizes.setdefault(hashlib.sha256(candidate.data).hexdigest(), len(candidate.data))
    digests = list(sizes)
    with runtime.db.read_session() as session:
        for start in range(0, len(digests), COUNT_CHUNK):
            chunk = digests[start : start + COUNT_CHUNK]
            known = select(Item.sha256).where(Item.dataset_id == dataset.id, Item.sha256.in_(chunk))
            for digest in session.scalars(known):
                sizes.pop(digest, None)
    return len(sizes), sum(sizes.values())


def _commit_batch(
    runtime: Runtime,
    dataset: Dataset,
    import_id: str,
    batch: list[Candidate],
    errors: list[dict[str, Any]],
    position: int,
) -> None:
    def advance(session: Session, outcome: BatchOutcome) -> None:
        # metered in this transaction: the meter store and the day's usage count it, the hold no longer
        quotas.spend_hold(session, import_id, outcome.count("accepted"), outcome.accepted_bytes)
        record = session.get(Import, import_id)
        rejected = [{"line": r["index"], "error": r["reason"]} for r in outcome.results if r["status"] == "rejected"]
        record.processed = position
        record.accepted += outcome.count("accepted")
        record.duplicates += outcome.count("duplicate")
        record.rejected += outcome.count("rejected") + len(errors)
        room = MAX_RECORDED_ERRORS - len(record.errors)
        if room > 0:
            record.errors = [*record.errors, *sorted(errors + rejected, key=lambda e: e["line"])[:room]]
        log.info("import_progress", processed=position, total=record.total, accepted=record.accepted)

    ingest_batch(runtime, dataset, batch, in_transaction=advance, importing=import_id)


def _jsonl_entries(path: str, dataset: Dataset) -> tuple[int, Iterator[Entry]]:
    with open(path, "rb") as handle:
        total = sum(1 for _ in handle)
    schema = ImportLineSchema()
    expected = "image" if dataset.task_type == "image_classification" else "text"

    def entries() -> Iterator[Entry]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                if len(raw) > MAX_LINE_BYTES:
                    yield number, None, f"line is longer than {MAX_LINE_BYTES} bytes"
                    continue
                if not raw.strip():
                    yield number, None, "empty line"
                    continue
                try:
                    data = schema.load(json_input.loads(raw.decode("utf-8")))
                except UnicodeDecodeError:
                    yield number, None, "line is not valid UTF-8"
                    continue
                except json.JSONDecodeError as exc:
                    yield number, None, f"invalid JSON: {exc.msg} at column {exc.colno}"
                    continue
                except ValidationError as exc:
                    yield number, None, f"invalid item: {json.dumps(exc.normalized_messages(), sort_keys=True)}"
                    continue
                if expected not in data:
                    yield number, None, f"this dataset takes {expected} items"
                    continue
                try:
                    yield number, _line_candidate(number, data, dataset), None
                except InvalidImage as exc:
                    yield number, None, f"invalid image: {exc}"

    return total, entries()


def _line_candidate(number: int, data: dict[str, Any], dataset: Dataset) -> Candidate | None:
    if "text" in data:
        return text_candidate(
            number,
            data["text"],
            pii_policy=dataset.pii_policy,
            pii_entities=dataset.pii_entities,
            label=data.get("label"),
            metadata=data["metadata"],
            entity_spans=data.get("spans"),
            subject_id=data.get("subject_id"),
        )
    candidate = _image_candidate(number, data["image"], data.get("label"), data["metadata"])
    candidate.subject_id = data.get("subject_id")
    return candidate


def _image_candidate(number: int, raw: bytes, label: str | None, metadata: dict[str, Any]) -> Candidate:
    info, stored, stripped = prepare_image(raw)  # metadata (EXIF, GPS...) removed before anything is stored
    return Candidate(
        index=number,
        kind="image",
        data=stored,
        content_type=info.content_type,
        label=label,
        metadata=metadata,
        redactions=stripped,
    )


def _zip_entries(path: str, dataset: Dataset) -> tuple[int, Iterator[Entry]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise Unprocessable("the upload is not a valid zip file") from exc
    members = [info for info in archive.infolist() if not info.is_dir()]
    if len(members) > ZIP_MAX_ENTRIES:
        raise Unprocessable(f"the zip holds {len(members)} files; the limit is {ZIP_MAX_ENTRIES}")
    total_size = sum(info.file_size for info in members)
    if total_size > ZIP_MAX_TOTAL_BYTES:
        raise Unprocessable(f"the zip expands to {total_size} bytes; the limit is {ZIP_MAX_TOTAL_BYTES}")
    for info in members:
        if info.compress_size and info.file_size / info.compress_size > ZIP_MAX_RATIO:
            raise Unprocessable(
                f"{info.filename!r} expands {info.file_size // max(info.compress_size, 1)}x: refused as a zip bomb"
            )

    def entries() -> Iterator[Entry]:
        with archive:
            for number, info in enumerate(members, start=1):
                name = info.filename
                parts = PurePosixPath(name).parts
                if name.startswith(("/", "\\")) or ".." in parts or "\\" in name or ":" in (parts[0] if parts else ""):
                    yield number, None, f"{name!r}: unsafe path refused"
                    continue
                if any(part.startswith(".") or part == "__MACOSX" for part in parts):
                    yield number, None, f"{name!r}: hidden or system file skipped"
                    continue
                if info.file_size > MAX_IMAGE_BYTES:
                    yield number, None, f"{name!r}: {info.file_size} bytes; the limit is {MAX_IMAGE_BYTES}"
                    continue
                label = parts[0] if len(parts) > 1 else None
                try:
                    with archive.open(info) as member:
                        raw = member.read(MAX_IMAGE_BYTES + 1)
                    candidate = _image_candidate(number, raw, label, {"filename": name})
                except InvalidImage as exc:
                    yield number, None, f"{name!r}: {exc}"
                    continue
                except (zipfile.BadZipFile, OSError) as exc:
                    yield number, None, f"{name!r}: unreadable zip entry ({exc})"
                    continue
                yield number, candidate, None

    return len(members), entries()


def _conll_entries(path: str, dataset: Dataset) -> tuple[int, Iterator[Entry]]:
    """One entry per sentence, numbered by the file line it starts on (resuming skips sentences before it)."""

    def lines() -> Iterator[tuple[int, str]]:
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    yield number, raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise Unprocessable(f"line {number} of the CoNLL file is not valid UTF-8") from exc

    total = sum(1 for _ in spans.conll_sentences(lines()))

    def entries() -> Iterator[Entry]:
        for sentence in spans.conll_sentences(lines()):
            if isinstance(sentence, spans.ConllError):
                yield sentence.line, None, str(sentence)
                continue
            problems = spans.span_errors(sentence.text, sentence.spans)
            if len(sentence.text) > MAX_TEXT_CHARS or problems:
                reason = f"longer than {MAX_TEXT_CHARS} characters" if not problems else json.dumps(problems)
                yield sentence.line, None, f"sentence at line {sentence.line}: {reason}"
                continue
            yield (
                sentence.line,
                text_candidate(
                    sentence.line,
                    sentence.text,
                    pii_policy=dataset.pii_policy,
                    pii_entities=dataset.pii_entities,
                    label=None,
                    metadata={},
                    entity_spans=sentence.spans,
                ),
                None,
            )

    return total, entries()
