"""Entity spans of token_classification items: what a valid span is, and CoNLL-style BIO files read as spans.

Offsets are Unicode code points: `text[start:end]` in Python, `[...text].slice(start, end)` in JavaScript, not
JavaScript's own UTF-16 `text.slice` (an emoji outside the Basic Multilingual Plane is one code point and two
UTF-16 units). UTF-8 bytes never enter into it: the stored content is the text's UTF-8 encoding, and a span
names code points of the decoded text, so no span can cut a UTF-8 sequence. What a code point offset can still
cut is a user-perceived character made of several code points (an accent written as a combining mark after its
letter, an emoji with a skin-tone modifier or joined by ZWJ, a flag): a span boundary must fall on a grapheme
cluster boundary (Unicode's extended grapheme clusters, `regex`'s `\\X`), else the span is refused.

Structural errors (order, bounds, overlap, a cut character) are field errors of the item (422, naming
`spans.<i>.<field>`); an entity label outside the dataset's set rejects the item as an unknown class label does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shared.entities import canonical_spans, span_errors

__all__ = ["MAX_SPANS", "canonical", "conll_sentences", "span_errors", "unknown_label"]

MAX_SPANS = 1000


def unknown_label(spans: list[dict[str, Any]] | None, labels: set[str]) -> str | None:
    """The rejection reason when a span's label is not one of the dataset's entity labels, else None."""
    for index, span in enumerate(spans or []):
        if span["label"] not in labels:
            return f"spans.{index}.label: {span['label']!r} is not in the dataset's label set"
    return None


def canonical(spans: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Spans in text order, with exactly the keys start, end, label (None stays None: an unlabeled item)."""
    return None if spans is None else canonical_spans(spans)


# -------------------------------------------------------------------------------------------- CoNLL BIO


class ConllError(ValueError):
    """A malformed line of a CoNLL file; its message names the line."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line


@dataclass
class ConllSentence:
    line: int
    """The file line the sentence starts on (1-based), which errors and import records name."""
    text: str
    spans: list[dict[str, Any]]


def conll_sentences(lines: Iterator[tuple[int, str]]) -> Iterator[ConllSentence | ConllError]:
    """Sentences of a CoNLL-style file: one `token ... tag` per line (the tag is the last column, IOB2 `B-PER`,
    `I-PER`, `O`, or IOB1 where an `I-` may open an entity), sentences separated by blank lines, `-DOCSTART-`
    lines skipped. Tokens are joined by one space; spans are the character offsets of the entities in that text.
    A sentence with a bad line is yielded as its ConllError, and reading goes on with the next sentence."""
    tokens: list[tuple[str, str]] = []
    first_line = 0
    broken: ConllError | None = None
    for number, raw in lines:
        line = raw.strip()
        if not line or line.startswith("-DOCSTART-"):
            if tokens or broken:
                yield broken or _sentence(first_line, tokens)
            tokens, broken = [], None
            continue
        if not tokens and broken is None:
            first_line = number
        if broken is not None:
            continue
        columns = line.split()
        tag = columns[-1] if len(columns) >= 2 else ""
        if len(columns) < 2 or not (tag == "O" or (tag[:2] in {"B-", "I-"} and len(tag) > 2)):
            broken = ConllError(number, "expected 'token tag' with a tag O, B-<label> or I-<label>")
            continue
        tokens.append((columns[0], tag))
    if tokens or broken:
        yield broken or _sentence(first_line, tokens)


def _sentence(line: int, tokens: list[tuple[str, str]]) -> ConllSentence:
    words: list[str] = []
    spans: list[dict[str, Any]] = []
    position = 0
    current: dict[str, Any] | None = None
    for word, tag in tokens:
        start = position + (1 if words else 0)
        words.append(word)
        position = start + len(word)
        kind, label = (tag[:1], tag[2:]) if tag != "O" else ("O", None)
        if kind == "I" and current is not None and current["label"] == label:
            current["end"] = position
            continue
        current = None
        if label is not None:
            current = {"start": start, "end": position, "label": label}
            spans.append(current)
    return ConllSentence(line, " ".join(words), spans)
