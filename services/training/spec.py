"""What a task type (text, image or token classification) hands the pipeline: its model, datasets and collators,
and how the model is exported and served (ONNX input names and axes, the preprocessing spec, files beside it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn
from torch.utils.data import Dataset


@dataclass
class ExportSpec:
    input_names: list[str]
    inputs: list[dict[str, Any]]
    """For metadata.json: [{"name", "datatype", "shape"}], -1 where an axis is dynamic."""
    dynamic_axes: dict[str, dict[int, str]]
    preprocessing: dict[str, Any]
    write_support_files: Callable[[Path], list[str]] = field(default=lambda _folder: [])
    """Writes the files serving needs beside model.onnx (the tokenizer) and returns their names."""


@dataclass
class PreparedTask:
    model: nn.Module
    train_set: Dataset
    val_set: Dataset
    train_collate: Callable[[list[Any]], dict[str, Any]]
    eval_collate: Callable[[list[Any]], dict[str, Any]]
    head_prefixes: tuple[str, ...]
    """Parameter name prefixes of the classification head (trained at the head learning rate)."""
    base_model: dict[str, Any]
    """Lineage of the starting weights: name, "pretrained" or "scratch", source, sha256."""
    export: ExportSpec
    lr_scale: Callable[[str], float] | None = None
    """Multiplier of the body's learning rate per parameter name (layer-wise decay); None: 1 everywhere."""
    embedding_parameter: str | None = None
    """Name of the input embedding matrix, which adversarial training (FGM) perturbs; None: the task has none."""
    chosen: dict[str, Any] = field(default_factory=dict)
    """Settings the task chose from the data (text: `max_length`), recorded in the run's training summary."""
    train_label_counts: list[int] | None = None
    """What class weights are computed over when the task's classes are not the snapshot's labels (a tagger's
    IOB2 tags on first word pieces); None: the train split's label counts."""
    selection_score: Callable[[Any, Any], float] | None = None
    """The validation score that selects the epoch and stops early (`Trainer`); None: macro-F1."""
    tagger: Any = None
    """Token classification: the `token_model.PreparedTokenTask` (tokenizer, tags, max length) export needs."""
