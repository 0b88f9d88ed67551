"""Export of a token-classification model: an ONNX graph with dynamic batch and sequence axes, checked against
torch on held-out texts, in a model version folder with its tokenizer and metadata.

The graph's inputs are `input_ids` and `attention_mask` (INT64, `[batch, sequence]`); its output `logits` is
`[batch, sequence, tags]`, one row per word piece. `metadata.json` records the tag set (IOB2, index order of the
logits), the entity labels, the decoding rule that turns logits into character-offset entities
(`token_model.DECODING_RULE`), the tokenizer files and the parity check. Parity: on every real (unpadded) token
of the held-out texts, no logit differs from torch's by more than `export.PARITY_TOLERANCE`, and the argmax tag
is the same; otherwise nothing is written and `ExportError` says so.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from services.training.export import (
    METADATA_FILE,
    MODEL_FILE,
    OPSET,
    OUTPUT_NAME,
    ParityReport,
    export_onnx,
    onnx_session,
    require_parity,
)
from services.training.spec import ExportSpec
from services.training.text_model import INPUT_NAMES
from services.training.token_model import DECODING_RULE, TokenLogits, TokenTagger, encode

TASK_TYPE = "token_classification"


def token_export_spec(max_length: int, tokenizer: Any) -> ExportSpec:
    sequence_axes = {0: "batch", 1: "sequence"}
    return ExportSpec(
        input_names=INPUT_NAMES,
        inputs=[{"name": name, "datatype": "INT64", "shape": [-1, -1]} for name in INPUT_NAMES],
        dynamic_axes={"input_ids": sequence_axes, "attention_mask": sequence_axes, OUTPUT_NAME: sequence_axes},
        preprocessing={
            "kind": "text",
            "tokenizer_files": [],
            "max_length": max_length,
            "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
            "padding": "longest",
            "truncation": True,
            "offsets": "unicode_code_points",
            "tokenizer_class": type(tokenizer).__name__,
        },
    )


def token_parity(
    tagger: TokenTagger, session: Any, tokenizer: Any, texts: list[str], max_length: int, batch_size: int = 16
) -> ParityReport:
    """Torch against ONNX Runtime on the real tokens of `texts`, batched so that padding varies per batch."""
    graph = TokenLogits(tagger).to("cpu").float().eval()
    largest, mismatches, tokens = 0.0, 0, 0
    for start in range(0, len(texts), batch_size):
        encoded = encode(tokenizer, texts[start : start + batch_size], max_length)
        feed = {name: encoded[name].astype(np.int64) for name in INPUT_NAMES}
        with torch.inference_mode():
            reference = graph(*(torch.from_numpy(feed[name]) for name in INPUT_NAMES)).numpy()
        exported = session.run([OUTPUT_NAME], feed)[0]
        real = feed["attention_mask"].astype(bool)
        reference, exported = reference[real], exported[real]
        largest = max(largest, float(np.abs(reference - exported).max()) if len(reference) else 0.0)
        mismatches += int((reference.argmax(-1) != exported.argmax(-1)).sum())
        tokens += int(real.sum())
    return ParityReport(items=tokens, max_abs_diff=largest, argmax_mismatches=mismatches)


def export_token_model(
    tagger: TokenTagger,
    tokenizer: Any,
    tags: list[str],
    entity_labels: list[str],
    max_length: int,
    folder: Path,
    held_out_texts: list[str],
    *,
    model_name: str,
    metrics: dict[str, Any] | None = None,
    lineage: dict[str, Any] | None = None,
    hyperparameters: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write model.onnx, the tokenizer and metadata.json (a `shared.artifacts.ModelMetadata`, plus the tag set and
    the decoding rule) into `folder`, after the parity check; returns the metadata."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = token_export_spec(max_length, tokenizer)
    example = encode(tokenizer, held_out_texts[:2] or ["an example"], max_length)
    graph = TokenLogits(tagger)
    export_onnx(
        graph,
        {name: torch.from_numpy(example[name].astype(np.int64)) for name in INPUT_NAMES},
        folder / MODEL_FILE,
        spec,
    )
    report = token_parity(tagger, onnx_session(folder / MODEL_FILE), tokenizer, held_out_texts, max_length)
    if not report.passed:
        (folder / MODEL_FILE).unlink(missing_ok=True)
    require_parity(report)
    written = sorted(Path(path).name for path in tokenizer.save_pretrained(str(folder)) if Path(path).is_file())
    spec.preprocessing["tokenizer_files"] = written
    files = {
        name: {
            "sha256": hashlib.sha256((folder / name).read_bytes()).hexdigest(),
            "size": (folder / name).stat().st_size,
        }
        for name in sorted({MODEL_FILE, *written})
    }
    metadata = {
        "model_name": model_name,
        "task_type": TASK_TYPE,
        "format": "onnx",
        "opset": OPSET,
        "inputs": spec.inputs,
        "outputs": [{"name": OUTPUT_NAME, "datatype": "FP32", "shape": [-1, -1, len(tags)]}],
        "labels": list(entity_labels),
        "tags": list(tags),
        "tagging_scheme": "IOB2",
        "decoding": DECODING_RULE,
        "preprocessing": spec.preprocessing,
        "parity": report.as_dict(),
        "metrics": metrics or {},
        "lineage": lineage or {},
        "hyperparameters": hyperparameters or {},
        "files": files,
    }
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    return metadata
