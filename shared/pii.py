"""PII detection and redaction for text, shared by every service that stores text a partner sent.

Two detectors:

- `presidio` (the default): presidio-analyzer's pattern recognizers for e-mail addresses, phone numbers (Google's
  `phonenumbers`), payment cards (Luhn), IBANs (mod 97), IP addresses and national ids (US SSN, UK NHS number),
  scored and raised by context words ("call", "card", "iban", "ssn" ... near the match). It runs offline: the NLP
  engine is a blank spaCy pipeline (a tokenizer, and a component that uses each lower-cased token as its lemma, so
  context words can match), never a downloaded model, and the e-mail recognizer's domain check reads tldextract's
  bundled suffix list instead of fetching it.
- `regex`: the four regular expressions Flywheel used before (e-mail, phone, Luhn-valid card, mod-97 IBAN), kept
  for comparison (`bench/pii_bench.py`) and as a fallback.

Each detected span is replaced by a typed placeholder (`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`, `[IP]`,
`[NATIONAL_ID]`) and counted by kind, so what stores the text can record what was removed. The redaction also
says where each replacement went (`Redaction.replaced`), so that offsets into the original text (entity spans)
can be moved onto the redacted one (`moved_span`), or found to overlap what was removed.

A third source joins presidio's patterns where a dataset's policy names one: the entities a token-classification
model of the tenant's found in the text (`redact(text, entities=[(start, end, label), ...])`), each replaced by its
label as a placeholder (`[PER]`, `[LOC]` ...) and counted under its label. Overlapping detections are merged into
one replaced range covering all of them (no character of any detection survives), typed by the detection that
covers the most characters of it (a pattern's on a tie: it was validated, a Luhn or mod-97 check, say).
`withheld` is what stores a text no detector could scan when the policy needed one: nothing of it.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

KINDS = {
    "EMAIL_ADDRESS": ("email", "[EMAIL]"),
    "PHONE_NUMBER": ("phone", "[PHONE]"),
    "CREDIT_CARD": ("card", "[CARD]"),
    "IBAN_CODE": ("iban", "[IBAN]"),
    "IP_ADDRESS": ("ip", "[IP]"),
    "US_SSN": ("national_id", "[NATIONAL_ID]"),
    "UK_NHS": ("national_id", "[NATIONAL_ID]"),
}
SCORE_THRESHOLD = 0.4
"""Presidio's phone recognizer scores a valid number 0.4 without context; context words raise any match by 0.35.
Weaker matches (an IP-looking version string scores 0.6, so it still counts) are kept out below this."""

DETECTORS = ("presidio", "regex")

WITHHELD = "[WITHHELD]"
"""The whole stored text when the detector the policy needs (the tenant's model) could not run on it."""

Detection = tuple[int, int, str]
"""An entity a tenant's token model found: `(start, end, label)` in code points of the text."""


Replacement = tuple[int, int, int, int]
"""One replaced range: its `(start, end)` in the original text, then its placeholder's `(start, end)` in the
redacted text (code points)."""


@dataclass
class Redaction:
    text: str
    counts: dict[str, int] = field(default_factory=dict)
    replaced: list[Replacement] = field(default_factory=list)
    """The replaced ranges in text order (empty: the text is unchanged)."""

    def moved(self, start: int, end: int) -> tuple[int, int] | None:
        """Where the original `text[start:end]` lies in the redacted text; None if it overlaps a replaced range."""
        return moved_span(self.replaced, start, end)


def moved_span(replaced: list[Replacement], start: int, end: int, *, back: bool = False) -> tuple[int, int] | None:
    """`[start, end)` of the original text moved onto the redacted one (`back`: of the redacted text moved back onto
    the original), or None when it overlaps a replaced range (in the direction read)."""
    shift = 0
    for replacement in replaced:
        from_start, from_end, _, to_end = (*replacement[2:], *replacement[:2]) if back else replacement
        if from_end <= start:
            shift = to_end - from_end
        elif from_start >= end:
            break
        else:
            return None
    return start + shift, end + shift


@dataclass(frozen=True)
class Finding:
    start: int
    end: int
    kind: str
    score: float


# -- the regex detector (Flywheel's first) -------------------------------------------------------------------

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){2,4}(?!\w)")


def luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def iban_valid(candidate: str) -> bool:
    compact = candidate.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    numeric = "".join(str(int(char, 36)) for char in rearranged)
    return int(numeric) % 97 == 1


def redact_with_regexes(text: str) -> Redaction:
    counts: Counter[str] = Counter()
    original = text
    found: list[tuple[int, int, str]] = []  # replaced ranges of the original text, with their placeholders

    def substitute(pattern: re.Pattern[str], kind: str, placeholder: str, valid=None) -> None:
        nonlocal text, found
        now = _replacements(found)
        chosen: list[tuple[int, int, str]] = []
        for match in pattern.finditer(text):
            if valid is not None and not valid(match.group(0)):
                continue
            counts[kind] += 1
            # the match in the original text's offsets: a placeholder it covers is taken whole
            start = _original_offset(now, match.start(), end=False)
            chosen.append((start, _original_offset(now, match.end(), end=True), placeholder))
        found = sorted([kept for kept in found if not any(kept[0] < c[1] and c[0] < kept[1] for c in chosen)] + chosen)
        text = _rebuilt(original, found)

    # Order matters: IBANs and cards contain digit runs a phone pattern would also match.
    substitute(EMAIL, "email", "[EMAIL]")
    substitute(IBAN, "iban", "[IBAN]", iban_valid)
    substitute(CARD, "card", "[CARD]", lambda v: luhn_valid(re.sub(r"\D", "", v)))
    substitute(PHONE, "phone", "[PHONE]", lambda v: 7 <= len(re.sub(r"\D", "", v)) <= 15)
    return Redaction(text=text, counts=dict(counts), replaced=_replacements(found))


def _replacements(found: list[tuple[int, int, str]]) -> list[Replacement]:
    """Replaced ranges of the original text (in order, with their placeholders) as `Replacement`s."""
    replaced: list[Replacement] = []
    shift = 0
    for start, end, placeholder in found:
        replaced.append((start, end, start + shift, start + shift + len(placeholder)))
        shift += len(placeholder) - (end - start)
    return replaced


def _original_offset(replaced: list[Replacement], offset: int, *, end: bool) -> int:
    """An offset of the redacted text in the original's; inside a placeholder, that placeholder's edge."""
    shift = 0
    for start, stop, new_start, new_end in replaced:
        if new_end <= offset:
            shift = stop - new_end
        elif new_start < offset:
            return stop if end else start
        else:
            break
    return offset + shift


def _rebuilt(original: str, found: list[tuple[int, int, str]]) -> str:
    pieces, cursor = [], 0
    for start, end, placeholder in found:
        pieces += [original[cursor:start], placeholder]
        cursor = end
    pieces.append(original[cursor:])
    return "".join(pieces)


# -- the presidio detector -----------------------------------------------------------------------------------

_analyzer: Any = None
_analyzer_lock = threading.Lock()


def _build_analyzer() -> Any:
    import spacy
    import tldextract
    from presidio_analyzer import AnalyzerEngine, Pattern, RecognizerRegistry
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from presidio_analyzer.predefined_recognizers import (
        CreditCardRecognizer,
        EmailRecognizer,
        IbanRecognizer,
        IpRecognizer,
        NhsRecognizer,
        PhoneRecognizer,
        UsSsnRecognizer,
    )
    from spacy.language import Language

    if "flywheel_lower_lemma" not in Language.factories:

        @Language.component("flywheel_lower_lemma")
        def lower_lemma(doc: Any) -> Any:
            # Presidio matches context words against lemmas; a blank pipeline has none, so each word is its own.
            for token in doc:
                token.lemma_ = token.lower_
            return doc

    class BlankSpacyEngine(SpacyNlpEngine):
        """Presidio's spaCy engine over `spacy.blank("en")`: tokens and lemmas, no model to download."""

        def load(self) -> None:
            nlp = spacy.blank("en")
            nlp.add_pipe("flywheel_lower_lemma")
            self.nlp = {"en": nlp}

    any_card = Pattern("Any card number (Luhn-checked)", r"(?<![\d-])(?:\d[ -]?){11,18}\d(?![\d-])", 0.3)
    offline_domains = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str) -> bool:
            return offline_domains(pattern_text).fqdn != ""

    engine = BlankSpacyEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    engine.load()
    registry = RecognizerRegistry(supported_languages=["en"])
    for recognizer in (
        OfflineEmailRecognizer(),
        # Leniency 1 (VALID numbers of their region): leniency 0 finds almost every phone but takes SSNs, IPs
        # and card numbers for phones (precision 0.24 against 1.0 in bench/pii_bench.py).
        PhoneRecognizer(),
        # Presidio's card pattern misses issuers whose numbers start with 2 (Mastercard 2221-2720) and 12-digit or
        # 19-digit numbers (Maestro, some Visa): any 12-19 digit run, kept only when it passes the Luhn check.
        CreditCardRecognizer(patterns=[*CreditCardRecognizer.PATTERNS, any_card]),
        IbanRecognizer(),
        IpRecognizer(),
        UsSsnRecognizer(),
        NhsRecognizer(),
    ):
        registry.add_recognizer(recognizer)
    return AnalyzerEngine(nlp_engine=engine, registry=registry, supported_languages=["en"])


def analyzer() -> Any:
    """The process's presidio analyzer, built on first use (about a second) and shared by threads."""
    global _analyzer
    if _analyzer is None:
        with _analyzer_lock:
            if _analyzer is None:
                _analyzer = _build_analyzer()
    return _analyzer


def find(text: str) -> list[Finding]:
    """Non-overlapping PII spans in `text`, by presidio: the stronger (then the longer) of two overlapping wins."""
    results = analyzer().analyze(text, language="en", entities=list(KINDS), score_threshold=SCORE_THRESHOLD)
    ranked = sorted(results, key=lambda r: (-r.score, -(r.end - r.start), r.start))
    chosen: list[Finding] = []
    for result in ranked:
        if any(result.start < kept.end and kept.start < result.end for kept in chosen):
            continue
        chosen.append(Finding(result.start, result.end, result.entity_type, result.score))
    return sorted(chosen, key=lambda finding: finding.start)


def redact_with_presidio(text: str, entities: Sequence[Detection] = ()) -> Redaction:
    """Presidio's findings and the given entities, merged where they overlap, each range replaced once."""
    detected = [(f.start, f.end, *KINDS[f.kind], 1) for f in find(text)]
    detected += [(start, end, label, f"[{label}]", 0) for start, end, label in entities if 0 <= start < end]
    return _redacted(text, detected)


def redact_entities(text: str, entities: Sequence[Detection]) -> Redaction:
    """Only the given entities replaced (what `bench/pii_bench.py --ner` scores alone)."""
    return _redacted(text, [(start, end, label, f"[{label}]", 0) for start, end, label in entities if start < end])


PLACEHOLDER = re.compile(r"\[[A-Z][A-Z0-9_]*\]")
"""What a redaction writes in place of PII (`[EMAIL]`, `[PER]`, `[WITHHELD]`...)."""


def _redacted(text: str, detected: list[tuple[int, int, str, str, int]]) -> Redaction:
    """`detected`: `(start, end, kind, placeholder, rank)`; overlapping ones become one range (their union), typed by
    the one covering most of it, the higher rank on a tie. A detection inside a placeholder of an earlier redaction
    is not one: a tagger may call `[PER]` a name, and redacting a redacted text again must change nothing (a task
    redacted when it was made, then again when the policy's change reaches the queue)."""
    placeholders = [match.span() for match in PLACEHOLDER.finditer(text)]
    if placeholders:
        detected = [d for d in detected if not any(start <= d[0] and d[1] <= end for start, end in placeholders)]
    counts: Counter[str] = Counter()
    found: list[tuple[int, int, str]] = []
    for group in _overlapping(sorted(detected)):
        start, end = group[0][0], max(d[1] for d in group)
        _, _, kind, placeholder, _ = max(group, key=lambda d: (min(d[1], end) - d[0], d[4]))
        found.append((start, end, placeholder))
        counts[kind] += 1
    return Redaction(text=_rebuilt(text, found), counts=dict(counts), replaced=_replacements(found))


def _overlapping(detected: list[tuple[int, int, str, str, int]]) -> list[list[tuple[int, int, str, str, int]]]:
    """Sorted detections grouped into runs that overlap one another (transitively)."""
    groups: list[list[tuple[int, int, str, str, int]]] = []
    reach = -1
    for detection in detected:
        if groups and detection[0] < reach:
            groups[-1].append(detection)
            reach = max(reach, detection[1])
        else:
            groups.append([detection])
            reach = detection[1]
    return groups


def withheld(text: str) -> Redaction:
    """Nothing of the text: what is stored when the policy's model could not scan it (fail closed)."""
    if not text:
        return Redaction(text=text)
    return Redaction(text=WITHHELD, counts={"withheld": 1}, replaced=[(0, len(text), 0, len(WITHHELD))])


def redact(text: str, detector: str = "presidio", entities: Sequence[Detection] = ()) -> Redaction:
    """The text with its PII replaced: `detector`'s patterns, and the `entities` a tenant's model found (presidio
    only: the regex detector is kept for comparison)."""
    if detector == "regex":
        if entities:
            raise ValueError("entities combine with the presidio detector only")
        return redact_with_regexes(text)
    if detector != "presidio":
        raise ValueError(f"unknown PII detector {detector!r}; one of {DETECTORS}")
    return redact_with_presidio(text, entities)
