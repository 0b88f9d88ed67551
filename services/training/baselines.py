"""The classical baseline a fine-tuned model must beat: what a partner gets from scikit-learn in ten lines.

- Text: TF-IDF (word unigrams and bigrams, sublinear term frequency) + logistic regression.
- Images: logistic regression on the pixels, each image decoded as served (RGB), downscaled to 16x16 and
  standardised.
- Token classification (named entities): the CoNLL-2003 shared task's dictionary baseline (`EntityDictionary`):
  every string that was an entity in the train split is tagged wherever it occurs, with its most frequent type.

Both train on the run's train split only (never validation or test) with a fixed random state, and answer the
evaluation set's items like any other model in the report: a label index and its probability per item. The run
records the candidate's macro-F1 minus the baseline's on those items as its `baseline_lift`.

`fit_classical` is shared by the training worker (`comparison.py`) and the quality benchmark, so the number a
run records and the number the benchmark reports come from one definition.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from services.training.data import Example

CLASSICAL = "classical"
TEXT_METHOD = "tfidf_logistic_regression"
IMAGE_METHOD = "pixels_logistic_regression"
PIXEL_SIDE = 16
"""Images are downscaled to PIXEL_SIDE x PIXEL_SIDE RGB: 768 features, enough for digits and small icons."""
RANDOM_STATE = 0
REGULARISATION = {"text_classification": 100.0, "image_classification": 0.01}
"""Logistic regression's C (inverse L2 strength) per task: what 5-fold cross-validation over 0.01..1000 on the
demo's train split chose (docs/training.md). Fixed here because a run's baseline must cost seconds, not a search;
a strong baseline keeps the lift honest."""


class NoBaseline(Exception):
    """The train split cannot fit a classifier (fewer than two classes in it)."""


@dataclass
class ClassicalAnswers:
    method: str
    predictions: np.ndarray
    """Label indices, one per item."""
    confidences: np.ndarray


def text_features(examples: Sequence[Example]) -> list[str]:
    return [example.content.decode("utf-8", errors="replace") for example in examples]


def pixel_features(examples: Sequence[Example]) -> np.ndarray:
    from PIL import Image

    from services.training.image_model import decode_rgb

    rows = []
    for example in examples:
        image = decode_rgb(example).resize((PIXEL_SIDE, PIXEL_SIDE), Image.Resampling.BILINEAR)
        rows.append(np.asarray(image, dtype=np.float32).reshape(-1) / 255.0)
    return np.stack(rows) if rows else np.zeros((0, PIXEL_SIDE * PIXEL_SIDE * 3), dtype=np.float32)


def classical_pipeline(task_type: str) -> Pipeline:
    classifier = LogisticRegression(C=REGULARISATION[task_type], max_iter=3000, random_state=RANDOM_STATE)
    if task_type == "text_classification":
        return make_pipeline(TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1), classifier)
    return make_pipeline(StandardScaler(), classifier)


def method_of(task_type: str) -> str:
    return TEXT_METHOD if task_type == "text_classification" else IMAGE_METHOD


def fit_classical(task_type: str, train: Sequence[Example], evaluate: Sequence[Example]) -> ClassicalAnswers:
    """Fit on `train`, answer `evaluate`. Raises NoBaseline when `train` holds fewer than two classes."""
    labels = np.asarray([example.label for example in train], dtype=np.int64)
    if len(np.unique(labels)) < 2:
        raise NoBaseline(f"the train split holds {len(np.unique(labels))} class(es); a classifier needs two")
    features = text_features if task_type == "text_classification" else pixel_features
    pipeline = classical_pipeline(task_type)
    pipeline.fit(features(train), labels)
    if not evaluate:
        return ClassicalAnswers(method_of(task_type), np.zeros(0, dtype=np.int64), np.zeros(0))
    probabilities = pipeline.predict_proba(features(evaluate))
    classes = pipeline.classes_.astype(np.int64)  # the labels the train split holds, a subset of 0..num_labels-1
    best = probabilities.argmax(axis=1)
    return ClassicalAnswers(method_of(task_type), classes[best], probabilities.max(axis=1))


# ------------------------------------------------------------------------------------------ token classification

DICTIONARY_METHOD = "conll2003_dictionary"


class EntityDictionary:
    """The CoNLL-2003 shared task's baseline (Tjong Kim Sang and De Meulder, 2003): tag every string that was an
    entity in the training data, with the type it had most often there (the first in label order on a tie),
    longest match first, on word boundaries (the match neither starts nor ends inside a word), left to right
    without overlaps. Matching is exact, case included, as the baseline was defined."""

    def __init__(self, train_spans: Sequence[tuple[str, Sequence[dict]]], labels: Sequence[str]) -> None:
        order = {label: index for index, label in enumerate(labels)}
        seen: dict[str, Counter] = {}
        for text, spans in train_spans:
            for span in spans:
                surface = text[span["start"] : span["end"]]
                if surface.strip():
                    seen.setdefault(surface, Counter())[span["label"]] += 1
        self.types = {
            surface: min(counts, key=lambda label: (-counts[label], order.get(label, len(order))))
            for surface, counts in seen.items()
        }
        # Longest first: the regex engine takes the first alternative that matches at the leftmost position.
        surfaces = sorted(self.types, key=lambda surface: (-len(surface), surface))
        self.pattern = (
            re.compile(r"(?<!\w)(?:" + "|".join(re.escape(surface) for surface in surfaces) + r")(?!\w)")
            if surfaces
            else None
        )

    def __len__(self) -> int:
        return len(self.types)

    def entities(self, text: str) -> list[dict]:
        """The spans `{start, end, label}` the dictionary tags in `text`, in text order."""
        if self.pattern is None:
            return []
        return [
            {"start": match.start(), "end": match.end(), "label": self.types[match.group()]}
            for match in self.pattern.finditer(text)
        ]
