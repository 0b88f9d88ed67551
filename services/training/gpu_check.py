"""Is this node ready to train on its GPU? `python -m services.training.gpu_check`

Reports whether torch sees CUDA; if it does, runs bf16-autocast training steps of the text model
(all-MiniLM-L6-v2 + head) and the image model (resnet18) on the GPU and reports samples/s, and says whether
ONNX Runtime's CUDA execution provider really loads. Without a GPU it says so and exits 0; with one it exits
1 if any check fails.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

WARMUP_STEPS = 3
TIMED_STEPS = 10


def _timed_steps(model: Any, batch: dict[str, Any], labels: Any, device: Any) -> float:
    import torch

    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = labels.to(device)

    def step() -> None:
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            logits = model(**batch)
        loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        step()
    torch.cuda.synchronize(device)
    return TIMED_STEPS * len(labels) / (time.perf_counter() - started)


def text_step(device: Any, batch_size: int = 32, length: int = 128) -> float:
    import torch

    from services.training.text_model import TextClassifier, load_encoder

    encoder, _ = load_encoder("all-minilm-l6-v2")
    model = TextClassifier(encoder, 2, dropout=0.1, freeze_encoder=False)
    batch = {
        "input_ids": torch.randint(1000, 5000, (batch_size, length)),
        "attention_mask": torch.ones(batch_size, length, dtype=torch.long),
    }
    return _timed_steps(model, batch, torch.randint(0, 2, (batch_size,)), device)


def image_step(device: Any, batch_size: int = 64, size: int = 224) -> float:
    import torch

    from services.training.base_models import IMAGE_ARCHITECTURES
    from services.training.image_model import ImageClassifier

    model = ImageClassifier(IMAGE_ARCHITECTURES["resnet18"].build(10), freeze_backbone=False, head_prefixes=())
    batch = {"pixels": torch.randn(batch_size, 3, size, size)}
    return _timed_steps(model, batch, torch.randint(0, 10, (batch_size,)), device)


def onnxruntime_cuda() -> dict[str, Any]:
    """Whether a session with the CUDA provider really runs on it (`get_providers()`, not the wish list)."""
    import tempfile
    from pathlib import Path

    import onnxruntime as ort
    import torch

    available = ort.get_available_providers()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "probe.onnx"
        torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(path), dynamo=False)
        try:
            session = ort.InferenceSession(str(path), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
            active = session.get_providers()
        except Exception as exc:
            return {"available": available, "active": [], "error": str(exc)[:300], "cuda": False}
    return {"available": available, "active": active, "cuda": "CUDAExecutionProvider" in active}


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"gpu": False, "message": "no GPU present: torch sees no CUDA device; nothing to check"}))
        return 0
    device = torch.device("cuda", 0)
    report: dict[str, Any] = {
        "gpu": True,
        "device": torch.cuda.get_device_name(device),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
        "bf16": torch.cuda.is_bf16_supported(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    ok = True
    for name, check in (("text_bf16_samples_per_second", text_step), ("image_bf16_samples_per_second", image_step)):
        try:
            report[name] = round(check(device), 1)
        except Exception as exc:
            ok = False
            report[name] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
    try:
        report["onnxruntime"] = onnxruntime_cuda()
        ok = ok and report["onnxruntime"]["cuda"]
    except Exception as exc:
        ok = False
        report["onnxruntime"] = f"failed: {exc.__class__.__name__}: {str(exc)[:300]}"
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
