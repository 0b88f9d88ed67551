"""A model's own preprocessing, read from its metadata: its tokenizer for texts; decode, resize and normalise
for images. And the one postprocessing step every classifier shares: logits to probabilities and labels.

Inputs a service names by reference instead of sending them (labeling's pre-labels) are read here first: only
from the tenant's own prefix, each checked against its sha256, then taken as the model's kind of input."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tokenizers import Encoding, Tokenizer

from services.inference.batcher import Prepared
from services.inference.sessions import ModelRefused, TensorSpec
from shared.entities import Words, decode_entities, words_from
from shared.errors import NotFound, PayloadTooLarge, Unprocessable
from shared.storage import ObjectNotFound, ObjectStore


class TextPreprocessor:
    kind = "text"

    def __init__(self, folder: Path, spec: dict[str, Any], inputs: list[TensorSpec]) -> None:
        files = spec.get("tokenizer_files") or []
        if "tokenizer.json" not in files:
            raise ModelRefused("invalid_metadata", "text preprocessing needs tokenizer.json among tokenizer_files")
        try:
            self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as exc:
            raise ModelRefused("invalid_tokenizer", f"tokenizer.json does not load: {str(exc)[:300]}") from exc
        self.max_length = int(spec["max_length"])
        self.lowercase = bool(spec.get("lowercase", True))
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.no_padding()
        self.inputs = {tensor.name: tensor for tensor in inputs}
        for required in ("input_ids", "attention_mask"):
            if required not in self.inputs:
                raise ModelRefused("contract_mismatch", f"a text model needs an '{required}' input")

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.prepare(texts).feeds

    def prepare(self, texts: list[str]) -> Prepared:
        """The texts as the graph's feeds, tokenized in one call (the batcher calls it once for all the texts of a
        batch), with each text's token count."""
        encodings = self._encode([text.lower() if self.lowercase else text for text in texts])
        rows = [encoding.ids for encoding in encodings]
        return Prepared(self._feeds(rows), [len(row) for row in rows], [None] * len(rows))

    def _encode(self, texts: list[str]) -> list[Encoding]:
        """The fast tokenizer's batch encode; a text it cannot take (a lone surrogate: not encodable as UTF-8)
        is refused (422), named by its place in `texts` (the batcher retries a failed batch request by request,
        so the place is the request's own)."""
        try:
            return self.tokenizer.encode_batch(texts)
        except (TypeError, ValueError) as exc:
            bad = next((index for index, text in enumerate(texts) if not _encodable(text)), 0)
            raise Unprocessable(
                f"text {bad} could not be tokenized (it is not valid Unicode)",
                {"fields": {"texts": {str(bad): ["not tokenizable"]}}},
            ) from exc

    def _feeds(self, rows: list[list[int]]) -> dict[str, np.ndarray]:
        """The token ids padded to the longest row, with the attention mask (and zero type ids if the graph
        takes them)."""
        length = max(len(row) for row in rows)
        ids = np.zeros((len(rows), length), dtype=self.inputs["input_ids"].dtype)
        mask = np.zeros((len(rows), length), dtype=self.inputs["attention_mask"].dtype)
        for index, row in enumerate(rows):
            ids[index, : len(row)] = row
            mask[index, : len(row)] = 1
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feeds["token_type_ids"] = np.zeros_like(ids, dtype=self.inputs["token_type_ids"].dtype)
        return feeds


class TokenPreprocessor(TextPreprocessor):
    """A token-classification model's tokenizer: the same feeds as for a text classifier, plus each text's words
    (character offsets and first word piece) for decoding entities. The texts are tokenized as sent, never
    lower-cased here: the tokenizer's own normalizer does that, and its offsets must index the original text
    (`str.lower` can change a text's length, `İ` becomes two code points)."""

    def prepare(self, texts: list[str]) -> Prepared:
        """The feeds, each text's token count, and each text's words as the extras."""
        encodings = self._encode(texts)
        rows = [encoding.ids for encoding in encodings]
        words = [words_from(encoding.word_ids, encoding.offsets) for encoding in encodings]
        return Prepared(self._feeds(rows), [len(row) for row in rows], words)


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ImagePreprocessor:
    kind = "image"

    def __init__(self, spec: dict[str, Any], inputs: list[TensorSpec], max_pixels: int) -> None:
        if len(inputs) != 1:
            raise ModelRefused("contract_mismatch", "an image model takes exactly one input tensor")
        self.input = inputs[0]
        height, width = (int(v) for v in spec["size"])
        self.size = (width, height)  # PIL speaks (width, height)
        self.channels = int(spec.get("channels", 3))
        if self.channels not in (1, 3):
            raise ModelRefused("invalid_metadata", f"images with {self.channels} channels are not supported")
        self.mean = np.asarray(spec["mean"][: self.channels], dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(spec["std"][: self.channels], dtype=np.float32).reshape(-1, 1, 1)
        if np.any(self.std == 0):
            raise ModelRefused("invalid_metadata", "image std must not be zero")
        self.max_pixels = max_pixels

    def decode(self, data: bytes, index: int) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.width * image.height > self.max_pixels:
                    raise Unprocessable(f"image {index} is {image.width}x{image.height}, above the pixel limit")
                image = ImageOps.exif_transpose(image)
                image = image.convert("RGB" if self.channels == 3 else "L")
                image = image.resize(self.size, Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
            raise Unprocessable(f"image {index} could not be decoded: {exc}") from exc
        chw = pixels.reshape(self.size[1], self.size[0], self.channels).transpose(2, 0, 1)
        return ((chw - self.mean) / self.std).astype(self.input.dtype, copy=False)

    def __call__(self, images: list[bytes]) -> dict[str, np.ndarray]:
        return {self.input.name: np.stack([self.decode(data, index) for index, data in enumerate(images)])}


def read_stored_inputs(
    storage: ObjectStore, tenant: str, references: list[dict[str, Any]], max_bytes: int
) -> list[bytes]:
    """The bytes of each referenced input, in order. Another tenant's key, or a missing object, answers 404 (as
    another tenant's ids do); bytes that do not match the reference's sha256 are refused (422); together the
    inputs may not exceed `max_bytes`, the limit of a request that sends them inline (413)."""
    for index, reference in enumerate(references):
        if not reference["key"].startswith(f"{tenant}/"):  # tenant ids hold no '/': the prefix is the tenant's
            raise NotFound(f"stored input {index} is not an item of this tenant")
    spans = [_span(storage, index, reference) for index, reference in enumerate(references)]
    if sum(length for _offset, length in spans) > max_bytes:
        raise PayloadTooLarge(f"the stored inputs exceed the {max_bytes}-byte limit of a request")
    contents = []
    for index, (reference, (offset, length)) in enumerate(zip(references, spans, strict=True)):
        with _stored(index):
            data = storage.get_range(reference["bucket"], reference["key"], offset, length)
        if hashlib.sha256(data).hexdigest() != reference["sha256"]:
            raise Unprocessable(
                f"stored input {index} does not match its sha256",
                {"fields": {"references": {str(index): {"sha256": ["does not match the stored bytes"]}}}},
            )
        contents.append(data)
    return contents


def _span(storage: ObjectStore, index: int, reference: dict[str, Any]) -> tuple[int, int]:
    """Where the input lies in its object, as (offset, length); without a length, up to the object's end."""
    offset = reference["offset"] or 0
    if reference["length"] is not None:
        return offset, reference["length"]
    with _stored(index):
        size = storage.stat(reference["bucket"], reference["key"]).size
    return offset, max(0, size - offset)


@contextmanager
def _stored(index: int) -> Iterator[None]:
    try:
        yield
    except ObjectNotFound as exc:
        raise NotFound(f"stored input {index} is not in object storage") from exc


def as_model_inputs(contents: list[bytes], kind: str) -> list[Any]:
    """Stored bytes as a model of `kind` takes them: UTF-8 text (undecodable bytes replaced), or image bytes."""
    return [data.decode("utf-8", errors="replace") for data in contents] if kind == "text" else contents


@dataclass(frozen=True)
class Classification:
    label: str
    confidence: float
    probabilities: dict[str, float]


def entities(texts: list[str], words: list[Words], logits: np.ndarray, tags: list[str]) -> list[list[dict[str, Any]]]:
    """Each text's entities `{start, end, label, score, text}` from its token logits `[batch, sequence, tags]`, by
    the package's decoding rule (`shared.entities`); offsets are code points of the text as sent."""
    found = []
    for text, text_words, row in zip(texts, words, logits, strict=True):
        spans = decode_entities(text, text_words, row, tags)
        found.append(
            [{**span, "score": round(span["score"], 6), "text": text[span["start"] : span["end"]]} for span in spans]
        )
    return found


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def classify(logits: np.ndarray, labels: list[str]) -> list[Classification]:
    probabilities = softmax(logits)
    results = []
    for row in probabilities:
        best = int(row.argmax())
        results.append(
            Classification(
                label=labels[best],
                confidence=float(row[best]),
                probabilities={label: round(float(p), 6) for label, p in zip(labels, row, strict=True)},
            )
        )
    return results
