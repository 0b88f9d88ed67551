"""The evaluation set's input statistics (the baseline of inference's input drift), measured as inference
measures each prediction's, and their optional place in the evaluation report."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer

from services.training.evaluate import INPUT_STATS_BATCH, input_statistics
from shared.artifacts import EvaluationReport
from tests.inference.support import TOKENIZER_DIR

MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def test_text_statistics_count_characters_tokens_and_unknown_tokens_per_item() -> None:
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.enable_truncation(32)
    texts = ["a wonderful film", "a wonderful \u2603 \u265e film"] * (INPUT_STATS_BATCH // 2 + 3)  # two batches

    def feeds_of(start: int, stop: int) -> dict[str, np.ndarray]:
        tokenizer.enable_padding()
        encodings = tokenizer.encode_batch(texts[start:stop])
        return {
            "input_ids": np.asarray([e.ids for e in encodings]),
            "attention_mask": np.asarray([e.attention_mask for e in encodings]),
        }

    contents = [text.encode() for text in texts]
    stats = input_statistics({"kind": "text"}, contents, feeds_of, tokenizer.token_to_id("[UNK]"))
    assert len(stats["chars"]) == len(texts)
    # [CLS] a wonderful film [SEP]; [CLS] a wonderful [UNK] [UNK] film [SEP]
    assert stats["chars"][:2] == [16.0, 20.0] and stats["tokens"][:2] == [5.0, 7.0]
    assert stats["unknown_rate"][:2] == [0.0, round(2 / 7, 6)]
    assert stats["tokens"][-2:] == [5.0, 7.0]  # the padding of a batch is not counted


def png(colour: tuple[int, int, int], size: tuple[int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_image_statistics_are_the_stored_size_and_the_mean_pixel_after_resizing() -> None:
    images = [png((255, 255, 255), (40, 30)), png((0, 0, 0), (8, 8)), png((255, 0, 0), (16, 12))]

    def feeds_of(start: int, stop: int) -> dict[str, np.ndarray]:  # resized to 4x4 and normalised, as served
        pixels = [
            np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((4, 4)), dtype=np.float32) / 255.0
            for data in images[start:stop]
        ]
        chw = np.stack(pixels).transpose(0, 3, 1, 2)
        return {"pixels": (chw - np.reshape(MEAN, (1, 3, 1, 1))) / np.reshape(STD, (1, 3, 1, 1))}

    stats = input_statistics({"kind": "image", "mean": MEAN, "std": STD, "size": [4, 4]}, images, feeds_of)
    assert stats["width"] == [40.0, 8.0, 16.0] and stats["height"] == [30.0, 8.0, 12.0]
    assert stats["brightness"] == pytest.approx([1.0, 0.0, 1 / 3], abs=1e-5)


def test_the_report_carries_input_statistics_and_older_reports_load_without() -> None:
    report = {
        "evaluation_set": {"snapshot_id": "snp_1", "split": "test", "items": 1, "sha256": "0" * 64},
        "labels": ["neg", "pos"],
        "item_ids": ["itm_1"],
        "y_true": [1],
        "candidate": {"predictions": [1], "confidences": [0.9], "metrics": {"accuracy": 1.0}},
    }
    assert EvaluationReport().load(report)["input_stats"] is None
    stats = {"chars": [16.0], "tokens": [5.0], "unknown_rate": [0.0]}
    assert EvaluationReport().load({**report, "input_stats": stats})["input_stats"] == stats
    assert EvaluationReport().validate({**report, "input_stats": {"chars": ["long"]}})
