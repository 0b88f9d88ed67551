"""The storage contract, run unchanged against both backends: S3 (moto over real HTTP) and local files."""

from __future__ import annotations

import hashlib
import io
import os
import socket
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from shared.storage import (
    CHUNK_SIZE,
    SPOOL_MAX_SIZE,
    ChecksumMismatch,
    FileStore,
    ObjectNotFound,
    ObjectStore,
    S3Store,
    StorageError,
    create_store,
    open_store,
    sha256_stream,
)
from testkit.s3 import S3Server


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


def _s3_store(server: S3Server) -> ObjectStore:
    return create_store(
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key,
        s3_secure=False,
        s3_region="us-east-1",
        file_root=Path("/nonexistent-unused"),
    )


@pytest.fixture(scope="module", params=["s3", "file"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ObjectStore:
    if request.param == "s3":
        return _s3_store(request.getfixturevalue("moto_s3"))
    return create_store(
        s3_endpoint=None,
        s3_access_key="",
        s3_secret_key="",
        s3_secure=False,
        s3_region="us-east-1",
        file_root=tmp_path_factory.mktemp("objects"),
    )


@pytest.fixture
def bucket(store: ObjectStore) -> str:
    """A fresh bucket per test, so tests never see each other's objects."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    store.ensure_buckets(name)
    return name


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _tamper(store: ObjectStore, bucket: str, key: str, body: bytes) -> None:
    """Change the stored bytes behind the store's back, keeping the recorded sha256."""
    if isinstance(store, FileStore):
        store.path_for(bucket, key).write_bytes(body)
        return
    assert isinstance(store, S3Store)
    old = store.stat(bucket, key)
    store.client.put_object(bucket, key, io.BytesIO(body), len(body), metadata={"sha256": old.sha256})


class ChunkCheckingReader(io.RawIOBase):
    """A file-like that refuses whole-stream reads, proving put() streams in bounded chunks."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self.largest_read = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        assert size is not None and 0 < size <= CHUNK_SIZE, f"unbounded read({size})"
        self.largest_read = max(self.largest_read, size)
        chunk = bytes(self._data[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk


# ---------------------------------------------------------------------------------------- round trips


def test_put_bytes_round_trip(store: ObjectStore, bucket: str) -> None:
    data = b"hello flywheel"
    info = store.put(bucket, "greetings/hello.txt", data, content_type="text/plain")

    assert (info.bucket, info.key, info.size, info.sha256) == (bucket, "greetings/hello.txt", len(data), _sha(data))
    assert info.content_type == "text/plain"
    assert store.get_bytes(bucket, "greetings/hello.txt") == data
    with store.open(bucket, "greetings/hello.txt") as stream:
        assert stream.read() == data


def test_put_stream_larger_than_spool_round_trip(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    data = os.urandom(SPOOL_MAX_SIZE + CHUNK_SIZE + 12345)
    reader = ChunkCheckingReader(data)

    info = store.put(bucket, "big/blob.bin", reader)  # type: ignore[arg-type]

    assert 0 < reader.largest_read <= CHUNK_SIZE
    assert info.size == len(data)
    assert info.sha256 == _sha(data)
    assert store.stat(bucket, "big/blob.bin").sha256 == _sha(data)

    with store.open(bucket, "big/blob.bin") as stream:
        assert hashlib.file_digest(stream, "sha256").hexdigest() == _sha(data)

    target = tmp_path / "out" / "blob.bin"
    downloaded = store.download(bucket, "big/blob.bin", target)
    assert downloaded.sha256 == _sha(data)
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin"]  # no temp file left behind


def test_sha256_stream_hashes_counts_and_copies_in_one_bounded_pass() -> None:
    data = os.urandom(3 * CHUNK_SIZE + 12345)
    reader = ChunkCheckingReader(data)
    copy = io.BytesIO()

    assert sha256_stream(reader, copy) == (_sha(data), len(data))  # type: ignore[arg-type]
    assert copy.getvalue() == data
    assert 0 < reader.largest_read <= CHUNK_SIZE
    assert sha256_stream(io.BytesIO(b"")) == (_sha(b""), 0)


def test_put_refuses_a_text_stream(store: ObjectStore, bucket: str) -> None:
    with pytest.raises(TypeError):
        store.put(bucket, "text", io.StringIO("not bytes"))  # type: ignore[arg-type]
    assert not store.exists(bucket, "text")


def test_overwrite_replaces_bytes_and_sha(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "k", b"one")
    info = store.put(bucket, "k", io.BytesIO(b"two, longer"))
    assert info.sha256 == _sha(b"two, longer")
    assert store.get_bytes(bucket, "k") == b"two, longer"
    assert store.stat(bucket, "k").sha256 == _sha(b"two, longer")


def test_expected_sha256_accepted_when_it_matches(store: ObjectStore, bucket: str) -> None:
    data = b"checked"
    info = store.put(bucket, "ok", io.BytesIO(data), expected_sha256=_sha(data).upper())
    assert info.sha256 == _sha(data)


@pytest.mark.parametrize("as_stream", [False, True])
def test_expected_sha256_mismatch_stores_nothing(store: ObjectStore, bucket: str, as_stream: bool) -> None:
    data = b"payload"
    with pytest.raises(ChecksumMismatch) as caught:
        store.put(bucket, "bad", io.BytesIO(data) if as_stream else data, expected_sha256=_sha(b"other"))

    assert caught.value.actual == _sha(data)
    assert caught.value.expected == _sha(b"other")
    assert not store.exists(bucket, "bad")
    assert list(store.list(bucket)) == []
    if isinstance(store, FileStore):  # no temp files left in the bucket or the sidecar tree
        for tree in (store.root / bucket, store.root / ".meta" / bucket):
            assert [p for p in tree.rglob("*") if p.is_file()] == []


def test_put_rejects_malformed_expected_sha256(store: ObjectStore, bucket: str) -> None:
    with pytest.raises(ValueError):
        store.put(bucket, "k", b"x", expected_sha256="not-a-digest")


# ------------------------------------------------------------------------------------- stat / exists


def test_stat_and_exists(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "models/m.onnx", b"\x00" * 100, content_type="application/onnx")

    info = store.stat(bucket, "models/m.onnx")
    assert info.size == 100
    assert info.sha256 == _sha(b"\x00" * 100)
    assert info.content_type == "application/onnx"
    assert isinstance(info.last_modified, datetime)
    assert info.last_modified.tzinfo is not None

    assert store.exists(bucket, "models/m.onnx")
    assert not store.exists(bucket, "models/other.onnx")
    assert not store.exists(bucket, "models")  # a prefix is not an object
    assert not store.exists(f"missing-{uuid.uuid4().hex[:12]}", "models/m.onnx")


# --------------------------------------------------------------------------------------------- list


def test_list_is_recursive_sorted_and_prefix_filtered(store: ObjectStore, bucket: str) -> None:
    keys = ["b/1", "a/b/3", "ab", "a/1", "a/b/2", "a/.hidden"]
    for key in keys:
        store.put(bucket, key, key.encode())

    everything = list(store.list(bucket))
    assert [o.key for o in everything] == sorted(keys)
    assert all(o.sha256 == _sha(o.key.encode()) and o.size == len(o.key) for o in everything)
    assert all(o.bucket == bucket for o in everything)

    assert [o.key for o in store.list(bucket, prefix="a/")] == ["a/.hidden", "a/1", "a/b/2", "a/b/3"]
    assert [o.key for o in store.list(bucket, prefix="a")] == ["a/.hidden", "a/1", "a/b/2", "a/b/3", "ab"]
    assert [o.key for o in store.list(bucket, prefix="a/b")] == ["a/b/2", "a/b/3"]
    assert list(store.list(bucket, prefix="zzz/")) == []


def test_list_never_shows_sidecar_metadata(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "x/y.bin", b"y")
    store.put(bucket, "x/y.bin.json", b"a key that looks like a sidecar")
    assert [o.key for o in store.list(bucket)] == ["x/y.bin", "x/y.bin.json"]
    if isinstance(store, FileStore):
        sidecars = list((store.root / ".meta" / bucket).rglob("*.json"))
        assert len(sidecars) == 2  # they exist, just not in listings


def test_list_missing_bucket_raises_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        list(store.list(f"missing-{uuid.uuid4().hex[:12]}"))


# ---------------------------------------------------------------------------------------- not found


@pytest.mark.parametrize("operation", ["get_bytes", "open", "stat", "url", "download"])
def test_missing_key_raises_object_not_found(store: ObjectStore, bucket: str, tmp_path: Path, operation: str) -> None:
    target = tmp_path / "never.bin"
    calls = {
        "get_bytes": lambda b: store.get_bytes(b, "no/such/key"),
        "open": lambda b: store.open(b, "no/such/key").__enter__(),
        "stat": lambda b: store.stat(b, "no/such/key"),
        "url": lambda b: store.url(b, "no/such/key"),
        "download": lambda b: store.download(b, "no/such/key", target),
    }
    for name in (bucket, f"missing-{uuid.uuid4().hex[:12]}"):
        with pytest.raises(ObjectNotFound) as caught:
            calls[operation](name)
        assert (caught.value.bucket, caught.value.key) == (name, "no/such/key")
        assert name in str(caught.value)
    assert not target.exists()


def test_missing_bucket_on_put_raises_object_not_found(store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.put(f"missing-{uuid.uuid4().hex[:12]}", "k", b"x")


# ------------------------------------------------------------------------------------------- delete


def test_delete_is_idempotent(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "d/k", b"x")
    store.delete(bucket, "d/k")
    assert not store.exists(bucket, "d/k")
    store.delete(bucket, "d/k")
    store.delete(bucket, "never/existed")
    assert list(store.list(bucket)) == []


def test_delete_frees_a_prefix_for_reuse_as_a_key(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "run/1/weights", b"w")
    store.delete(bucket, "run/1/weights")
    store.put(bucket, "run/1", b"now a key")
    assert store.get_bytes(bucket, "run/1") == b"now a key"


# ---------------------------------------------------------------------------------------- integrity


def test_download_detects_tampering(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    original = b"genuine artifact bytes"
    store.put(bucket, "art/model.bin", original)
    _tamper(store, bucket, "art/model.bin", b"forged artifact bytes!")  # same length, different bytes

    target = tmp_path / "model.bin"
    with pytest.raises(ChecksumMismatch) as caught:
        store.download(bucket, "art/model.bin", target)
    assert caught.value.expected == _sha(original)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ChecksumMismatch):
        store.get_bytes(bucket, "art/model.bin")

    info = store.download(bucket, "art/model.bin", target, verify=False)
    assert target.read_bytes() == b"forged artifact bytes!"
    assert info.sha256 == _sha(original)


def test_download_overwrites_existing_file(store: ObjectStore, bucket: str, tmp_path: Path) -> None:
    store.put(bucket, "k", b"fresh")
    target = tmp_path / "k"
    target.write_bytes(b"stale content")
    store.download(bucket, "k", target)
    assert target.read_bytes() == b"fresh"


# ---------------------------------------------------------------------------------------------- url


def test_url_fetches_the_object(store: ObjectStore, bucket: str) -> None:
    data = os.urandom(4096)
    store.put(bucket, "share/data.bin", data)

    url = store.url(bucket, "share/data.bin")
    assert url.startswith("http://" if isinstance(store, S3Store) else "file://")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http(s) or file URL we made
        assert response.read() == data


# -------------------------------------------------------------------------------------- validation


BAD_KEYS = ["", "/abs", "a/../b", "..", "../escape", "a/./b", ".", "a//b", "trailing/", "nul\x00byte", "x" * 1025]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_invalid_keys_raise_value_error(store: ObjectStore, bucket: str, tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        store.put(bucket, key, b"x")
    with pytest.raises(ValueError):
        store.get_bytes(bucket, key)
    with pytest.raises(ValueError):
        store.stat(bucket, key)
    with pytest.raises(ValueError):
        store.exists(bucket, key)
    with pytest.raises(ValueError):
        store.delete(bucket, key)
    with pytest.raises(ValueError):
        store.url(bucket, key)
    with pytest.raises(ValueError):
        store.download(bucket, key, tmp_path / "out")


@pytest.mark.parametrize("name", ["", "ab", "Upper", "under_score", "-dash", "a" * 64, "10.0.0.1", "a..b"])
def test_invalid_bucket_names_raise_value_error(store: ObjectStore, name: str) -> None:
    with pytest.raises(ValueError):
        store.ensure_buckets(name)
    with pytest.raises(ValueError):
        store.put(name, "k", b"x")


def test_file_backend_never_escapes_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = FileStore(root)
    store.ensure_buckets("inside")
    for key in ("../outside", "a/../../outside", "/etc/passwd"):
        with pytest.raises(ValueError):
            store.put("inside", key, b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


# ----------------------------------------------------------------------------------- buckets / ping


def test_ensure_buckets_is_idempotent(store: ObjectStore) -> None:
    names = [f"e-{uuid.uuid4().hex[:12]}", f"e-{uuid.uuid4().hex[:12]}"]
    store.ensure_buckets(*names)
    store.put(names[0], "k", b"kept")
    store.ensure_buckets(*names)
    store.ensure_buckets(names[0])
    assert store.get_bytes(names[0], "k") == b"kept"
    assert list(store.list(names[1])) == []


def test_ping_succeeds_when_reachable(store: ObjectStore) -> None:
    store.ping()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ping_fails_fast_on_a_closed_port() -> None:
    port = _closed_port()
    store = create_store(
        s3_endpoint=f"127.0.0.1:{port}",
        s3_access_key="k",
        s3_secret_key="s",
        s3_secure=False,
        s3_region="us-east-1",
        file_root=Path("/unused"),
    )
    started = time.monotonic()
    with pytest.raises(StorageError, match=f"127.0.0.1:{port}"):
        store.ping()
    assert time.monotonic() - started < 10


def test_operations_fail_fast_with_storage_error_when_unreachable() -> None:
    store = S3Store(f"127.0.0.1:{_closed_port()}", "k", "s")
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        store.put("bucket", "k", b"x")
    assert not isinstance(caught.value, ObjectNotFound)
    assert time.monotonic() - started < 10


def test_an_unreadable_error_answer_is_a_storage_error() -> None:
    """An endpoint whose XML error body does not parse (moto once echoed a control character in a key) is a
    storage failure the API can answer 503 for, not a parse error that escapes as a 500."""
    import http.server
    import threading

    class Garbled(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'<?xml version="1.0"?>\n<Error><Key>a\x01b</Key></Error>'
            self.send_response(404)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbled)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        store = S3Store(f"127.0.0.1:{server.server_address[1]}", "k", "s")
        with pytest.raises(StorageError, match="unreadable answer"):
            store.get_bytes("bucket", "key")
    finally:
        server.shutdown()
        server.server_close()


def test_file_ping_fails_when_root_is_missing(tmp_path: Path) -> None:
    with pytest.raises(StorageError):
        FileStore(tmp_path / "absent").ping()


# ---------------------------------------------------------------------------------------- factories


def test_create_store_accepts_host_port_or_url(moto_s3: S3Server, tmp_path: Path) -> None:
    common = {
        "s3_access_key": moto_s3.access_key,
        "s3_secret_key": moto_s3.secret_key,
        "s3_secure": False,
        "s3_region": "us-east-1",
        "file_root": tmp_path,
    }
    for endpoint in (moto_s3.endpoint, f"http://{moto_s3.endpoint}", f"http://{moto_s3.endpoint}/"):
        store = create_store(s3_endpoint=endpoint, **common)  # type: ignore[arg-type]
        assert isinstance(store, S3Store)
        assert store.describe == f"s3://{moto_s3.endpoint}"
        store.ping()

    local = create_store(s3_endpoint=None, **common)  # type: ignore[arg-type]
    assert isinstance(local, FileStore)
    assert local.describe == tmp_path.resolve().as_uri()

    with pytest.raises(ValueError):
        create_store(s3_endpoint=f"ftp://{moto_s3.endpoint}", **common)  # type: ignore[arg-type]


def test_open_store_from_url(moto_s3: S3Server, tmp_path: Path) -> None:
    s3 = open_store(f"s3://{moto_s3.endpoint}", access_key=moto_s3.access_key, secret_key=moto_s3.secret_key)
    assert isinstance(s3, S3Store)
    s3.ping()

    local = open_store(tmp_path.as_uri())
    assert isinstance(local, FileStore)
    assert local.root == tmp_path.resolve()


def test_get_range_reads_one_item_of_a_packed_object(store: ObjectStore, bucket: str) -> None:
    store.put(bucket, "packed/one.bin", b"alpha|beta|gamma")
    assert store.get_range(bucket, "packed/one.bin", 6, 4) == b"beta"
    assert store.get_range(bucket, "packed/one.bin", 0, 5) == b"alpha"
    assert store.get_range(bucket, "packed/one.bin", 11, 5) == b"gamma"
    with pytest.raises(ObjectNotFound):
        store.get_range(bucket, "packed/missing.bin", 0, 1)
