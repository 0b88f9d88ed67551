"""Token classification: BIO tags on first word pieces, MiniLM fine-tuned by the shared recipe on synthetic
sentences and scored with seqeval on sentences from templates it never saw, and its ONNX export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli.demo_data import ENTITY_LABELS, HELD_OUT_ENTITY_TEMPLATES, entity_sentences
from services.training.base_models import MINILM, TEXT_ENCODERS
from services.training.evaluate import entity_report
from services.training.export import METADATA_FILE, MODEL_FILE, onnx_session
from services.training.text_model import load_tokenizer
from services.training.token_export import export_token_model
from services.training.token_model import (
    IGNORED,
    TokenCollator,
    TokenItem,
    decode_entities,
    encode,
    evaluate_entities,
    predict_entities,
    tag_set,
    words_of,
)
from shared.artifacts import ModelMetadata
from tests.tagger import trained_tagger

TAGS = tag_set(list(ENTITY_LABELS))
MAX_LENGTH = 48
ENTITY_F1_FLOOR = 0.90


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TEXT_ENCODERS[MINILM]())


def test_tags_go_on_the_first_word_piece_and_the_rest_are_ignored(tokenizer) -> None:
    text = "Ada Lovelace joined Ünïcorn GmbH in Zürich"
    spans = [
        {"start": 0, "end": 12, "label": "PER"},
        {"start": 20, "end": 32, "label": "ORG"},
        {"start": 36, "end": 42, "label": "LOC"},
    ]
    batch = TokenCollator(tokenizer, TAGS, MAX_LENGTH)([TokenItem(text, spans), TokenItem("in", [])])
    pieces = tokenizer.convert_ids_to_tokens(batch["input_ids"][0].tolist())
    labels = batch["labels"].reshape(batch["input_ids"].shape)[0].tolist()
    tagged = [(piece, TAGS[label] if label != IGNORED else None) for piece, label in zip(pieces, labels, strict=True)]
    assert tagged[0] == ("[CLS]", None) and tagged[-1] == ("[SEP]", None)
    words = [(piece, tag) for piece, tag in tagged if tag is not None]
    assert [tag for _, tag in words] == ["B-PER", "I-PER", "O", "B-ORG", "I-ORG", "O", "B-LOC"]
    continuations = [piece for piece, tag in tagged if tag is None and piece.startswith("##")]
    assert continuations  # "lovelace" and friends split into pieces: only the first one carries the tag
    padding = batch["labels"].reshape(batch["input_ids"].shape)[1]
    assert (padding[batch["attention_mask"][1] == 0] == IGNORED).all()


def test_decoding_gives_character_offsets_on_whole_characters(tokenizer) -> None:
    text = "Rene\u0301 Dubois 👍🏽 vit à 東京"
    encoded = encode(tokenizer, [text], MAX_LENGTH)
    words = words_of(encoded, 0)
    wanted = {0: "B-PER", 1: "I-PER", 5: "B-LOC", 6: "I-LOC"}  # 東 and 京 are a word each for the tokenizer
    logits = np.full((encoded["input_ids"].shape[1], len(TAGS)), -5.0)
    for word, position in enumerate(words.first_piece):
        logits[position, TAGS.index(wanted.get(word, "O"))] = 5.0
    entities = decode_entities(text, words, logits, TAGS)
    assert [(text[e["start"] : e["end"]], e["label"]) for e in entities] == [
        ("Rene\u0301 Dubois", "PER"),
        ("東京", "LOC"),
    ]
    assert all(0.99 < e["score"] <= 1.0 for e in entities)


def test_decoding_keeps_a_multi_word_entity_whole_when_its_words_disagree(tokenizer) -> None:
    text = "Velez Henderson hired Ada"
    encoded = encode(tokenizer, [text], MAX_LENGTH)
    words = words_of(encoded, 0)
    leaning = [{"B-LOC": 0.5, "B-ORG": 0.4}, {"I-ORG": 0.9}, {"O": 0.9}, {"B-PER": 0.9}]
    logits = np.full((encoded["input_ids"].shape[1], len(TAGS)), -20.0)
    for position, probabilities in zip(words.first_piece, leaning, strict=True):
        for tag, probability in probabilities.items():
            logits[position, TAGS.index(tag)] = np.log(probability)
    entities = decode_entities(text, words, logits, TAGS)
    # Argmax per word would give LOC "Velez" and a stray I-ORG; the valid IOB2 path is one ORG entity.
    assert [(text[e["start"] : e["end"]], e["label"]) for e in entities] == [("Velez Henderson", "ORG"), ("Ada", "PER")]


def test_entity_scores_are_strict_seqeval_per_type() -> None:
    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "I-LOC"], ["B-ORG", "O"]]  # strict IOB2: an entity opened by I- is invalid
    report = entity_report(truth, predicted)
    assert report["entity_precision"] == 1.0 and report["entity_recall"] == pytest.approx(2 / 3)
    assert report["entity_f1"] == pytest.approx(0.8)
    assert report["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert report["per_type"]["PER"]["f1"] == 1.0


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """MiniLM fine-tuned on 400 synthetic sentences for 3 epochs (tests/tagger.py, shared with inference's tests)."""
    tagger = trained_tagger(tmp_path_factory)
    return tagger.prepared, tagger


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_model_trained_on_synthetic_sentences_finds_entities_in_unseen_templates(trained) -> None:
    prepared, fit = trained
    held_out = [
        TokenItem(text, spans) for text, spans in entity_sentences(150, seed=2, templates=HELD_OUT_ENTITY_TEMPLATES)
    ]
    assert not {t.text for t in held_out} & {t.text for t in prepared.train_set.items}
    report = evaluate_entities(prepared.model, prepared.tokenizer, held_out, prepared.tags, prepared.max_length)
    print(f"\nNER held-out entity F1 {report['entity_f1']:.3f}: {json.dumps(report['per_type'])}")
    assert report["entity_f1"] >= ENTITY_F1_FLOOR, report
    assert set(report["per_type"]) == set(ENTITY_LABELS)
    assert fit.best_macro_f1 > 0.9  # token macro-F1 on the validation split, first pieces only

    text = "Yesterday Marie Curie visited Siemens AG in Lyon."
    [entities] = predict_entities(prepared.model, prepared.tokenizer, [text], prepared.tags, prepared.max_length)
    found = {(text[e["start"] : e["end"]], e["label"]) for e in entities}
    assert {("Marie Curie", "PER"), ("Lyon", "LOC")} <= found


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_onnx_export_matches_torch_with_dynamic_batch_and_sequence(trained, tmp_path: Path) -> None:
    prepared, _ = trained
    held_out = [text for text, _ in entity_sentences(40, seed=3, templates=HELD_OUT_ENTITY_TEMPLATES)]
    held_out.append("A much longer sentence than the others, " * 3 + "written by Ada Lovelace in London.")
    metadata = export_token_model(
        prepared.model,
        prepared.tokenizer,
        prepared.tags,
        list(ENTITY_LABELS),
        prepared.max_length,
        tmp_path,
        held_out,
        model_name="entities",
        hyperparameters={"max_length": MAX_LENGTH},
    )
    ModelMetadata().load(metadata)  # the metadata.json every model version carries, plus the tagging fields
    print(f"\nNER ONNX parity: {json.dumps(metadata['parity'])}")
    assert metadata["parity"]["passed"] and metadata["parity"]["max_abs_diff"] <= 1e-4
    assert metadata["tags"] == TAGS and metadata["tagging_scheme"] == "IOB2"
    assert metadata["decoding"].startswith("iob2-first-piece")
    assert json.loads((tmp_path / METADATA_FILE).read_text()) == metadata
    session = onnx_session(tmp_path / MODEL_FILE)
    [output] = session.get_outputs()
    assert output.shape[:2] == ["batch", "sequence"] and output.shape[2] == len(TAGS)

    texts = ["Ada Lovelace lives in Paris.", "On 12 May 2024 Siemens AG hired Jean Dupont in Zürich."]
    encoded = encode(prepared.tokenizer, texts, prepared.max_length)
    feed = {name: encoded[name].astype(np.int64) for name in ("input_ids", "attention_mask")}
    logits = session.run(["logits"], feed)[0]
    assert logits.shape == (2, feed["input_ids"].shape[1], len(TAGS))
    from_onnx = [decode_entities(text, words_of(encoded, row), logits[row], TAGS) for row, text in enumerate(texts)]
    from_torch = predict_entities(prepared.model, prepared.tokenizer, texts, TAGS, prepared.max_length)
    assert [[(e["start"], e["end"], e["label"]) for e in row] for row in from_onnx] == [
        [(e["start"], e["end"], e["label"]) for e in row] for row in from_torch
    ]
