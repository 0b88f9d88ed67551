"""A model version folder scored as it is served: its `model.onnx` in ONNX Runtime on the CPU, fed the inputs
its own `metadata.json` says to build.

Both sides of a comparison go through here: the candidate from the folder export has just verified, and the
production version from its downloaded, verified artifacts. The inputs come from the folder's preprocessing spec,
built by the code that built them during training and export's parity check: for text, the tokenizer saved in
the folder, text lowercased when the spec says so, truncated at its `max_length` and padded to the batch's
longest item (`text_model.TextCollator`); for images, decoded with EXIF orientation to RGB, resized bilinearly to
the spec's size and normalised with its mean and std (`image_model.decode_rgb`, `image_model.eval_transform`).
A token-classification folder (`served_token_predictions`) is fed its texts as inference's `:predict` feeds them
(its own tokenizer, not lower-cased first, truncated at `max_length`, padded to the batch's longest) and its logits
are decoded by the rule its metadata records, which must be `shared.entities.DECODING_RULE`.
What does not fit (a spec, tokenizer or graph this cannot feed) raises `Unscorable` with the reason.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from services.training.data import Example
from services.training.evaluate import softmax
from services.training.export import MODEL_FILE, OUTPUT_NAME, onnx_session
from services.training.image_model import decode_rgb, eval_transform
from services.training.production import ProductionUnscorable, ProductionVersion, fetch_production
from services.training.text_model import TextCollator, load_tokenizer
from shared.entities import DECODING_RULE, Words, decode_entities, tag_set, word_predictions
from shared.logging import get_logger

if TYPE_CHECKING:
    from services.training.runs import RunInfo
    from shared.runtime import Runtime

log = get_logger(__name__)
T = TypeVar("T")

BATCH_SIZE = 32
ORT_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32}

Inputs = Callable[[list[Example]], dict[str, np.ndarray]]


class Unscorable(Exception):
    """The folder's model cannot be run as it is served: the reason says why."""


def score_production(
    runtime: Runtime, run: RunInfo, score: Callable[[ProductionVersion], T]
) -> tuple[T | None, str | None]:
    """The run's production version, fetched from the registry into a temporary folder and scored by `score`
    exactly as it is served: (None, None) when nothing is in production, (None, reason) when it cannot be scored."""
    with tempfile.TemporaryDirectory(prefix=f"{run.id}-production-") as tmp:
        try:
            version = fetch_production(
                runtime.settings,
                runtime.storage,
                tenant=run.tenant,
                model_name=run.model_name,
                task_type=run.task_type,
                folder=Path(tmp),
            )
            if version is None:
                log.info("run_production_absent", model_name=run.model_name)
                return None, None
            return score(version), None
        except (ProductionUnscorable, Unscorable) as exc:
            log.warning("run_production_unscorable", model_name=run.model_name, reason=str(exc))
            return None, str(exc)


def served_probabilities(
    folder: Path, metadata: dict[str, Any], examples: list[Example], *, batch_size: int = BATCH_SIZE
) -> np.ndarray:
    """Class probabilities (softmax of the served graph's logits) per example, in order: (items, labels)."""
    labels = metadata["labels"]
    if not examples:
        return np.zeros((0, len(labels)), dtype=np.float64)
    inputs = served_inputs(folder, metadata)
    try:
        session = onnx_session(folder / MODEL_FILE)
    except Exception as exc:
        raise Unscorable(f"ONNX Runtime cannot load its model.onnx: {_describe(exc)}") from exc
    wanted = {tensor.name: tensor.type for tensor in session.get_inputs()}
    output = (metadata.get("outputs") or [{}])[0].get("name", OUTPUT_NAME)
    logits = []
    for start in range(0, len(examples), batch_size):
        feeds = _feeds(inputs(examples[start : start + batch_size]), wanted)
        try:
            [batch] = session.run([output], feeds)
        except Exception as exc:
            raise Unscorable(f"its graph fails on the evaluation inputs: {_describe(exc)}") from exc
        logits.append(np.asarray(batch, dtype=np.float64))
    stacked = np.concatenate(logits)
    if stacked.shape != (len(examples), len(labels)):
        raise Unscorable(f"its graph answers shape {list(stacked.shape)}, not one logit per label ({len(labels)})")
    return softmax(stacked)


def served_token_predictions(
    folder: Path, metadata: dict[str, Any], texts: list[str], *, batch_size: int = BATCH_SIZE
) -> list[tuple[Words, list[str], list[dict[str, Any]]]]:
    """Per text, in order: its tokenizer words, the words' decoded IOB2 tags and the entities (character offsets)."""
    from services.training.token_model import encode, words_of

    tags = list(metadata.get("tags") or [])
    if tags != tag_set(list(metadata.get("labels") or [])):
        raise Unscorable(f"its tags {tags} are not the IOB2 tags over its labels {metadata.get('labels')}")
    if metadata.get("decoding") != DECODING_RULE:
        raise Unscorable("its metadata records another decoding rule than the one this platform applies")
    spec = metadata.get("preprocessing") or {}
    if "tokenizer.json" not in (spec.get("tokenizer_files") or []):
        raise Unscorable("its text preprocessing names no tokenizer.json among tokenizer_files")
    try:
        tokenizer = load_tokenizer(folder)
        max_length = int(spec["max_length"])
        session = onnx_session(folder / MODEL_FILE)
    except Exception as exc:
        raise Unscorable(f"its tokenizer or graph does not load: {_describe(exc)}") from exc
    wanted = {tensor.name: tensor.type for tensor in session.get_inputs()}
    output = (metadata.get("outputs") or [{}])[0].get("name", OUTPUT_NAME)
    answers: list[tuple[Words, list[str], list[dict[str, Any]]]] = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        encoded = encode(tokenizer, batch, max_length)
        built = {name: encoded[name] for name in ("input_ids", "attention_mask")}
        try:
            [logits] = session.run([output], _feeds(built, wanted))
        except Exception as exc:
            raise Unscorable(f"its graph fails on the evaluation inputs: {_describe(exc)}") from exc
        if logits.ndim != 3 or logits.shape[:2] != encoded["input_ids"].shape or logits.shape[2] != len(tags):
            raise Unscorable(f"its graph answers shape {list(logits.shape)}, not [batch, sequence, {len(tags)}]")
        for row, text in enumerate(batch):
            words = words_of(encoded, row)
            answers.append(
                (words, word_predictions(words, logits[row], tags)[0], decode_entities(text, words, logits[row], tags))
            )
    return answers


def served_inputs(folder: Path, metadata: dict[str, Any]) -> Inputs:
    """The function that turns examples into the graph's feeds, as the folder's preprocessing spec says."""
    spec = metadata.get("preprocessing") or {}
    if spec.get("kind") == "text":
        return _text_inputs(folder, spec)
    if spec.get("kind") == "image":
        return _image_inputs(spec, metadata.get("inputs") or [])
    raise Unscorable(f"its preprocessing kind {spec.get('kind')!r} is neither text nor image")


def _text_inputs(folder: Path, spec: dict[str, Any]) -> Inputs:
    if "tokenizer.json" not in (spec.get("tokenizer_files") or []):
        raise Unscorable("its text preprocessing names no tokenizer.json among tokenizer_files")
    try:
        tokenizer = load_tokenizer(folder)
        collator = TextCollator(tokenizer, int(spec["max_length"]))
    except Exception as exc:
        raise Unscorable(f"its tokenizer does not load: {_describe(exc)}") from exc
    lowercase = bool(spec.get("lowercase", True))

    def inputs(examples: list[Example]) -> dict[str, np.ndarray]:
        # As serving reads a stored text: UTF-8, undecodable bytes replaced.
        texts = [example.content.decode("utf-8", errors="replace") for example in examples]
        encoded = collator.encode([text.lower() if lowercase else text for text in texts])
        return {name: tensor.numpy() for name, tensor in encoded.items()}

    return inputs


def _image_inputs(spec: dict[str, Any], declared: list[dict[str, Any]]) -> Inputs:
    if len(declared) != 1:
        raise Unscorable(f"an image model takes one input tensor; its metadata declares {len(declared)}")
    if int(spec.get("channels", 3)) != 3:
        raise Unscorable(f"its images have {spec.get('channels')} channels; only RGB models are scored")
    try:
        height, width = (int(value) for value in spec["size"])
        transform = eval_transform((height, width), list(spec["mean"]), list(spec["std"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise Unscorable(f"its image preprocessing spec is incomplete: {exc}") from exc
    name = declared[0]["name"]

    def inputs(examples: list[Example]) -> dict[str, np.ndarray]:
        return {name: torch.stack([transform(decode_rgb(example)) for example in examples]).numpy()}

    return inputs


def _feeds(built: dict[str, np.ndarray], wanted: dict[str, str]) -> dict[str, np.ndarray]:
    if "token_type_ids" in wanted and "token_type_ids" not in built and "input_ids" in built:
        built["token_type_ids"] = np.zeros_like(built["input_ids"])  # a single segment, as serving feeds it
    missing = sorted(set(wanted) - set(built))
    if missing:
        raise Unscorable(f"its graph wants inputs {missing}, which its preprocessing does not make")
    feeds = {}
    for name, kind in wanted.items():
        if kind not in ORT_TYPES:
            raise Unscorable(f"its graph input {name!r} is a {kind}, which this scorer cannot feed")
        feeds[name] = built[name].astype(ORT_TYPES[kind], copy=False)
    return feeds


def _describe(exc: Exception) -> str:
    return f"{exc.__class__.__name__}: {str(exc)[:300]}"
