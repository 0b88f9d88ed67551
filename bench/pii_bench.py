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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="400 sentences instead of 2,000")
    args = parser.parse_args()
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
