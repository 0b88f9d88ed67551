"""Export: the trained model as a verified ONNX graph in a model version folder.

1. `torch.onnx.export` (the TorchScript-based exporter, `dynamo=False`: it needs no `onnxscript` and works
   offline) with a dynamic batch axis, and a dynamic sequence axis for text.
2. Parity: ONNX Runtime runs the graph on the validation inputs; the largest difference of any logit from the
   torch model must be <= 1e-4 (fp32) and the argmax must agree on every item. Otherwise the run fails and
   nothing is published.
3. Optionally (text) int8 dynamic quantization, kept only if validation macro-F1 drops by <= 0.01.
4. Metrics are computed from the graph that will be served, and `metadata.json` records everything needed
   to serve, compare and trace it, including the sha256 and size of every file beside it.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from services.training.evaluate import classification_report
from services.training.failures import ExportError
from services.training.spec import ExportSpec
from shared.artifacts import ModelMetadata

OPSET = 17
PARITY_TOLERANCE = 1e-4
QUANTIZATION_MAX_F1_DROP = 0.01
MODEL_FILE = "model.onnx"
FP32_FILE = "model.fp32.onnx"
METADATA_FILE = "metadata.json"
OUTPUT_NAME = "logits"


@dataclass
class ParityReport:
    items: int
    max_abs_diff: float
    argmax_mismatches: int
    tolerance: float = PARITY_TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.argmax_mismatches == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "items": self.items,
            "max_abs_diff": self.max_abs_diff,
            "argmax_mismatches": self.argmax_mismatches,
            "tolerance": self.tolerance,
            "passed": self.passed,
        }


@dataclass
class ModelPackage:
    folder: Path
    files: dict[str, dict[str, Any]]
    """Every file of the folder except metadata.json: name -> {sha256, size}."""
    metadata: dict[str, Any]
    metrics: dict[str, Any]


def export_onnx(model: nn.Module, example: dict[str, torch.Tensor], path: Path, spec: ExportSpec) -> None:
    model = model.to("cpu").float().eval()
    args = tuple(example[name] for name in spec.input_names)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=spec.input_names,
                output_names=[OUTPUT_NAME],
                dynamic_axes=spec.dynamic_axes,
                opset_version=OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        import onnx

        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ExportError(f"exporting the trained model to ONNX failed: {exc.__class__.__name__}: {exc}") from exc


def onnx_session(path: Path, *, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def onnx_logits(session: Any, batches: list[dict[str, torch.Tensor]], input_names: list[str]) -> np.ndarray:
    outputs = [session.run([OUTPUT_NAME], {name: batch[name].numpy() for name in input_names})[0] for batch in batches]
    return np.concatenate(outputs).astype(np.float32)


def torch_logits(model: nn.Module, batches: list[dict[str, torch.Tensor]], input_names: list[str]) -> np.ndarray:
    model = model.to("cpu").float().eval()
    with torch.inference_mode():
        return np.concatenate([model(**{name: batch[name] for name in input_names}).numpy() for batch in batches])


def compare(reference: np.ndarray, candidate: np.ndarray) -> ParityReport:
    return ParityReport(
        items=len(reference),
        max_abs_diff=float(np.abs(reference - candidate).max()) if len(reference) else 0.0,
        argmax_mismatches=int((reference.argmax(1) != candidate.argmax(1)).sum()) if len(reference) else 0,
    )


def require_parity(report: ParityReport) -> None:
    if not report.passed:
        raise ExportError(
            f"the exported ONNX graph does not reproduce the trained model on the {report.items} validation items: "
            f"largest logit difference {report.max_abs_diff:.3g} (allowed {report.tolerance:g}), "
            f"{report.argmax_mismatches} predictions differ. Nothing was published. The model probably has "
            "input-dependent control flow that export froze; fix the architecture and train again."
        )


def quantize_int8(fp32: Path, int8: Path) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    try:
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8)
    except Exception as exc:
        raise ExportError(f"int8 quantization failed: {exc.__class__.__name__}: {exc}") from exc


def file_entry(path: Path) -> dict[str, Any]:
    with path.open("rb") as stream:
        digest = hashlib.file_digest(stream, "sha256")
    return {"sha256": digest.hexdigest(), "size": path.stat().st_size}


@cache
def code_version() -> str:
    """The package version plus a digest of the training service's sources (exact even without git)."""
    try:
        version = package_metadata.version("flywheel")
    except package_metadata.PackageNotFoundError:
        version = "unknown"
    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode())
        digest.update(source.read_bytes())
    return f"flywheel {version}+training.{digest.hexdigest()[:12]}"


def framework_versions() -> dict[str, str]:
    names = ("torch", "torchvision", "transformers", "onnx", "onnxruntime-gpu")
    versions = {}
    for name in names:
        try:
            versions[name] = package_metadata.version(name)
        except package_metadata.PackageNotFoundError:
            continue
    return versions


def build_package(
    *,
    folder: Path,
    model: nn.Module,
    spec: ExportSpec,
    batches: list[dict[str, torch.Tensor]],
    labels: list[str],
    quantize: bool,
    identity: dict[str, Any],
    lineage: dict[str, Any],
    hyperparameters: dict[str, Any],
    training: dict[str, Any],
) -> ModelPackage:
    """Export, verify and describe the model in `folder`; raises ExportError when it must not be published."""
    folder.mkdir(parents=True, exist_ok=True)
    y_true = np.concatenate([batch["labels"].numpy() for batch in batches])
    model_path = folder / MODEL_FILE
    export_onnx(model, batches[0], model_path, spec)
    reference = torch_logits(model, batches, spec.input_names)
    exported = onnx_logits(onnx_session(model_path), batches, spec.input_names)
    parity = compare(reference, exported)
    require_parity(parity)
    metrics = classification_report(exported, y_true, labels)
    quantization: dict[str, Any] | None = None
    if quantize:
        int8_path = folder / "model.int8.onnx"
        quantize_int8(model_path, int8_path)
        int8_logits = onnx_logits(onnx_session(int8_path), batches, spec.input_names)
        int8_metrics = classification_report(int8_logits, y_true, labels)
        drop = metrics["macro_f1"] - int8_metrics["macro_f1"]
        accepted = drop <= QUANTIZATION_MAX_F1_DROP
        quantization = {
            "kind": "dynamic_int8",
            "accepted": accepted,
            "macro_f1_fp32": metrics["macro_f1"],
            "macro_f1_int8": int8_metrics["macro_f1"],
            "macro_f1_drop": drop,
            "max_drop_allowed": QUANTIZATION_MAX_F1_DROP,
            "agreement_with_fp32": compare(exported, int8_logits).as_dict(),
        }
        if accepted:  # serve the int8 graph; keep the verified fp32 graph beside it
            model_path.rename(folder / FP32_FILE)
            int8_path.rename(model_path)
            metrics = int8_metrics
        else:
            int8_path.unlink()
    support_files = spec.write_support_files(folder)
    preprocessing = dict(spec.preprocessing)
    if preprocessing.get("kind") == "text":
        preprocessing["tokenizer_files"] = support_files
    files = {path.name: file_entry(path) for path in sorted(folder.iterdir()) if path.name != METADATA_FILE}
    metrics = {**metrics, "evaluated_on": "validation split, scored by ONNX Runtime on the served graph"}
    document = {
        **identity,
        "labels": list(labels),
        "inputs": spec.inputs,
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, len(labels)]}],
        "opset": OPSET,
        "preprocessing": preprocessing,
        "metrics": metrics,
        "lineage": {**lineage, "code_version": code_version(), "frameworks": framework_versions()},
        "hyperparameters": hyperparameters,
        "files": files,
        "export": {
            "exporter": f"torch.onnx.export (TorchScript-based, dynamo=False), torch {torch.__version__}",
            "parity": parity.as_dict(),
            "quantization": quantization,
            "served_file": MODEL_FILE,
        },
        "training": training,
        "created_at": datetime.now(UTC).isoformat(),
    }
    errors = ModelMetadata().validate(document)
    if errors:
        raise ExportError(f"the model metadata does not follow the shared ModelMetadata format: {errors}")
    (folder / METADATA_FILE).write_text(json.dumps(document, indent=2, sort_keys=False))
    return ModelPackage(folder=folder, files=files, metadata=document, metrics=metrics)
