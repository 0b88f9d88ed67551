"""Fetching one model version's folder from object storage and proving it is exactly what was registered.

Every file is read from storage once before anything parses it: `ObjectStore.download` hashes the bytes while
they stream to disk and checks them against the sha256 recorded with the object, and the digest it returns is
compared with the sha256 (and size) the registry's serving document names. `metadata.json`'s own `files` map is
checked too, and every file the model needs (the graph, the tokenizer files) must be among the verified
artifacts. Anything else refuses the version.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from marshmallow import ValidationError

from shared.artifacts import ModelMetadata
from shared.entities import DECODING_RULE, tag_set
from shared.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

GRAPH_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
ENTITY_TASK = "token_classification"
PREPROCESSING_KIND = {"text_classification": "text", "image_classification": "image", ENTITY_TASK: "text"}
_metadata_schema = ModelMetadata()


class ArtifactRefused(Exception):
    """The version's files are missing, tampered with or inconsistent: it is never loaded."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ModelFiles:
    folder: Path
    metadata: dict[str, Any]

    @property
    def graph(self) -> Path:
        return self.folder / GRAPH_FILE


def fingerprint(version_doc: dict[str, Any]) -> str:
    """Identity of a version's content: a version whose artifacts change is loaded again."""
    parts = sorted(f"{name}={ref['sha256']}" for name, ref in version_doc["artifacts"].items())
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def fetch_version(storage: ObjectStore, version_doc: dict[str, Any], folder: Path) -> ModelFiles:
    """Download and verify every artifact of a version into `folder`; raise ArtifactRefused on any doubt.

    Storage that does not answer raises StorageError (a transient failure, retried later), not ArtifactRefused.
    """
    artifacts: dict[str, dict[str, Any]] = version_doc["artifacts"]
    for required in (GRAPH_FILE, METADATA_FILE):
        if required not in artifacts:
            raise ArtifactRefused("missing_artifact", f"the version has no {required}")
    for name, ref in artifacts.items():
        if "/" in name or name in ("", ".", "..") or name.startswith("."):
            raise ArtifactRefused("invalid_artifact", f"artifact name {name!r} is not a plain file name")
        try:
            received = storage.download(ref["bucket"], ref["key"], folder / name)
        except ObjectNotFound as exc:
            raise ArtifactRefused("missing_artifact", f"{name} is missing from object storage: {exc}") from exc
        except ChecksumMismatch as exc:
            raise ArtifactRefused("integrity", f"{name} failed its storage integrity check: {exc}") from exc
        if received.sha256 != ref["sha256"]:
            raise ArtifactRefused(
                "integrity", f"{name} hashes to sha256 {received.sha256}, but the registry recorded {ref['sha256']}"
            )
        if ref.get("size") is not None and received.size != ref["size"]:
            raise ArtifactRefused(
                "integrity", f"{name} is {received.size} bytes, but the registry recorded {ref['size']}"
            )
    metadata = _read_metadata(folder / METADATA_FILE)
    _check_metadata_files(metadata, artifacts)
    return ModelFiles(folder=folder, metadata=metadata)


def _read_metadata(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        metadata = _metadata_schema.load(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactRefused("invalid_metadata", f"metadata.json is not valid JSON: {exc}") from exc
    except ValidationError as exc:
        raise ArtifactRefused(
            "invalid_metadata", f"metadata.json does not validate: {exc.normalized_messages()}"
        ) from exc
    preprocessing = metadata["preprocessing"]
    kind = preprocessing.get("kind")
    expected_kind = PREPROCESSING_KIND[metadata["task_type"]]
    if kind != expected_kind:
        raise ArtifactRefused(
            "invalid_metadata", f"a {metadata['task_type']} model needs {expected_kind} preprocessing"
        )
    if metadata["task_type"] == ENTITY_TASK:
        return _token_metadata(metadata, raw)
    if len(metadata["labels"]) < 2 or len(set(metadata["labels"])) != len(metadata["labels"]):
        raise ArtifactRefused("invalid_metadata", "metadata.json needs at least two distinct labels")
    return metadata


def _token_metadata(metadata: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    """A token-classification package adds its tag set (the logits' order) and decoding rule, which serving
    needs and `ModelMetadata` does not keep: they must be the IOB2 tags over the labels and the rule inference
    implements (`shared.entities`)."""
    labels = metadata["labels"]
    if not labels or len(set(labels)) != len(labels):
        raise ArtifactRefused("invalid_metadata", "metadata.json needs at least one entity label, each once")
    if raw.get("tags") != tag_set(labels):
        raise ArtifactRefused("invalid_metadata", "metadata.json's tags are not the IOB2 tags over its labels")
    if raw.get("decoding") != DECODING_RULE:
        raise ArtifactRefused("invalid_metadata", "metadata.json names a decoding rule this server does not apply")
    if metadata["preprocessing"].get("offsets", "unicode_code_points") != "unicode_code_points":
        raise ArtifactRefused("invalid_metadata", "entity offsets must be Unicode code points")
    return {**metadata, "tags": list(raw["tags"]), "decoding": raw["decoding"]}


def _check_metadata_files(metadata: dict[str, Any], artifacts: dict[str, dict[str, Any]]) -> None:
    """metadata.json's `files` map agrees with the artifacts, and names every file serving needs."""
    for name, info in metadata["files"].items():
        if name not in artifacts:
            continue
        expected = info.get("sha256") if isinstance(info, dict) else None
        if expected and expected != artifacts[name]["sha256"]:
            raise ArtifactRefused(
                "integrity", f"metadata.json records sha256 {expected} for {name}, the registry another"
            )
    needed = [GRAPH_FILE, *metadata["preprocessing"].get("tokenizer_files", [])]
    missing = [name for name in needed if name not in artifacts]
    if missing:
        raise ArtifactRefused("missing_artifact", f"files the model needs are not among its artifacts: {missing}")
    if GRAPH_FILE not in metadata["files"]:
        raise ArtifactRefused("invalid_metadata", "metadata.json's files map does not list model.onnx")
