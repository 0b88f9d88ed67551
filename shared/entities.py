"""Named entities from token logits: the decoding rule a token-classification model is exported with, shared by
training (evaluation, its own predictions) and inference (`:predict`), so that both read logits the same way.

Offsets are Unicode code points of the text (Python `str` indices), as ingestion's spans. The rule
(`DECODING_RULE`, recorded in the exported metadata): each word (a tokenizer pre-token) takes the softmax of its
first word piece's logits; the words' tags are the most probable valid IOB2 sequence (Viterbi: `I-X` only after
`B-X` or `I-X`, never first); an entity is a `B-X` word and the `I-X` words after it, from its first word's start
to its last word's end, widened to grapheme (user-perceived character) boundaries, and its score is the mean
probability of its words' tags.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import regex

DECODING_RULE = (
    "iob2-first-piece-viterbi: each word (tokenizer pre-token) takes the softmax of its first word piece's logits; "
    "the word tags are the most probable valid IOB2 sequence (I-X only after B-X or I-X); an entity is a B-X word "
    "and the I-X words after it, its offsets run from the first word's start to the last word's end (Unicode code "
    "points, widened to grapheme boundaries), its score is the mean probability of its words' tags"
)
_GRAPHEME = regex.compile(r"\X")


# ------------------------------------------------------------------------------------- what a valid span is
# Ingestion (pushes, imports) and labeling (annotators' answers) both check spans by these rules (docs/ner.md).


def grapheme_boundaries(text: str) -> set[int]:
    """Code point offsets where a user-perceived character starts or ends (0 and len(text) included)."""
    bounds = {0, len(text)}
    bounds.update(match.end() for match in _GRAPHEME.finditer(text))
    return bounds


def _lone_surrogate(text: str) -> int | None:
    for index, char in enumerate(text):
        if 0xD800 <= ord(char) <= 0xDFFF:
            return index
    return None


def span_errors(text: str, spans: list[dict[str, Any]]) -> dict[str, Any]:
    """Field errors of `spans` against `text`, keyed like marshmallow's (`{"3": {"end": [...]}}`); {} if valid:
    `start < end`, inside the text, both boundaries on grapheme boundaries, no two spans overlapping."""
    errors: dict[str, Any] = {}
    if not spans:
        return errors
    surrogate = _lone_surrogate(text)
    if surrogate is not None:
        return {"_schema": [f"the text holds a lone UTF-16 surrogate at {surrogate}: send text as Unicode, not halves"]}
    bounds = grapheme_boundaries(text)

    def add(index: int, name: str, message: str) -> None:
        errors.setdefault(str(index), {}).setdefault(name, []).append(message)

    for index, span in enumerate(spans):
        start, end = span["start"], span["end"]
        if start >= end:
            add(index, "start", f"start ({start}) must be less than end ({end})")
            continue
        if end > len(text):
            add(index, "end", f"end ({end}) is past the end of the text ({len(text)} code points)")
            continue
        for name, offset in (("start", start), ("end", end)):
            if offset not in bounds:
                add(index, name, f"{name} ({offset}) cuts a character in two (offsets count Unicode code points)")
    if errors:
        return errors
    ordered = sorted(range(len(spans)), key=lambda i: (spans[i]["start"], spans[i]["end"]))
    for before, after in itertools.pairwise(ordered):
        if spans[after]["start"] < spans[before]["end"]:
            add(after, "start", f"overlaps span {before} ({spans[before]['start']}-{spans[before]['end']})")
    return errors


def canonical_spans(spans: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Spans in text order, with exactly the keys start, end, label."""
    ordered = sorted(spans, key=lambda s: (s["start"], s["end"], s["label"]))
    return [{"start": s["start"], "end": s["end"], "label": s["label"]} for s in ordered]


def tag_set(entity_labels: list[str]) -> list[str]:
    """The IOB2 tags over the entity labels, in logit order: `O`, then `B-<label>`, `I-<label>` per label."""
    return ["O", *(f"{prefix}-{label}" for label in entity_labels for prefix in ("B", "I"))]


@dataclass
class Words:
    """A tokenized text's words: each one's character span and the position of its first word piece."""

    offsets: list[tuple[int, int]]
    first_piece: list[int]


def words_from(word_ids: Sequence[int | None], offsets: Sequence[Sequence[int]]) -> Words:
    """The words of one tokenized text from its pieces' word ids (None for special tokens and padding) and their
    character offsets, as a fast tokenizer reports them."""
    spans: list[tuple[int, int]] = []
    first: list[int] = []
    previous = None
    for position, word in enumerate(word_ids):
        if word is None:
            continue
        start, end = (int(x) for x in offsets[position])
        if word != previous:
            spans.append((start, end))
            first.append(position)
        else:
            spans[-1] = (spans[-1][0], max(spans[-1][1], end))
        previous = word
    return Words(spans, first)


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def allowed_transitions(tags: list[str]) -> np.ndarray:
    """`[from, to]`: True where IOB2 allows tag `to` right after tag `from` (I-X only after B-X or I-X)."""
    allowed = np.ones((len(tags), len(tags)), dtype=bool)
    for to, tag in enumerate(tags):
        if tag.startswith("I-"):
            allowed[:, to] = [other in {f"B-{tag[2:]}", tag} for other in tags]
    return allowed


def viterbi_tags(probabilities: np.ndarray, tags: list[str]) -> list[int]:
    """The most probable valid IOB2 tag sequence for per-word tag probabilities `[words, tags]`."""
    if len(probabilities) == 0:
        return []
    log_p = np.log(np.clip(probabilities, 1e-12, None))
    barrier = np.where(allowed_transitions(tags), 0.0, -np.inf)
    starts = np.array([0.0 if not tag.startswith("I-") else -np.inf for tag in tags])
    score = starts + log_p[0]
    back = np.zeros((len(log_p), len(tags)), dtype=np.int64)
    for word in range(1, len(log_p)):
        candidates = score[:, None] + barrier
        back[word] = candidates.argmax(axis=0)
        score = candidates.max(axis=0) + log_p[word]
    path = [int(score.argmax())]
    for word in range(len(log_p) - 1, 0, -1):
        path.append(int(back[word, path[-1]]))
    return path[::-1]


def word_predictions(words: Words, logits: np.ndarray, tags: list[str]) -> tuple[list[str], list[float]]:
    """Each word's decoded tag and its probability, from a text's token logits `[sequence, tags]`."""
    probabilities = softmax(np.asarray(logits, dtype=np.float64))[words.first_piece]
    path = viterbi_tags(probabilities, tags)
    return [tags[i] for i in path], [float(probabilities[w, i]) for w, i in enumerate(path)]


def decode_entities(text: str, words: Words, logits: np.ndarray, tags: list[str]) -> list[dict[str, Any]]:
    """Entities `{start, end, label, score}` of one text from its token logits `[sequence, tags]`, in text order."""
    entities: list[dict[str, Any]] = []
    scores: list[float] = []
    for (start, end), tag, score in zip(words.offsets, *word_predictions(words, logits, tags), strict=True):
        if tag == "O":
            continue
        if tag.startswith("I-") and entities:
            entities[-1]["end"] = end
            scores.append(score)
            entities[-1]["score"] = float(np.mean(scores))
            continue
        scores = [score]
        entities.append({"start": start, "end": end, "label": tag[2:], "score": score})
    return _on_graphemes(text, entities)


def _on_graphemes(text: str, entities: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Widen each entity to whole characters: a tokenizer that strips accents maps `e` + U+0301 to `e` alone."""
    if not entities:
        return entities
    edges = [0, *(match.end() for match in _GRAPHEME.finditer(text))]
    for entity in entities:
        entity["start"] = max(edge for edge in edges if edge <= entity["start"])
        entity["end"] = min(edge for edge in edges if edge >= entity["end"])
    return entities
