"""Entity-level consensus and agreement between annotators of token-classification tasks, on hand-made cases."""

from __future__ import annotations

import pytest

from services.labeling.consensus import decide_spans, entity_f1, pairwise_entity_f1

ADA = (0, 12, "PER")
ACME = (20, 24, "ORG")
PARIS = (28, 33, "LOC")
ACME_AS_LOC = (20, 24, "LOC")
ACME_SHORT = (20, 23, "ORG")


def decide(*annotations, required=3, ceiling=5, min_agreement=0.5):
    return decide_spans(list(annotations), required=required, ceiling=ceiling, min_agreement=min_agreement)


def test_a_span_counts_when_a_majority_marks_the_same_offsets_and_label() -> None:
    decision = decide([ADA, ACME], [ADA, ACME, PARIS], [ADA, ACME_AS_LOC])
    # ACME as ORG: 2 of 3; PARIS: 1 of 3 (dropped by 2 of 3); ACME as LOC: 1 of 3 (dropped).
    assert decision.outcome == "consensus"
    assert decision.spans == (ADA, ACME)
    assert decision.agreement == pytest.approx((3 + 2 + 2 + 2) / 12)
    assert decision.disputed == ()


def test_different_offsets_or_labels_are_different_entities() -> None:
    decision = decide([ACME], [ACME_SHORT], [ACME_AS_LOC])
    assert decision.outcome == "consensus" and decision.spans == ()  # each variant was left out by two of three


def test_a_tie_escalates_then_goes_to_review_at_the_ceiling() -> None:
    tied = decide([ADA, ACME], [ADA], required=2, ceiling=4)
    assert tied.outcome == "escalate" and tied.spans is None and tied.disputed == (ACME,)
    settled = decide([ADA, ACME], [ADA], [ADA, ACME], required=3, ceiling=4)
    assert settled.outcome == "consensus" and settled.spans == (ADA, ACME)
    at_ceiling = decide([ADA, ACME], [ADA], [ADA, ACME], [ADA], required=4, ceiling=4)
    assert at_ceiling.outcome == "review" and at_ceiling.disputed == (ACME,)


def test_pending_until_enough_annotations_and_one_annotator_decides_alone() -> None:
    assert decide([ADA], [ADA]).outcome == "pending"
    alone = decide([ADA, PARIS], required=1, ceiling=1)
    assert alone.outcome == "consensus" and alone.spans == (ADA, PARIS)


def test_no_entities_from_everyone_is_a_consensus_on_none() -> None:
    decision = decide([], [], [])
    assert decision.outcome == "consensus" and decision.spans == () and decision.agreement == 1.0


def test_a_stricter_agreement_threshold_disputes_a_two_thirds_majority() -> None:
    decision = decide([ADA, ACME], [ADA, ACME], [ADA], min_agreement=0.7)
    assert decision.outcome == "escalate" and decision.disputed == (ACME,)


def test_pairwise_entity_f1_between_annotators() -> None:
    assert entity_f1([ADA, ACME], [ADA, ACME]) == 1.0
    assert entity_f1([ADA, ACME], [ADA, ACME_AS_LOC]) == pytest.approx(0.5)
    assert entity_f1([ADA], [ADA, ACME, PARIS]) == pytest.approx(0.5)
    assert entity_f1([], []) == 1.0 and entity_f1([ADA], []) == 0.0
    mean, used = pairwise_entity_f1(
        [
            [[ADA, ACME], [ADA, ACME], [ADA]],  # pairs: 1.0, 2/3, 2/3
            [[PARIS], [ACME_SHORT]],  # 0.0
            [[ADA]],  # one annotator: no pair
        ]
    )
    assert used == 2
    assert mean == pytest.approx((1.0 + 2 / 3 + 2 / 3 + 0.0) / 4)
    assert pairwise_entity_f1([[[ADA]]]) == (None, 0)
