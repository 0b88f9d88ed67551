"""An annotator's entity spans on a token-classification task: what a valid answer is, and how it is stored.

The rules are ingestion's (docs/ner.md, "Offsets"), in `shared.entities.span_errors`: `text[start:end]` in
Unicode code points, `start < end`, inside the text, each boundary on a grapheme cluster boundary (`regex`'s
`\\X`), no two spans overlapping; and here every label one of the dataset's entity labels. Errors are keyed like
marshmallow's (`{"2": {"end": [...]}}`) so that the API answers 422 naming `spans.<i>.<field>`. Spans are stored
in text order as `{start, end, label}` dicts (a JSON column); consensus compares them as `(start, end, label)`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from services.labeling.consensus import Span
from shared.entities import canonical_spans
from shared.entities import span_errors as structural_errors

SPAN_TASK_TYPE = "token_classification"


def is_span_dataset(task_type: str) -> bool:
    return task_type == SPAN_TASK_TYPE


def span_errors(text: str, spans: list[dict[str, Any]], labels: Iterable[str]) -> dict[str, Any]:
    """Field errors of `spans` against the task's text (the shared rules) and the dataset's entity labels."""
    errors = structural_errors(text, spans)
    known = set(labels)
    for index, span in enumerate(spans):
        if span["label"] not in known:
            message = f"{span['label']!r} is not one of the dataset's entity labels {sorted(known)}"
            errors.setdefault(str(index), {}).setdefault("label", []).append(message)
    return errors


def canonical(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return canonical_spans(spans)


def as_tuples(spans: Iterable[dict[str, Any]]) -> tuple[Span, ...]:
    return tuple(sorted((s["start"], s["end"], s["label"]) for s in spans))


def as_dicts(spans: Iterable[Span]) -> list[dict[str, Any]]:
    return [{"start": start, "end": end, "label": label} for start, end, label in sorted(spans)]
