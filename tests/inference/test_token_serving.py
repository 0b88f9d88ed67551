"""Token classification served: a MiniLM tagger's ONNX package (services/training/token_export.py) loaded by
inference, `:predict` answering entities with code-point offsets of the text sent, the v2 protocol answering the
token logits, dynamic batching padding sequences, and bad input refused with a 4xx.

The plumbing tests serve untrained taggers: `random` keeps the head's seeded random weights, so its entities are
whatever its logits say and must equal the torch tagger's; `every_word` has a zero head whose bias favours
`B-PER`, so every word the tokenizer sees is one PER entity, which pins the offsets. One slow test serves a tagger
trained with the training test's recipe and scores its answers on sentences from templates it never saw."""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.demo_data import ENTITY_LABELS, HELD_OUT_ENTITY_TEMPLATES, entity_sentences
from services.training.base_models import MINILM
from services.training.text_model import load_encoder
from services.training.token_export import export_token_model
from services.training.token_model import TokenTagger, predict_entities, tag_set
from tests.inference.support import metric_samples, png, serving_document, upload_version
from tests.tagger import trained_tagger

pytestmark = pytest.mark.timeout(300)

LABELS = ["PER", "ORG", "LOC"]
TAGS = tag_set(LABELS)
MAX_LENGTH = 48
"""The trained test's recipe: that of tests/training/test_token_classification.py."""
SERVED_F1_FLOOR = 0.90
TEXTS = [
    "Zoë Ruiz-Peña joined Café Ünïcorn in São Paulo.",
    "Rene\u0301 Dubois 👍🏽 vit à 東京 avec Łukasz.",
    "İstanbul, 🇨🇭 and Müller GmbH",
    "plain ascii text",
]


def _export(folder: Path, model_name: str, tagger: TokenTagger, tokenizer) -> Path:
    export_token_model(
        tagger, tokenizer, TAGS, LABELS, MAX_LENGTH, folder, TEXTS, model_name=model_name, metrics={}, lineage={}
    )
    return folder


@pytest.fixture(scope="module")
def taggers(tmp_path_factory: pytest.TempPathFactory):
    """Two untrained MiniLM taggers and their exported packages (one encoder: the exports are what differ)."""
    torch.manual_seed(0)
    encoder, tokenizer = load_encoder(MINILM)
    random_head = TokenTagger(encoder, len(TAGS), dropout=0.1, freeze_encoder=False).eval()
    every_word = TokenTagger(encoder, len(TAGS), dropout=0.1, freeze_encoder=False).eval()
    with torch.no_grad():
        every_word.head.weight.zero_()
        every_word.head.bias.fill_(-5.0)
        every_word.head.bias[TAGS.index("B-PER")] = 5.0
    root = tmp_path_factory.mktemp("token-models")
    return {
        "tokenizer": tokenizer,
        "random": (random_head, _export(root / "random", "tagger", random_head, tokenizer)),
        "every_word": (every_word, _export(root / "every_word", "words", every_word, tokenizer)),
    }


def _serve(store, registry, tenants, folder: Path, serving: dict | None = None) -> str:
    version = upload_version(store, tenants.alice.tenant, folder, 1, serving=serving)
    registry.serve(serving_document(tenants.alice.tenant, folder, {1: version}, production=1))
    return json.loads((folder / "metadata.json").read_text())["model_name"]


def _predict(replica, tenants, name: str, texts: list[str]):
    return replica.client.post(f"/v1/models/{name}:predict", json={"texts": texts}, headers=tenants.alice.headers)


def test_every_word_comes_back_with_offsets_that_slice_the_text_sent(inference, store, registry, tenants, taggers):
    name = _serve(store, registry, tenants, taggers["every_word"][1])
    response = _predict(inference(), tenants, name, TEXTS[:3])
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["model_name"] == "words" and body["model_version"] == 1
    found = [prediction["entities"] for prediction in body["predictions"]]
    for text, entities in zip(TEXTS, found, strict=False):
        for entity in entities:
            assert entity["text"] == text[entity["start"] : entity["end"]]
            assert entity["label"] == "PER" and 0.99 < entity["score"] <= 1.0
    # One entity per tokenizer word: punctuation splits, each CJK character is a word, and the edges fall on whole
    # characters (the accent stripped by the tokenizer, the skin-tone modifier, the flag's two code points).
    assert [e["text"] for e in found[0]] == [
        "Zoë", "Ruiz", "-", "Peña", "joined", "Café", "Ünïcorn", "in", "São", "Paulo", ".",
    ]  # fmt: skip
    assert [e["text"] for e in found[1]] == [
        "Rene\u0301",
        "Dubois",
        "👍🏽",
        "vit",
        "à",
        "東",
        "京",
        "avec",
        "Łukasz",
        ".",
    ]
    assert [e["text"] for e in found[2]] == ["İstanbul", ",", "🇨🇭", "and", "Müller", "GmbH"]
    assert found[1][2] == {"start": 13, "end": 15, "label": "PER", "score": found[1][2]["score"], "text": "👍🏽"}
    ids = [prediction["prediction_id"] for prediction in body["predictions"]]  # logged: each takes span feedback
    assert all(i.startswith("prd_") for i in ids) and len(set(ids)) == len(ids)


def test_the_service_answers_what_the_torch_tagger_finds(inference, store, registry, tenants, taggers) -> None:
    tagger, folder = taggers["random"]
    name = _serve(store, registry, tenants, folder)
    response = _predict(inference(), tenants, name, TEXTS)
    assert response.status_code == 200, response.get_json()
    served = [prediction["entities"] for prediction in response.get_json()["predictions"]]
    expected = predict_entities(tagger, taggers["tokenizer"], TEXTS, TAGS, MAX_LENGTH)
    assert sum(len(entities) for entities in expected) > 0  # a random head still tags words: the test can fail
    for text, got, want in zip(TEXTS, served, expected, strict=True):
        assert [(e["start"], e["end"], e["label"]) for e in got] == [(e["start"], e["end"], e["label"]) for e in want]
        assert [e["score"] for e in got] == pytest.approx([e["score"] for e in want], abs=1e-4)
        assert [e["text"] for e in got] == [text[e["start"] : e["end"]] for e in want]


def test_v2_serves_the_token_logits(inference, store, registry, tenants, taggers) -> None:
    _, folder = taggers["random"]
    name = _serve(store, registry, tenants, folder)
    replica = inference()
    metadata = replica.client.get(f"/v2/models/{name}", headers=tenants.alice.headers).get_json()
    assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, len(TAGS)]}]
    assert metadata["flywheel"]["tags"] == TAGS and metadata["flywheel"]["labels"] == LABELS
    ids = [[101, 7592, 2088, 102, 0], [101, 7592, 102, 0, 0]]
    mask = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    response = replica.client.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                {"name": "input_ids", "shape": [2, 5], "datatype": "INT64", "data": ids},
                {"name": "attention_mask", "shape": [2, 5], "datatype": "INT64", "data": mask},
            ]
        },
        headers=tenants.alice.headers,
    )
    assert response.status_code == 200, response.get_json()
    [logits] = response.get_json()["outputs"]
    assert logits["name"] == "logits" and logits["shape"] == [2, 5, len(TAGS)]
    served = np.asarray(logits["data"], dtype=np.float32).reshape(2, 5, len(TAGS))
    tagger = taggers["random"][0]
    with torch.inference_mode():
        reference = tagger.token_logits(torch.tensor(ids), torch.tensor(mask)).numpy()
    real = np.asarray(mask, dtype=bool)
    np.testing.assert_allclose(served[real], reference[real], atol=1e-4)


def test_concurrent_texts_of_different_lengths_share_batches_and_keep_their_own_entities(
    inference, store, registry, tenants, taggers
) -> None:
    tagger, folder = taggers["random"]
    name = _serve(store, registry, tenants, folder, serving={"max_batch_size": 8, "max_queue_delay_us": 100_000})
    replica = inference()
    expected = dict(zip(TEXTS, predict_entities(tagger, taggers["tokenizer"], TEXTS, TAGS, MAX_LENGTH), strict=True))
    start = threading.Barrier(8)

    def caller(index: int) -> list[bool]:
        start.wait()
        outcomes = []
        for round_ in range(3):
            text = TEXTS[(index + round_) % len(TEXTS)]
            response = _predict(replica, tenants, name, [text])
            got = response.get_json()["predictions"][0]["entities"] if response.status_code == 200 else None
            want = [(e["start"], e["end"], e["label"]) for e in expected[text]]
            outcomes.append(got is not None and [(e["start"], e["end"], e["label"]) for e in got] == want)
        return outcomes

    with ThreadPoolExecutor(8) as pool:
        results = [ok for outcomes in pool.map(caller, range(8)) for ok in outcomes]
    assert all(results), f"{results.count(False)} of {len(results)} requests got other entities or failed"
    metrics = replica.client.get("/metrics").get_data(as_text=True)
    batches = sum(
        v for labels, v in metric_samples(metrics, "flywheel_inference_batch_size_count") if labels["model"] == name
    )
    rows = sum(
        v for labels, v in metric_samples(metrics, "flywheel_inference_batch_size_sum") if labels["model"] == name
    )
    assert rows == 24 and batches < rows, "no two requests of different lengths ever shared a batch"


def test_bad_inputs_to_a_token_model_are_refused_with_a_4xx(inference, store, registry, tenants, taggers) -> None:
    _, folder = taggers["random"]
    name = _serve(store, registry, tenants, folder)
    replica = inference()
    headers = tenants.alice.headers
    image = replica.client.post(
        f"/v1/models/{name}:predict", json={"images": [base64.b64encode(png((1, 2, 3))).decode()]}, headers=headers
    )
    assert image.status_code == 422 and "takes texts" in image.get_json()["error"]["message"]
    for body in ({"texts": []}, {"texts": [""]}, {"texts": "one text"}, {"texts": [1]}, {}):
        response = replica.client.post(f"/v1/models/{name}:predict", json=body, headers=headers)
        assert response.status_code == 422, (body, response.get_json())
    wrong_dtype = replica.client.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                {"name": "input_ids", "shape": [1, 2], "datatype": "FP32", "data": [101.0, 102.0]},
                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]},
            ]
        },
        headers=headers,
    )
    assert wrong_dtype.status_code == 400 and "INT64" in wrong_dtype.get_json()["error"]
    top_classes = replica.client.post(
        f"/v2/models/{name}/infer",
        json={
            "inputs": [
                {"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [101, 102]},
                {"name": "attention_mask", "shape": [1, 2], "datatype": "INT64", "data": [1, 1]},
            ],
            "outputs": [{"name": "logits", "parameters": {"classification": 2}}],
        },
        headers=headers,
    )
    assert top_classes.status_code == 400 and "classification extension" in top_classes.get_json()["error"]


def test_a_token_package_whose_tags_do_not_match_its_labels_is_refused(
    inference, store, registry, tenants, taggers, tmp_path: Path
) -> None:
    source = taggers["random"][1]
    folder = tmp_path / "bad"
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    metadata = json.loads((folder / "metadata.json").read_text())
    metadata["tags"] = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]  # another order than the labels'
    (folder / "metadata.json").write_text(json.dumps(metadata))
    name = _serve(store, registry, tenants, folder)
    replica = inference()
    described = replica.client.get(f"/v2/models/{name}", headers=tenants.alice.headers).get_json()
    assert described["flywheel"]["versions"]["1"]["state"] == "failed"
    assert described["flywheel"]["versions"]["1"]["reason"] == "invalid_metadata"
    assert _predict(replica, tenants, name, ["Zoë"]).status_code == 503


@pytest.fixture(scope="module")
def trained_package(tmp_path_factory: pytest.TempPathFactory):
    """MiniLM fine-tuned briefly on synthetic sentences (tests/tagger.py, shared with training's tests), exported."""
    tagger = trained_tagger(tmp_path_factory)
    prepared, labels = tagger.prepared, list(ENTITY_LABELS)
    folder = tmp_path_factory.mktemp("trained-tagger")
    export_token_model(
        prepared.model,
        prepared.tokenizer,
        prepared.tags,
        labels,
        MAX_LENGTH,
        folder,
        tagger.validation_texts,
        model_name="news",
    )
    return folder


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_trained_tagger_served_returns_the_offsets_of_the_entities(
    inference, store, registry, tenants, trained_package
) -> None:
    name = _serve(store, registry, tenants, trained_package)
    replica = inference()
    held_out = entity_sentences(60, seed=7, templates=HELD_OUT_ENTITY_TEMPLATES)
    response = _predict(replica, tenants, name, [text for text, _ in held_out])
    assert response.status_code == 200, response.get_json()
    served = [prediction["entities"] for prediction in response.get_json()["predictions"]]
    found = {(i, e["start"], e["end"], e["label"]) for i, entities in enumerate(served) for e in entities}
    true = {(i, s["start"], s["end"], s["label"]) for i, (_, spans) in enumerate(held_out) for s in spans}
    precision, recall = len(found & true) / max(len(found), 1), len(found & true) / len(true)
    f1 = 2 * precision * recall / max(precision + recall, 1e-9)
    print(f"served entity F1 on held-out templates (exact offsets): {f1:.3f} ({precision=:.3f} {recall=:.3f})")
    assert f1 >= SERVED_F1_FLOOR
