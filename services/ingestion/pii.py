"""PII redaction for the text items ingestion stores (pushes and imports of a dataset whose `pii_policy` is
`redact`): the detector lives in `shared.pii`, because inference applies the same policy to the predictions it
logs. Presidio's pattern recognizers by default; the regexes ingestion used before remain as `detector="regex"`.
"""

from __future__ import annotations

from shared.pii import Redaction, iban_valid, luhn_valid, redact, redact_with_regexes

__all__ = ["Redaction", "iban_valid", "luhn_valid", "redact", "redact_with_regexes"]
