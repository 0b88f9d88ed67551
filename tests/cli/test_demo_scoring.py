"""The demo's entity scoring: exact offsets and type count, micro over sentences, as seqeval's strict mode."""

from __future__ import annotations

from seqeval.metrics import f1_score

from cli.demo import entity_f1


def span(start: int, end: int, label: str) -> dict:
    return {"start": start, "end": end, "label": label}


def test_entity_f1_counts_only_exact_offsets_and_type() -> None:
    truth = [[span(0, 3, "PER"), span(10, 16, "LOC")], [span(4, 9, "ORG")], []]
    found = [[span(0, 3, "PER"), span(10, 15, "LOC")], [span(4, 9, "PER")], [span(0, 2, "LOC")]]
    # one hit of three true and four found entities: P 1/4, R 1/3, F1 2/7
    assert entity_f1(truth, found) == 2 / 7
    assert entity_f1(truth, truth) == 1.0
    assert entity_f1(truth, [[], [], []]) == 0.0


def test_it_agrees_with_seqeval_strict_on_word_tags() -> None:
    # "Ada Lovelace met Bob in Paris": words at offsets, BIO tags per word.
    words = [(0, 3), (4, 12), (13, 16), (17, 20), (21, 23), (24, 29)]
    true_tags = ["B-PER", "I-PER", "O", "B-PER", "O", "B-LOC"]
    found_tags = ["B-PER", "O", "O", "B-PER", "O", "B-ORG"]

    def spans(tags: list[str]) -> list[dict]:
        out: list[dict] = []
        for (start, end), tag in zip(words, tags, strict=True):
            if tag.startswith("B-"):
                out.append(span(start, end, tag[2:]))
            elif tag.startswith("I-"):
                out[-1]["end"] = end
        return out

    assert entity_f1([spans(true_tags)], [spans(found_tags)]) == f1_score([true_tags], [found_tags], mode="strict")
