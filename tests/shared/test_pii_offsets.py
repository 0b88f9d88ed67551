"""Where redaction put each replacement (`shared.pii.Redaction.replaced`), so that entity offsets into the original
text can be moved onto the redacted one, for both detectors."""

from __future__ import annotations

import re

import pytest

from shared.pii import moved_span, redact

TEXT = "Zoë wrote to jane.doe@example.com, then paid with 4111 1111 1111 1111 in Paris; call +1 212-555-0123 now"


@pytest.mark.parametrize("detector", ["presidio", "regex"])
def test_every_word_outside_what_was_removed_moves_onto_the_same_characters(detector: str) -> None:
    redaction = redact(TEXT, detector)
    assert redaction.counts and len(redaction.replaced) == sum(redaction.counts.values())
    assert redaction.text.startswith("Zoë wrote to [EMAIL], then paid with [CARD] in Paris")
    for start, end, placeholder_start, placeholder_end in redaction.replaced:
        assert redaction.text[placeholder_start:placeholder_end] in {"[EMAIL]", "[CARD]", "[PHONE]"}
        assert TEXT[start:end] not in redaction.text
    kept = dropped = 0
    for word in re.finditer(r"\w+", TEXT):
        moved = redaction.moved(word.start(), word.end())
        if moved is None:
            dropped += 1
            assert any(start < word.end() and word.start() < end for start, end, *_ in redaction.replaced)
            continue
        kept += 1
        assert redaction.text[moved[0] : moved[1]] == word.group()
        assert moved_span(redaction.replaced, *moved, back=True) == (word.start(), word.end())
    assert kept == len(re.findall(r"\w+", "Zoë wrote to then paid with in Paris call now")) and dropped > 0


def test_an_unchanged_text_moves_nothing() -> None:
    redaction = redact("Zoë lives in Paris", "regex")
    assert redaction.text == "Zoë lives in Paris" and redaction.replaced == []
    assert redaction.moved(13, 18) == (13, 18)
