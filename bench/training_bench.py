"""Training benchmark: `python -m bench.training_bench` (results in bench/results/training.json).

1. Trainer overhead: samples/s of the service's `Trainer.fit` against a bare, hand-written PyTorch loop doing
   the same math (AdamW, class-weighted loss, clipping, warm-up + cosine) on the same model, data, batches
   and per-epoch evaluation; a minimal loop (AdamW + cross-entropy only) shows what the recipe itself costs.
   All are timed from outside, interleaved, and the median of several repetitions is kept. Goal: <= 5%.
2. Inference: ONNX Runtime (CPU execution provider here) against torch eager on the exported graphs of the
   text model (MiniLM + head) and the image models, at batch 1 and 32.

Every ratio is against a baseline measured in the same run, on the same machine, at the same time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bench.common import Stats
from services.training.base_models import IMAGE_ARCHITECTURES
from services.training.export import export_onnx, onnx_session
from services.training.image_model import ImageClassifier, ImageItems, collate_images, eval_transform
from services.training.spec import ExportSpec
from services.training.text_model import INPUT_NAMES, TextClassifier, TextCollator, TextItems, load_encoder
from services.training.trainer import Recipe, Trainer, balanced_class_weights, predict, seed_everything
from shared.tables import render

RESULTS = Path(__file__).parent / "results" / "training.json"


# ------------------------------------------------------------------------------------------------- data


def digit_images(count: int) -> tuple[list[Any], list[int]]:
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = [
        Image.fromarray((image * (255.0 / 16.0)).astype("uint8"), mode="L").convert("RGB")
        for image in bunch.images[:count]
    ]
    return images, [int(t) for t in bunch.target[:count]]


def docstring_texts(count: int) -> tuple[list[str], list[int]]:
    """First lines of numpy's docstrings: real sentences of realistic length (labels do not matter here)."""
    texts = []
    for name in sorted(dir(np)):
        doc = getattr(getattr(np, name), "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            texts.append(doc.strip().splitlines()[0][:300])
    texts = (texts * (count // max(len(texts), 1) + 1))[:count]
    return texts, [i % 3 for i in range(count)]


# ------------------------------------------------------------------------------------- trainer overhead


def recipe(epochs: int, batch_size: int, counts: list[int]) -> Recipe:
    return Recipe(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=5e-5,
        head_learning_rate=1e-3,
        weight_decay=0.01,
        warmup_ratio=0.1,
        max_grad_norm=1.0,
        early_stopping_patience=0,
        seed=0,
        class_weights=balanced_class_weights(counts),
        num_workers=0,
    )


def bare_loop(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    collate: Callable,
    epochs: int,
    batch_size: int,
    counts: list[int] | None = None,
) -> tuple[float, float]:
    """A hand-written loop; returns (wall, CPU) seconds, including the same per-epoch evaluation.

    Without `counts` it is the minimal loop (AdamW + cross-entropy). With them it does the recipe's math by
    hand too (class-weighted loss, gradient clipping, warm-up + cosine schedule): what the Trainer adds on top
    of that is its own machinery (hooks, interruption checks, progress, early-stopping bookkeeping, metrics).
    """
    seed_everything(0)
    loader = DataLoader(train, batch_size=batch_size, shuffle=True, collate_fn=collate)
    val_loader = DataLoader(val, batch_size=batch_size, collate_fn=collate)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, weight_decay=0.01)
    weights = torch.tensor(balanced_class_weights(counts), dtype=torch.float32) if counts else None
    total = epochs * len(loader)
    warmup = max(1, int(0.1 * total))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor) if counts else None
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(epochs):
        model.train()
        for batch in loader:
            labels = batch.pop("labels")
            loss = nn.functional.cross_entropy(model(**batch), labels, weight=weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if counts:
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
        predict(model, val_loader, torch.device("cpu"))
    return time.perf_counter() - started, time.process_time() - cpu


def trainer_loop(
    model: nn.Module,
    train: Dataset,
    val: Dataset,
    collate: Callable,
    epochs: int,
    batch_size: int,
    counts: list[int],
) -> tuple[float, float]:
    trainer = Trainer(model, train, val, collate, recipe(epochs, batch_size, counts), device=torch.device("cpu"))
    started, cpu = time.perf_counter(), time.process_time()
    trainer.fit()
    return time.perf_counter() - started, time.process_time() - cpu


def overhead(
    name_of_workload: str,
    build: Callable[[], nn.Module],
    train: Dataset,
    val: Dataset,
    collate: Callable,
    *,
    epochs: int,
    batch_size: int,
    repeats: int,
) -> dict[str, Any]:
    counts = np.bincount([train[i][1] for i in range(len(train))]).tolist()
    samples = len(train) * epochs
    bare_loop(build(), train, val, collate, 1, batch_size)  # warm-up: allocator, kernels, caches
    loops = {
        "minimal": lambda: bare_loop(build(), train, val, collate, epochs, batch_size),
        "recipe": lambda: bare_loop(build(), train, val, collate, epochs, batch_size, counts),
        "trainer": lambda: trainer_loop(build(), train, val, collate, epochs, batch_size, counts),
    }
    wall: dict[str, list[float]] = {name: [] for name in loops}
    cpu: dict[str, list[float]] = {name: [] for name in loops}
    order = list(loops)
    for repeat in range(repeats):  # interleaved and rotated, so load from elsewhere hits all three alike
        for name in order[repeat % 3 :] + order[: repeat % 3]:
            torch.manual_seed(0)
            seconds, cpu_seconds = loops[name]()
            wall[name].append(seconds)
            cpu[name].append(cpu_seconds)
    rate = {name: samples / statistics.median(values) for name, values in wall.items()}
    cpu_rate = {name: samples / statistics.median(values) for name, values in cpu.items()}
    noisy = sorted(name for name, values in wall.items() if Stats.of(values).noisy)
    return {
        "workload": name_of_workload,
        "train_items": len(train),
        "epochs": epochs,
        "batch_size": batch_size,
        "repeats": repeats,
        "minimal_loop_samples_per_second": round(rate["minimal"], 2),
        "bare_loop_samples_per_second": round(rate["recipe"], 2),
        "trainer_samples_per_second": round(rate["trainer"], 2),
        "trainer_vs_bare": round(rate["trainer"] / rate["recipe"], 4),
        "overhead_percent": round(100 * (1 - rate["trainer"] / rate["recipe"]), 2),
        "trainer_vs_minimal": round(rate["trainer"] / rate["minimal"], 4),
        "cpu_trainer_vs_bare": round(cpu_rate["trainer"] / cpu_rate["recipe"], 4),
        "cpu_overhead_percent": round(100 * (1 - cpu_rate["trainer"] / cpu_rate["recipe"]), 2),
        "noisy": ", ".join(noisy) or "-",
        "wall_seconds": {name: [round(v, 3) for v in values] for name, values in wall.items()},
        "cpu_seconds": {name: [round(v, 3) for v in values] for name, values in cpu.items()},
    }


# -------------------------------------------------------------------------------------------- inference


def latency(run: Callable[[], Any], repeats: int) -> float:
    for _ in range(3):
        run()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings)


def inference(
    name: str, model: nn.Module, make_batch: Callable[[int], dict[str, torch.Tensor]], spec: ExportSpec, repeats: int
) -> list[dict[str, Any]]:
    """Median latency per batch; ONNX Runtime gets as many intra-op threads as torch has."""
    model = model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(model, make_batch(2), path, spec)
        session = onnx_session(path, threads=torch.get_num_threads())
        for batch_size in (1, 32):
            batch = make_batch(batch_size)
            feeds = {k: v.numpy() for k, v in batch.items()}

            def eager(batch: dict[str, torch.Tensor] = batch) -> Any:
                with torch.inference_mode():
                    return model(**batch)

            torch_s = latency(eager, repeats)
            onnx_s = latency(lambda feeds=feeds: session.run(["logits"], feeds), repeats)
            rows.append(
                {
                    "model": name,
                    "batch": batch_size,
                    "torch_ms": round(torch_s * 1000, 3),
                    "onnxruntime_ms": round(onnx_s * 1000, 3),
                    "torch_samples_per_second": round(batch_size / torch_s, 1),
                    "onnxruntime_samples_per_second": round(batch_size / onnx_s, 1),
                    "onnxruntime_speedup": round(torch_s / onnx_s, 3),
                }
            )
    return rows


# ----------------------------------------------------------------------------------------------- report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per trainer workload")
    parser.add_argument("--quick", action="store_true", help="smaller workloads (a smoke run)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1: the steadiest timing; 0: torch's)"
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = 4 if args.quick else 1
    load_before = os.getloadavg()
    started = time.time()

    encoder, tokenizer = load_encoder("all-minilm-l6-v2")
    encoder_state = {k: v.clone() for k, v in encoder.state_dict().items()}

    def text_model(num_labels: int = 3) -> nn.Module:
        encoder.load_state_dict(encoder_state)
        return TextClassifier(encoder, num_labels, dropout=0.1, freeze_encoder=False)

    texts, text_labels = docstring_texts(320 // scale)
    text_train = TextItems(texts[: 256 // scale], text_labels[: 256 // scale])
    text_val = TextItems(texts[256 // scale :], text_labels[256 // scale :])
    images, digits = digit_images(320 // scale)
    transform = eval_transform(32)
    image_train = ImageItems(images[: 256 // scale], digits[: 256 // scale], transform)
    image_val = ImageItems(images[256 // scale :], digits[256 // scale :], transform)

    def resnet() -> nn.Module:
        return ImageClassifier(IMAGE_ARCHITECTURES["resnet18"].build(10), freeze_backbone=False, head_prefixes=())

    training = [
        overhead(
            "text: MiniLM full fine-tune, max_length 32",
            text_model,
            text_train,
            text_val,
            TextCollator(tokenizer, 32),
            epochs=1,
            batch_size=16,
            repeats=args.repeats,
        ),
        overhead(
            "image: resnet18 from scratch, 32x32",
            resnet,
            image_train,
            image_val,
            collate_images,
            epochs=2,
            batch_size=32,
            repeats=args.repeats,
        ),
    ]

    text_spec = ExportSpec(
        INPUT_NAMES, [], {n: {0: "batch", 1: "sequence"} for n in INPUT_NAMES} | {"logits": {0: "batch"}}, {}
    )

    def text_batch(size: int) -> dict[str, torch.Tensor]:
        encoded = tokenizer(
            (texts * 32)[:size], padding="max_length", truncation=True, max_length=64, return_tensors="pt"
        )
        return {name: encoded[name] for name in INPUT_NAMES}

    def image_spec(size: int) -> ExportSpec:
        return ExportSpec(["pixels"], [], {"pixels": {0: "batch"}, "logits": {0: "batch"}}, {})

    def image_batch(size: int, side: int = 224) -> dict[str, torch.Tensor]:
        return {"pixels": torch.randn(size, 3, side, side, generator=torch.Generator().manual_seed(0))}

    repeats = 5 if args.quick else 10
    serving = [
        *inference("text: MiniLM + head, seq 64", text_model(), text_batch, text_spec, repeats),
        *inference("image: resnet18, 224x224", resnet(), image_batch, image_spec(224), repeats),
        *inference(
            "image: mobilenet_v3_small, 224x224",
            ImageClassifier(
                IMAGE_ARCHITECTURES["mobilenet_v3_small"].build(10), freeze_backbone=False, head_prefixes=()
            ),
            image_batch,
            image_spec(224),
            repeats,
        ),
    ]

    results = {
        "benchmark": "training",
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "seconds": round(time.time() - started, 1),
        "trainer_overhead": training,
        "inference": serving,
        "goal": "trainer overhead <= 5% of a bare PyTorch loop's samples/s",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print("Trainer vs a bare PyTorch loop with the same recipe math (training samples/s, median of repetitions);")
    print("the minimal loop (AdamW + cross-entropy only) is shown for the cost of the recipe itself; 'noisy' names")
    threads = torch.get_num_threads()
    print(f"the loops whose repeats spread more than 10% (IQR over median); torch on {threads} thread(s)")
    print(
        render(
            [
                "workload",
                "bare_loop_samples_per_second",
                "trainer_samples_per_second",
                "trainer_vs_bare",
                "overhead_percent",
                "cpu_overhead_percent",
                "trainer_vs_minimal",
                "noisy",
            ],
            training,
            rule=True,
        )
    )
    print("\nONNX Runtime (CPU EP) vs torch eager inference")
    print(
        render(
            ["model", "batch", "torch_ms", "onnxruntime_ms", "onnxruntime_speedup", "onnxruntime_samples_per_second"],
            serving,
            rule=True,
        )
    )
    print(f"\nload average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}; written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
