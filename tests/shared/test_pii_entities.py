"""A tenant model's entities redacted with presidio's patterns (`shared.pii.redact(..., entities=...)`): typed
placeholders, counts by label, overlapping detections merged into one range, offsets that move."""

from __future__ import annotations

import re

from shared.pii import WITHHELD, redact, redact_entities, withheld

TEXT = "Zoë Ruiz wrote to jane.doe@example.com from Paris"


def test_entities_become_their_label_and_are_counted_beside_the_patterns() -> None:
    redaction = redact(TEXT, entities=[(0, 8, "PER"), (44, 49, "LOC")])
    assert redaction.text == "[PER] wrote to [EMAIL] from [LOC]"
    assert redaction.counts == {"PER": 1, "email": 1, "LOC": 1}
    assert redaction.replaced == [(0, 8, 0, 5), (18, 38, 15, 22), (44, 49, 28, 33)]
    assert redaction.moved(9, 14) == (6, 11)  # "wrote" moved with the shorter placeholder before it
    assert redaction.moved(4, 8) is None


def test_overlapping_detections_become_one_range_typed_by_the_largest() -> None:
    # A tagger's word inside the e-mail address: one range, the e-mail's (it covers more).
    inside = redact(TEXT, entities=[(18, 22, "PER")])
    assert inside.text == "Zoë Ruiz wrote to [EMAIL] from Paris"
    assert inside.counts == {"email": 1}
    # An entity reaching past the e-mail: the union goes, typed by what covers most of it.
    across = redact(TEXT, entities=[(14, 43, "PER")])
    assert across.text == "Zoë Ruiz wrote[PER] Paris"
    assert across.counts == {"PER": 1}
    # Two entities over one name, chained overlaps: one range.
    chained = redact_entities(TEXT, [(0, 5, "PER"), (4, 8, "LOC"), (7, 14, "PER")])
    assert chained.text == "[PER] to jane.doe@example.com from Paris"
    assert chained.replaced == [(0, 14, 0, 5)]


def test_a_withheld_text_keeps_nothing() -> None:
    assert withheld(TEXT).text == WITHHELD
    assert withheld(TEXT).counts == {"withheld": 1}
    assert withheld(TEXT).moved(0, 3) is None


def every_word(text: str) -> list[tuple[int, int, str]]:
    """What a tagger that calls every word a name answers: "[", "PER" and "]" are words to it too."""
    return [(m.start(), m.end(), "PER") for m in re.finditer(r"\w+|[^\w\s]", text)]


def test_redacting_a_redacted_text_again_changes_nothing() -> None:
    once = redact(TEXT, entities=[(0, 3, "PER"), (4, 8, "PER"), (9, 14, "PER"), (44, 49, "PER")])
    assert once.text == "[PER] [PER] [PER] to [EMAIL] from [PER]"
    again = redact(once.text, entities=every_word(once.text))
    assert again.text == "[PER] [PER] [PER] [PER] [EMAIL] [PER] [PER]"  # the two words left, not the placeholders
    assert again.counts == {"PER": 2}
    third = redact(again.text, entities=every_word(again.text))
    assert (third.text, third.counts, third.replaced) == (again.text, {}, [])
