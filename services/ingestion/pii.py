"""PII redaction for text items: e-mail addresses, phone numbers, payment card numbers and IBANs.

Card numbers are redacted only when they pass the Luhn check and IBANs only when they pass ISO 13616's
mod-97 check, so order numbers and other digit runs survive. Each kind is replaced by a typed placeholder
(`[EMAIL]`, `[PHONE]`, `[CARD]`, `[IBAN]`) and counted, so the item records what was removed.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
PHONE = re.compile(r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){2,4}(?!\w)")


@dataclass
class Redaction:
    text: str
    counts: dict[str, int] = field(default_factory=dict)


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


def redact(text: str) -> Redaction:
    counts: Counter[str] = Counter()

    def substitute(pattern: re.Pattern[str], kind: str, placeholder: str, valid=None) -> None:
        nonlocal text

        def replace(match: re.Match[str]) -> str:
            value = match.group(0)
            if valid is not None and not valid(value):
                return value
            counts[kind] += 1
            return placeholder

        text = pattern.sub(replace, text)

    # Order matters: IBANs and cards contain digit runs a phone pattern would also match.
    substitute(EMAIL, "email", "[EMAIL]")
    substitute(IBAN, "iban", "[IBAN]", iban_valid)
    substitute(CARD, "card", "[CARD]", lambda v: luhn_valid(re.sub(r"\D", "", v)))
    substitute(PHONE, "phone", "[PHONE]", lambda v: 7 <= len(re.sub(r"\D", "", v)) <= 15)
    return Redaction(text=text, counts=dict(counts))
