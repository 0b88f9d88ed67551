"""What the ingestion benchmark pushes: unique texts, distinct images, and push bodies made of them."""

from __future__ import annotations

import base64
import io
import json
import random
from dataclasses import dataclass

from PIL import Image

from bench.ingestion import LABELS

WORDS = (  # noqa: SIM905 - a paragraph reads better than a 60-item list
    "the a service partner model label review film great terrible plot actor scene pacing slow quick data push "
    "batch item image text quality price delivery support broken works again never always maybe honest value "
    "customer refund package arrived late early kind rude helpful screen battery camera sound music story "
    "ending boring brilliant awful lovely cheap expensive recommend avoid return order size colour fit"
).split()


class TextSource:
    """Unique ~N-character texts: a per-run tag and a counter, then random words."""

    def __init__(self, tag: str, chars: int, seed: int) -> None:
        self.tag = tag
        self.chars = chars
        self.rng = random.Random(seed)  # noqa: S311 - test data, not secrets
        self.count = 0

    def next(self) -> str:
        self.count += 1
        parts = [f"{self.tag}-{self.count:07d}:"]
        length = len(parts[0])
        while length < self.chars:
            word = self.rng.choice(WORDS)
            parts.append(word)
            length += len(word) + 1
        return " ".join(parts)[: self.chars]


class ImageSource:
    """Distinct small PNGs: random RGB pixels (so no two are alike), encoded with Pillow."""

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.rng = random.Random(seed)  # noqa: S311 - test data, not secrets

    def next(self) -> bytes:
        image = Image.frombytes("RGB", (self.size, self.size), self.rng.randbytes(self.size * self.size * 3))
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


@dataclass
class Workload:
    kind: str  # "text" | "image"
    batch_size: int
    batches_per_repeat: int

    @property
    def items_per_repeat(self) -> int:
        return self.batch_size * self.batches_per_repeat


def text_push_body(source: TextSource, size: int) -> bytes:
    items = [{"text": source.next(), "label": LABELS[i % 2]} for i in range(size)]
    return json.dumps({"items": items}).encode()


def image_push_body(source: ImageSource, size: int) -> bytes:
    items = [{"image": base64.b64encode(source.next()).decode("ascii"), "label": LABELS[i % 2]} for i in range(size)]
    return json.dumps({"items": items}).encode()
