"""Model version folders as training writes them: `model.onnx`, the files beside it, and `metadata.json`.

``model_metadata`` builds the record (the shape ``shared.artifacts.ModelMetadata`` reads), ``write_metadata``
writes it for a folder on disk, ``file_digest`` is what it records per file, and ``export_graph`` exports a
torch module to ONNX with a dynamic batch axis, as the service's exporter does.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any

OPSET = 17


def file_digest(data: bytes) -> dict[str, Any]:
    """What `metadata.json` records of a file: its sha256 and size."""
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def model_metadata(
    *,
    model_name: str,
    task_type: str,
    labels: list[str],
    inputs: list[dict[str, Any]],
    preprocessing: dict[str, Any],
    files: dict[str, dict[str, Any]],
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A model version's `metadata.json`: one FP32 `logits` output over `labels`, ONNX opset 17."""
    return {
        "model_name": model_name,
        "task_type": task_type,
        "labels": labels,
        "inputs": inputs,
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, len(labels)]}],
        "opset": OPSET,
        "preprocessing": preprocessing,
        "metrics": metrics or {},
        "lineage": lineage or {},
        "hyperparameters": hyperparameters or {},
        "files": files,
    }


def write_metadata(
    folder: Path,
    *,
    model_name: str,
    task_type: str,
    labels: list[str],
    inputs: list[dict[str, Any]],
    preprocessing: dict[str, Any],
    lineage: dict[str, Any] | None = None,
) -> None:
    """Write `folder/metadata.json` over the files already in the folder (lineage: the folder's name as run id)."""
    paths = [path for path in sorted(folder.iterdir()) if path.name != "metadata.json"]
    files = {path.name: file_digest(path.read_bytes()) for path in paths}
    metadata = model_metadata(
        model_name=model_name,
        task_type=task_type,
        labels=labels,
        inputs=inputs,
        preprocessing=preprocessing,
        files=files,
        lineage=lineage if lineage is not None else {"run_id": folder.name},
    )
    (folder / "metadata.json").write_text(json.dumps(metadata))


def export_graph(module: Any, example: tuple[Any, ...], names: list[str], path: Path) -> None:
    """Export a torch module to ONNX: inputs `names` (a 2-D input gets dynamic batch and sequence axes, any
    other a dynamic batch axis) and one output, `logits`, with a dynamic batch axis."""
    import torch  # here, not at the top: the metadata writers serve tests that never load torch

    dynamic = {
        name: {0: "batch", 1: "sequence"} if example[i].dim() == 2 else {0: "batch"} for i, name in enumerate(names)
    }
    # The TorchScript exporter works offline; its deprecation and tracer warnings are noise here.
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            example,
            str(path),
            input_names=names,
            output_names=["logits"],
            dynamic_axes={**dynamic, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )
