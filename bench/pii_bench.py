"""Precision and recall of the PII detectors (`shared.pii`), per entity type, on a labeled sample made with Faker.

    python -m bench.pii_bench            # 2,000 sentences (about a minute on a 2-core machine)
    python -m bench.pii_bench --quick    # 400 sentences: well under a minute

The sample (seeded, so every run sees the same sentences): sentences built from templates, each carrying zero to
three values Faker makes (locale en_US, Faker's `email`, `phone_number`, `credit_card_number`, `iban`, `ipv4_public`,
`ssn`, `name`), half of them next to a context word ("call", "card", "IBAN", "SSN" ...), half without, and decoys
that are not PII (order numbers, prices, dates, years, versions). Scoring is by span: a detected span of a kind is
a true positive if it overlaps a labeled value of that kind not already matched; otherwise a false positive; a
labeled value nothing of its kind overlaps is a false negative. Person names are labeled but neither detector
looks for them (presidio's person recognizer needs a trained spaCy NER model, which Flywheel does not download):
their recall is the figure that says so. The regex detector's spans are its four patterns run on the original text
in its order (e-mail, IBAN, card, phone), a later match overlapping an earlier one skipped, which is what its
successive substitutions do. Results go to bench/results/pii.json.

    python -m bench.pii_bench --ner          # the tenant-NER detector instead (minutes on CPU: it trains a tagger)
    python -m bench.pii_bench --ner --quick

`--ner` measures a dataset policy's `pii_entities` (a tenant's token model as the PII detector): one MiniLM tagger
trained as tests/tagger.py trains it (the recipe's Trainer, 400 of cli/demo_data.py's faker sentences from
`ENTITY_TEMPLATES`, seed 1, 60 for validation, 3 epochs, max length 48, CPU), then every entity type it predicts
(PER, ORG, LOC, DATE) taken as PII and its entities redacted by `shared.pii.redact_entities` on sentences from the
held-out templates (`HELD_OUT_ENTITY_TEMPLATES`, faker seed 7: no template seen in training). Scored on the
redaction itself: a gold entity counts as redacted when the replaced ranges cover it entirely (recall; `typed`:
covered by ranges of its own type), a replaced range counts as right when a gold entity lies under it (precision;
`typed`: one of its own type), else a false positive. Results go to bench/results/pii_ner.json.
"""

from __future__ import annotations

import argparse
import random
import re
import time
from collections import Counter
from typing import Any

from faker import Faker

from bench.common import write_results
from shared import pii
from shared.tables import print_table

KIND_OF = {entity: kind for entity, (kind, _placeholder) in pii.KINDS.items()}
KINDS = ["email", "phone", "card", "iban", "ip", "national_id", "person"]

WITH_CONTEXT = {
    "email": ["write to {} for the refund", "my email is {}", "contact: {}"],
    "phone": ["call me at {} tonight", "my phone number is {}", "reach me on my mobile {}"],
    "card": ["charged to my credit card {} twice", "card number {} was declined", "visa {} expired"],
    "iban": ["wire it to IBAN {} please", "my bank account {} shows nothing", "iban: {}"],
    "ip": ["the login came from IP {}", "my ip address is {}", "blocked host {}"],
    "national_id": ["my SSN is {}", "social security number {} on file", "ssn {} was rejected"],
    "person": ["{} answered the ticket", "ask {} about it", "signed, {}"],
}
WITHOUT_CONTEXT = ["{} came up again", "see {} in the notes", "{} and nothing else", "re {}"]
DECOYS = [
    "order 12345678 arrived on 2026-03-14",
    "it cost $1,299.99 with 3 items",
    "version 2.4.1 broke the export",
    "the film from 1994 runs 142 minutes",
    "ticket #884213 is still open",
    "room 4312, floor 12",
    "a wonderful film, five stars",
    "shipped in 3-5 business days",
]


def value(fake: Faker, kind: str) -> str:
    return {
        "email": fake.email,
        "phone": fake.phone_number,
        "card": fake.credit_card_number,
        "iban": fake.iban,
        "ip": fake.ipv4_public,
        "national_id": fake.ssn,
        "person": fake.name,
    }[kind]()


def sample(count: int, seed: int = 21) -> list[tuple[str, list[tuple[int, int, str]]]]:
    """`count` sentences, each with its labeled spans (start, end, kind)."""
    fake = Faker("en_US")
    fake.seed_instance(seed)
    rng = random.Random(seed)  # noqa: S311 (a reproducible sample, not a secret)
    sentences = []
    for _ in range(count):
        parts: list[str] = []
        spans: list[tuple[int, int, str]] = []
        length = 0
        for _ in range(rng.randint(0, 3)):
            kind = rng.choice(KINDS)
            template = rng.choice(WITH_CONTEXT[kind] if rng.random() < 0.5 else WITHOUT_CONTEXT)
            text = value(fake, kind)
            before, after = template.split("{}")
            prefix = ("; " if parts else "") + before
            start = length + len(prefix)
            spans.append((start, start + len(text), kind))
            piece = prefix + text + after
            parts.append(piece)
            length += len(piece)
        if rng.random() < 0.6 or not parts:
            piece = ("; " if parts else "") + rng.choice(DECOYS)
            parts.append(piece)
            length += len(piece)
        sentences.append(("".join(parts), spans))
    return sentences


def presidio_spans(text: str) -> list[tuple[int, int, str]]:
    return [(f.start, f.end, KIND_OF[f.kind]) for f in pii.find(text)]


def regex_spans(text: str) -> list[tuple[int, int, str]]:
    checks: list[tuple[re.Pattern[str], str, Any]] = [
        (pii.EMAIL, "email", None),
        (pii.IBAN, "iban", pii.iban_valid),
        (pii.CARD, "card", lambda v: pii.luhn_valid(re.sub(r"\D", "", v))),
        (pii.PHONE, "phone", lambda v: 7 <= len(re.sub(r"\D", "", v)) <= 15),
    ]
    found: list[tuple[int, int, str]] = []
    for pattern, kind, valid in checks:
        for match in pattern.finditer(text):
            if valid is not None and not valid(match.group(0)):
                continue
            if any(match.start() < end and start < match.end() for start, end, _ in found):
                continue
            found.append((match.start(), match.end(), kind))
    return found


def score(sentences: list[tuple[str, list[tuple[int, int, str]]]], detect: Any) -> dict[str, dict[str, Any]]:
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for text, gold in sentences:
        unmatched = list(gold)
        for start, end, kind in detect(text):
            hit = next((g for g in unmatched if g[2] == kind and start < g[1] and g[0] < end), None)
            if hit is None:
                fp[kind] += 1
            else:
                tp[kind] += 1
                unmatched.remove(hit)
        for _start, _end, kind in unmatched:
            fn[kind] += 1
    table = {}
    for kind in KINDS:
        labeled = tp[kind] + fn[kind]
        detected = tp[kind] + fp[kind]
        table[kind] = {
            "labeled": labeled,
            "detected": detected,
            "precision": round(tp[kind] / detected, 3) if detected else None,
            "recall": round(tp[kind] / labeled, 3) if labeled else None,
        }
    return table


# -- the tenant's NER model as the detector (`--ner`) -------------------------------------------------------------


def train_tagger() -> Any:
    """The tagger tests/tagger.py trains (`testkit.tagger`: same data, seeds and recipe): what
    `prepare_token_task` returns, trained."""
    from testkit.tagger import fit_tagger, prepare_tagger, tagger_sentences

    prepared = prepare_tagger(*tagger_sentences())
    fit_tagger(prepared)
    prepared.model.eval()
    return prepared


def redacted_ranges(text: str, detections: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """What `shared.pii` replaces for these detections: `(start, end, type)` in the original text."""
    redaction = pii.redact_entities(text, detections)
    return [
        (start, end, redaction.text[to_start + 1 : to_end - 1]) for start, end, to_start, to_end in redaction.replaced
    ]


def score_redaction(
    sentences: list[tuple[str, list[dict[str, Any]]]], ranges: list[list[tuple[int, int, str]]], types: list[str]
) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for kind in [*types, "all"]:
        gold = covered = covered_typed = detected = right = right_typed = 0
        for (_text, spans), replaced in zip(sentences, ranges, strict=True):
            for span in spans:
                if kind not in ("all", span["label"]):
                    continue
                gold += 1
                covered += _covered(span, replaced)
                covered_typed += _covered(span, [r for r in replaced if r[2] == span["label"]])
            for start, end, label in replaced:
                if kind not in ("all", label):
                    continue
                detected += 1
                under = [s for s in spans if s["start"] < end and start < s["end"]]
                right += bool(under)
                right_typed += any(s["label"] == label for s in under)
        table[kind] = {
            "gold": gold,
            "redacted_ranges": detected,
            "precision": round(right / detected, 3) if detected else None,
            "recall": round(covered / gold, 3) if gold else None,
            "precision_typed": round(right_typed / detected, 3) if detected else None,
            "recall_typed": round(covered_typed / gold, 3) if gold else None,
        }
    return table


def _covered(span: dict[str, Any], replaced: list[tuple[int, int, str]]) -> bool:
    """Whether the replaced ranges cover every character of the span."""
    cursor = span["start"]
    for start, end, _label in sorted(replaced):
        if start <= cursor < end:
            cursor = end
    return cursor >= span["end"]


def main_ner(quick: bool) -> None:
    import torch

    from cli.demo_data import ENTITY_LABELS, HELD_OUT_ENTITY_TEMPLATES, entity_sentences
    from services.training.token_model import predict_entities
    from testkit import tagger

    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    held_out = entity_sentences(100 if quick else 500, seed=7, templates=HELD_OUT_ENTITY_TEMPLATES)
    started = time.perf_counter()
    prepared = train_tagger()
    train_s = time.perf_counter() - started
    texts = [text for text, _spans in held_out]
    started = time.perf_counter()
    found = predict_entities(prepared.model, prepared.tokenizer, texts, prepared.tags, tagger.MAX_LENGTH)
    predict_ms = (time.perf_counter() - started) / len(texts) * 1000
    ranges = [
        redacted_ranges(text, [(e["start"], e["end"], e["label"]) for e in entities])
        for text, entities in zip(texts, found, strict=True)
    ]
    types = list(ENTITY_LABELS)
    table = score_redaction(held_out, ranges, types)
    results = {
        "sentences": len(held_out),
        "templates": "HELD_OUT_ENTITY_TEMPLATES (faker seed 7)",
        "tagger": {
            "base": "all-MiniLM-L6-v2",
            "train": tagger.TRAIN,
            "validation": tagger.VALIDATION,
            "epochs": tagger.EPOCHS,
            "max_length": tagger.MAX_LENGTH,
            "train_s": round(train_s, 1),
            "predict_ms_per_sentence": round(predict_ms, 2),
            "device": "cpu",
        },
        "pii_labels": types,
        "by_type": table,
    }
    print(f"{len(held_out)} held-out sentences; tagger trained in {train_s:.0f} s; {predict_ms:.1f} ms per sentence")
    print_table(
        ["entity", "gold", "redacted ranges", "precision", "recall", "precision (typed)", "recall (typed)"],
        [
            [
                kind,
                t["gold"],
                t["redacted_ranges"],
                t["precision"],
                t["recall"],
                t["precision_typed"],
                t["recall_typed"],
            ]
            for kind, t in table.items()
        ],
        markdown=True,
    )
    write_results("pii_ner", results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 sentences instead of 2,000 (--ner: 100, not 500)")
    parser.add_argument("--ner", action="store_true", help="the tenant-NER detector (trains a MiniLM tagger)")
    args = parser.parse_args()
    if args.ner:
        main_ner(args.quick)
        return
    sentences = sample(400 if args.quick else 2000)
    started = time.perf_counter()
    pii.analyzer()
    build_s = time.perf_counter() - started
    results: dict[str, Any] = {"sentences": len(sentences), "presidio_build_s": round(build_s, 2), "detectors": {}}
    for name, detect in (("presidio", presidio_spans), ("regex", regex_spans)):
        started = time.perf_counter()
        table = score(sentences, detect)
        per_sentence_ms = (time.perf_counter() - started) / len(sentences) * 1000
        results["detectors"][name] = {"per_sentence_ms": round(per_sentence_ms, 3), "by_kind": table}
    rows = []
    for kind in KINDS:
        p, r = results["detectors"]["presidio"]["by_kind"][kind], results["detectors"]["regex"]["by_kind"][kind]
        rows.append([kind, p["labeled"], p["precision"], p["recall"], r["precision"], r["recall"]])
    print(f"{len(sentences)} sentences; presidio analyzer built in {build_s:.1f} s")
    print_table(
        ["entity", "labeled", "presidio precision", "presidio recall", "regex precision", "regex recall"],
        rows,
        markdown=True,
    )
    for name, detector in results["detectors"].items():
        print(f"{name}: {detector['per_sentence_ms']} ms per sentence")
    write_results("pii", results)


if __name__ == "__main__":
    main()
