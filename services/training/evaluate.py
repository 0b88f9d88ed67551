"""Classification metrics on a split: accuracy, macro-F1, per-class precision/recall/F1, confusion, ECE.

`classification_report` scores logits (the torch model during training, the exported ONNX graph before it is
published); `prediction_report` scores answers (a predicted label index and its confidence per item), which is
what the evaluation report compares: the candidate, the production version and the baselines. scikit-learn
counts, numpy does the rest. A prediction of -1 is a label outside the evaluated label set (one the production
version knows and the candidate does not): it is wrong wherever it occurs and no class of its own.
`input_statistics` describes a split's inputs as inference's monitoring measures each prediction's (the
baseline its input drift is judged against).
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image
from sklearn import metrics

ECE_BINS = 15
IGNORED_LABEL = -100
INPUT_STATS_BATCH = 64


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted classes; every class has its row and column, seen or not."""
    if len(y_true) == 0:  # scikit-learn refuses an empty split; it counts nothing
        return np.zeros((num_classes, num_classes), dtype=np.int64)
    return metrics.confusion_matrix(y_true, y_pred, labels=np.arange(num_classes))


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes that occur in the labels or the predictions (scikit-learn's convention).

    A class neither true nor predicted on this split is left out, not averaged in as 0; an unknown label (-1)
    is no class. A true label of IGNORED_LABEL (-100: a token classification's non-first word pieces and padding)
    is not scored at all.
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scored = y_true != IGNORED_LABEL
    y_true, y_pred = y_true[scored], y_pred[scored]
    if len(y_true) == 0:
        return 0.0
    present = np.union1d(y_true, y_pred[y_pred >= 0])
    return float(metrics.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))


def expected_calibration_error(probabilities: np.ndarray, y_true: np.ndarray, bins: int = ECE_BINS) -> float:
    """Weighted gap between confidence and accuracy over equal-width confidence bins."""
    return calibration_error(probabilities.max(axis=1), probabilities.argmax(axis=1) == y_true, bins)


def calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of answers given with `confidence`, `correct` or not."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for low, high in itertools.pairwise(edges):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def classification_report(logits: np.ndarray, y_true: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Metrics of logits: their argmax and its probability as answers, plus the mean cross-entropy (`loss`)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = softmax(np.asarray(logits, dtype=np.float64))
    log_likelihood = np.log(np.clip(probabilities[np.arange(len(y_true)), y_true], 1e-12, None))
    report = prediction_report(y_true, probabilities.argmax(axis=1), probabilities.max(axis=1), labels)
    return {**report, "loss": float(-log_likelihood.mean()) if len(y_true) else 0.0}


def prediction_report(
    y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray, labels: list[str]
) -> dict[str, Any]:
    """Metrics of answers: `y_pred` indexes `labels` (-1: a label outside them), `confidence` is each answer's
    probability as the model gave it."""
    num_classes = len(labels)
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    precision, recall, f1, support = _per_class(y_true, y_pred, num_classes)
    return {
        "items": len(y_true),
        "accuracy": float((y_true == y_pred).mean()) if len(y_true) else 0.0,
        "macro_f1": macro_f1(y_true, y_pred),
        "ece": calibration_error(confidence, y_true == y_pred),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
        "confusion_matrix": {"labels": list(labels), "matrix": confusion_matrix(y_true, y_pred, num_classes).tolist()},
        "unknown_label_predictions": int((y_pred < 0).sum()),
    }


def _per_class(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support of every class; a score with nothing to divide by is 0."""
    if len(y_true) == 0:
        zeros = np.zeros(num_classes)
        return zeros, zeros, zeros, np.zeros(num_classes, dtype=np.int64)
    return metrics.precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(num_classes), average=None, zero_division=0
    )


def input_statistics(
    preprocessing: dict[str, Any],
    contents: Sequence[bytes],
    feeds_of: Callable[[int, int], dict[str, np.ndarray]],
    unknown_token_id: int | None = None,
) -> dict[str, list[float]]:
    """Per input, in order, what inference's monitoring records for a prediction (`services/inference/traffic.py`):
    text `chars`, `tokens` and `unknown_rate` (the share of the unknown token among its tokens); image `width`,
    `height` (of the stored image) and `brightness` (mean pixel value 0..1 after the resize).

    `contents` are the inputs' bytes; `feeds_of(start, stop)` builds the graph's feeds for `contents[start:stop]`
    as they are served (for the evaluation: `served.served_inputs`), in batches of `INPUT_STATS_BATCH`."""
    kind = preprocessing.get("kind")
    if kind not in ("text", "image"):
        return {}
    columns: dict[str, list[float]] = (
        {"chars": [], "tokens": [], "unknown_rate": []}
        if kind == "text"
        else {"width": [], "height": [], "brightness": []}
    )
    for start in range(0, len(contents), INPUT_STATS_BATCH):
        stop = min(start + INPUT_STATS_BATCH, len(contents))
        feeds = feeds_of(start, stop)
        if kind == "text":
            mask = np.asarray(feeds["attention_mask"]) > 0
            tokens = mask.sum(axis=1)
            unknowns = ((np.asarray(feeds["input_ids"]) == unknown_token_id) & mask).sum(axis=1)
            rates = np.divide(unknowns, tokens, out=np.zeros(len(tokens)), where=tokens > 0)
            columns["chars"] += [len(data.decode("utf-8", errors="replace")) for data in contents[start:stop]]
            columns["tokens"] += tokens.astype(float).tolist()
            columns["unknown_rate"] += np.round(rates, 6).tolist()
        else:
            (pixels,) = feeds.values()
            mean = np.asarray(preprocessing["mean"], dtype=np.float32).reshape(-1, 1, 1)
            std = np.asarray(preprocessing["std"], dtype=np.float32).reshape(-1, 1, 1)
            brightness = (np.asarray(pixels, dtype=np.float32) * std + mean).reshape(stop - start, -1).mean(axis=1)
            columns["brightness"] += np.round(brightness, 6).tolist()
            for data in contents[start:stop]:
                with Image.open(io.BytesIO(data)) as image:  # the header only
                    width, height = image.size
                columns["width"].append(float(width))
                columns["height"].append(float(height))
    return columns


def entity_report(true_tags: list[list[str]], predicted_tags: list[list[str]]) -> dict[str, Any]:
    """Entity-level scores of IOB2 tag sequences (one list of word tags per text), by `seqeval` in strict mode:
    an entity counts only if its type and its exact extent match. `entity_f1` (the promotion gate's metric for
    token classification) and `entity_precision`/`entity_recall` are micro-averaged over entities; `per_type`
    has each entity type's precision, recall, F1 and support (true entities)."""
    from seqeval.metrics import classification_report as seqeval_report
    from seqeval.scheme import IOB2

    texts = len(true_tags)
    if not any(tag != "O" for tags in (*true_tags, *predicted_tags) for tag in tags):
        return {"texts": texts, "entity_precision": 0.0, "entity_recall": 0.0, "entity_f1": 0.0, "per_type": {}}
    report = seqeval_report(true_tags, predicted_tags, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    per_type = {
        name: {
            "precision": float(row["precision"]),
            "recall": float(row["recall"]),
            "f1": float(row["f1-score"]),
            "support": int(row["support"]),
        }
        for name, row in report.items()
        if not name.endswith(" avg")
    }
    return {
        "texts": texts,
        "entity_precision": float(micro["precision"]),
        "entity_recall": float(micro["recall"]),
        "entity_f1": float(micro["f1-score"]),
        "per_type": per_type,
    }
