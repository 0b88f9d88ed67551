"""JSON from outside the service: parsed as the standard library parses it, except that a document nested deeper
than the parser can follow (Python's recursion limit, about a thousand levels: `[[[[...]]]]` in a few kilobytes)
is malformed JSON, a `json.JSONDecodeError`, instead of a `RecursionError` that every caller would answer as a bug
(a 500, or a failed job). Request bodies, multipart fields and NDJSON lines go through `loads`; Flask's own
`request.get_json` goes through it by way of `JSONProvider`."""

from __future__ import annotations

import json
from typing import Any

from flask.json.provider import DefaultJSONProvider

TOO_DEEP = "nested too deeply to parse"


def loads(data: str | bytes | bytearray, **kwargs: Any) -> Any:
    try:
        return json.loads(data, **kwargs)
    except RecursionError:
        raise json.JSONDecodeError(TOO_DEEP, data if isinstance(data, str) else "", 0) from None


def nests_too_deeply(data: str | bytes) -> bool:
    """Whether `data` is JSON that only fails to parse for its depth (checked again on the error path only)."""
    try:
        json.loads(data)
    except RecursionError:
        return True
    except ValueError:
        return False
    return False


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, with `loads` above: a request's too-deep body is malformed JSON, which `request.get_json`
    answers 400 for (and `get_json(silent=True)` reads as no JSON)."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return loads(s, **kwargs)
