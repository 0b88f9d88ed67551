"""Monitoring through the public APIs: the prediction log's query API, retention and shedding, durability across
a restart, live accuracy from delayed ground truth, drift against the evaluation baseline and its trigger,
sampling to labeling, and shadow traffic."""

from __future__ import annotations

import json
import posixpath
import random
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import update
from tokenizers import Tokenizer

from services.inference.models import Prediction
from services.inference.traffic import Sampler
from shared.auth import TENANT_HEADER
from shared.db import declarative_base
from shared.runtime import Runtime, ServiceSpec
from shared.storage import create_store
from tests.helpers import INTERNAL, eventually
from tests.inference.support import TOKENIZER_DIR, metric_samples, serving_document, upload_version
from tests.inference.test_feedback import queued_events

pytestmark = pytest.mark.timeout(180)

POSITIVE, NEGATIVE, NEUTRAL = "a wonderful film", "a terrible film", "an ordinary film"


def tiny_text_answer(text: str) -> tuple[str, float]:
    """What the tiny text model answers: logits (4 per 'terrible', 4 per 'wonderful'), argmax and its softmax."""
    words = text.split()
    logits = np.asarray([4.0 * words.count("terrible"), 4.0 * words.count("wonderful")])
    probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    return ("neg", "pos")[int(probabilities.argmax())], float(probabilities.max())


def reviews_texts(count: int, seed: int) -> list[str]:
    """The traffic the model was evaluated on: one to three sentiment words each, either way."""
    rng = random.Random(seed)
    return [
        " ".join(["a"] + [rng.choice(("wonderful", "terrible"))] * rng.randint(1, 3) + ["film"]) for _ in range(count)
    ]


def text_input_stats(texts: list[str]) -> dict[str, list[float]]:
    """What training records of the evaluation texts (`input_stats`): chars, tokens, unknown-token rate, as the
    tiny model's tokenizer (truncated at its max_length, lowercased) sees them."""
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    tokenizer.enable_truncation(32)
    tokenizer.no_padding()
    unknown = tokenizer.token_to_id("[UNK]")
    encodings = [tokenizer.encode(text.lower()).ids for text in texts]
    return {
        "chars": [float(len(text)) for text in texts],
        "tokens": [float(len(ids)) for ids in encodings],
        "unknown_rate": [ids.count(unknown) / len(ids) for ids in encodings],
    }


def upload_evaluation(store, version_doc: dict, texts: list[str], *, with_inputs: bool = False) -> None:
    """evaluation.json beside model.onnx, as training writes it: the candidate scored item by item on `texts`
    (with the texts' input statistics, as training records them since input drift, when `with_inputs`)."""
    graph = version_doc["artifacts"]["model.onnx"]
    answers = [tiny_text_answer(text) for text in texts]
    labels = ["neg", "pos"]
    predictions = [labels.index(label) for label, _ in answers]
    report = {
        "evaluation_set": {"snapshot_id": "snp_test", "split": "test", "items": len(texts), "sha256": "0" * 64},
        "labels": labels,
        "item_ids": [f"itm_{i}" for i in range(len(texts))],
        "y_true": predictions,
        "candidate": {
            "version": None,
            "run_id": "run_test",
            "model_sha256": graph["sha256"],
            "predictions": predictions,
            "confidences": [confidence for _, confidence in answers],
            "metrics": {"accuracy": 0.9, "macro_f1": 0.9},
        },
        "production": None,
        "baselines": {},
        **({"input_stats": text_input_stats(texts)} if with_inputs else {}),
    }
    key = posixpath.join(posixpath.dirname(graph["key"]), "evaluation.json")
    store.put(graph["bucket"], key, json.dumps(report).encode())


def serve_reviews(store, registry, tenant: str, folder, *, with_inputs: bool) -> dict:
    versions = {4: upload_version(store, tenant, folder, 4), 5: upload_version(store, tenant, folder, 5)}
    upload_evaluation(store, versions[4], reviews_texts(200, seed=1), with_inputs=with_inputs)
    registry.serve(serving_document(tenant, folder, versions, 4, staging=5))
    return versions


@pytest.fixture
def reviews(store, registry, tenants, model_folders):
    """`reviews` v4 in production with its evaluation baseline written before input statistics were recorded,
    and v5 loaded under a `staging` alias."""
    return serve_reviews(store, registry, tenants.alice.tenant, model_folders["text"], with_inputs=False)


@pytest.fixture
def reviews_with_inputs(store, registry, tenants, model_folders):
    """The same, its evaluation report recording the evaluation texts' input statistics."""
    return serve_reviews(store, registry, tenants.alice.tenant, model_folders["text"], with_inputs=True)


def predict(replica, headers, texts: list[str]) -> list[dict]:
    response = replica.client.post("/v1/models/reviews:predict", json={"texts": texts}, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()["predictions"]


def query(replica, headers, **params) -> dict:
    response = replica.client.get("/v1/predictions", query_string=params, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


class Labeler:
    """Publishes `prediction.labeled` as labeling does: through the shared bus (outbox, then Redis)."""

    def __init__(self, settings) -> None:
        spec = ServiceSpec(name="labeling", title="labeling stand-in", metadata=declarative_base().metadata)
        self.runtime = Runtime(spec, settings).start()

    def label(self, tenant: str, prediction_id: str, label: str, source: str = "sample") -> None:
        payload = {
            "prediction_id": prediction_id,
            "model_name": "reviews",
            "model_version": 4,
            "dataset_id": "ds_reviews",
            "label": label,
            "source": source,
        }
        with self.runtime.db.session() as session:
            self.runtime.bus.publish(session, "prediction.labeled", payload, tenant=tenant)

    def close(self) -> None:
        self.runtime.close()


@pytest.fixture
def labeler(inference_settings):
    producer = Labeler(inference_settings)
    yield producer
    producer.close()


# -- the prediction log ------------------------------------------------------------------------------------------


def test_the_prediction_log_answers_filtered_pages_of_your_own_predictions_only(inference, reviews, tenants) -> None:
    replica = inference()
    alice = tenants.alice.headers
    texts = [POSITIVE, NEGATIVE, NEUTRAL, POSITIVE, "a wonderful wonderful film"]
    answers = predict(replica, alice, texts)
    eventually(lambda: len(query(replica, alice, model="reviews")["predictions"]) == 5, what="five logged")

    page = query(replica, alice, label="pos")
    assert {p["id"] for p in page["predictions"]} == {answers[i]["prediction_id"] for i in (0, 3, 4)}
    assert all(p["model_version"] == 4 and p["input"]["bucket"] == "raw" for p in page["predictions"])
    low = query(replica, alice, max_confidence=0.6)["predictions"]
    assert [p["id"] for p in low] == [answers[2]["prediction_id"]] and low[0]["confidence"] == pytest.approx(0.5)
    assert low[0]["input_stats"]["chars"] == len(NEUTRAL) and low[0]["input_stats"]["tokens"] > 2
    assert query(replica, alice, version=5)["predictions"] == []
    future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert query(replica, alice, since=future)["predictions"] == []

    seen, cursor = [], None
    while True:
        page = query(replica, alice, limit=2, **({"cursor": cursor} if cursor else {}))
        seen += [p["id"] for p in page["predictions"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(a["prediction_id"] for a in answers) and len(seen) == 5

    assert query(replica, tenants.bob.headers)["predictions"] == []
    one = replica.client.get(f"/v1/predictions/{answers[0]['prediction_id']}", headers=tenants.bob.headers)
    assert one.status_code == 404
    bad = replica.client.get("/v1/predictions?min_confidence=0.9&max_confidence=0.1", headers=alice)
    assert bad.status_code == 422 and "min_confidence" in bad.get_json()["error"]["details"]["fields"]["query"]
    assert replica.client.get("/v1/predictions?cursor=nonsense", headers=alice).status_code == 422
    assert replica.client.get("/v1/predictions?since=yesterday", headers=alice).status_code == 422


def test_retention_is_per_tenant_and_prunes_old_rows(inference, reviews, tenants) -> None:
    replica = inference()
    alice, bob = tenants.alice, tenants.bob
    assert replica.client.get("/v1/monitoring/retention", headers=alice.headers).get_json() == {"days": 30}
    response = replica.client.put("/v1/monitoring/retention", json={"days": 7}, headers=alice.headers)
    assert response.status_code == 200 and response.get_json() == {"days": 7}
    assert replica.client.put("/v1/monitoring/retention", json={"days": 0}, headers=alice.headers).status_code == 422
    assert replica.client.get("/v1/monitoring/retention", headers=bob.headers).get_json() == {"days": 30}
    old, fresh = predict(replica, alice.headers, [POSITIVE, NEGATIVE])
    replica.server.prediction_log.flush()
    with replica.runtime.db.session() as session:  # age one prediction past alice's 7 days
        session.execute(
            update(Prediction)
            .where(Prediction.id == old["prediction_id"])
            .values(created_at=datetime.now(UTC) - timedelta(days=8))
        )
    assert replica.server.monitor.prune() == 1
    assert [p["id"] for p in query(replica, alice.headers)["predictions"]] == [fresh["prediction_id"]]


def test_a_full_buffer_sheds_counted_never_silently(inference, reviews, tenants) -> None:
    replica = inference(log_buffer_limit=2, log_flush_interval_s=60.0)
    predict(replica, tenants.alice.headers, [POSITIVE, NEGATIVE, NEUTRAL, POSITIVE, NEGATIVE])
    page = replica.client.get("/metrics").get_data(as_text=True)
    assert metric_samples(page, "flywheel_inference_prediction_log_shed_total") == [({"reason": "buffer_full"}, 3.0)]
    assert metric_samples(page, "flywheel_inference_prediction_log_buffered") == [({}, 2.0)]


def test_the_log_survives_a_restart_with_nothing_lost(inference, reviews, tenants, settings) -> None:
    first = inference(log_flush_interval_s=60.0)  # nothing is written before the restart but by the shutdown
    ids = [p["prediction_id"] for p in predict(first, tenants.alice.headers, [POSITIVE, NEGATIVE, NEUTRAL])]
    first.close()
    second = inference()
    assert sorted(p["id"] for p in query(second, tenants.alice.headers)["predictions"]) == sorted(ids)


def test_a_restart_while_storage_is_down_spools_and_the_next_process_writes(inference, reviews, tenants) -> None:
    first = inference(log_flush_interval_s=60.0)
    ids = [p["prediction_id"] for p in predict(first, tenants.alice.headers, [POSITIVE, NEGATIVE])]
    # object storage goes away just before the process stops: the last flush cannot write the inputs
    first.runtime.storage = create_store(
        s3_endpoint="127.0.0.1:9", s3_access_key="x", s3_secret_key="y", s3_secure=False, s3_region="", file_root=""
    )
    first.server.prediction_log.runtime = first.runtime
    first.close()
    spooled = list((first.server.prediction_log.spool_dir).glob("*.jsonl"))
    assert len(spooled) == 1
    second = inference()
    assert sorted(p["id"] for p in query(second, tenants.alice.headers)["predictions"]) == sorted(ids)
    assert not list(second.server.prediction_log.spool_dir.glob("*.jsonl"))


# -- live quality ------------------------------------------------------------------------------------------------


def test_ground_truth_gives_exactly_the_hand_computed_live_accuracy(inference, reviews, tenants, labeler) -> None:
    replica = inference()
    alice = tenants.alice
    texts = [POSITIVE, NEGATIVE, NEUTRAL, POSITIVE, NEGATIVE, NEUTRAL, POSITIVE, "a wonderful wonderful film"]
    answers = predict(replica, alice.headers, texts)
    truths = ["pos", "neg", "pos", "neg", "neg", "neg", "pos", None]  # the last one never gets a label
    for answer, truth in zip(answers, truths, strict=True):
        if truth is not None:
            labeler.label(alice.tenant, answer["prediction_id"], truth)
    eventually(
        lambda: len(query(replica, alice.headers, labeled="true")["predictions"]) == 7, what="seven labels joined"
    )
    predicted = [a["label"] for a in answers[:7]]
    expected_correct = sum(p == t for p, t in zip(predicted, truths[:7], strict=True))
    # by hand: pos=pos, neg=neg, neg!=pos, pos!=neg, neg=neg, neg=neg, pos=pos -> 5 of 7
    assert expected_correct == 5
    # macro-F1 by hand: pos: tp=2 fp=1 fn=1 -> 2/3; neg: tp=3 fp=1 fn=1 -> 3/4
    macro_f1 = (2 / 3 + 3 / 4) / 2

    report = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice.headers)
    assert report.status_code == 200, report.get_json()
    window = report.get_json()["windows"][-1]["versions"]["4"]
    assert window["predictions"] == 8
    live = window["quality"]
    assert (live["labeled"], live["correct"]) == (7, 5)
    assert live["accuracy"] == 5 / 7 and live["macro_f1"] == pytest.approx(macro_f1, abs=1e-12)
    assert live["ci_low"] < 5 / 7 < live["ci_high"]
    # the 95% Wilson interval by hand: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), p = 5/7, n = 7
    z, n, p = 1.959963984540054, 7, 5 / 7
    centre, half = p + z * z / (2 * n), z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5
    assert live["ci_low"] == pytest.approx((centre - half) / (1 + z * z / n), abs=1e-9)
    assert live["ci_high"] == pytest.approx((centre + half) / (1 + z * z / n), abs=1e-9)

    labeler.label(alice.tenant, answers[0]["prediction_id"], "pos")  # the same label again changes nothing
    labeler.label(tenants.bob.tenant, answers[1]["prediction_id"], "pos")  # another tenant's prediction: refused
    received = replica.server.metrics.labels_received
    eventually(lambda: received.labels("rejected")._value.get() == 1, what="bob's label refused")
    eventually(lambda: received.labels("handled")._value.get() == 8, what="alice's repeated label handled")
    again = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice.headers).get_json()
    assert again["windows"][-1]["versions"]["4"]["quality"]["correct"] == 5

    # A correction sent as feedback is ground truth too, but chosen because the answer looked wrong: it is
    # counted apart and never pulls the live accuracy down.
    labeler.label(alice.tenant, answers[7]["prediction_id"], "neg", source="feedback")
    eventually(lambda: received.labels("handled")._value.get() == 9, what="the feedback label handled")
    after = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice.headers).get_json()
    live = after["windows"][-1]["versions"]["4"]["quality"]
    assert (live["labeled"], live["correct"], live["feedback_labeled"], live["accuracy"]) == (7, 5, 1, 5 / 7)


# -- drift and its trigger ---------------------------------------------------------------------------------------


def set_policy(replica, headers, **policy) -> dict:
    response = replica.client.put("/v1/monitoring/models/reviews/policy", json=policy, headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def evaluate(replica, headers) -> dict:
    response = replica.client.post("/v1/monitoring/models/reviews/evaluate", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def test_unshifted_traffic_raises_no_drift(inference, reviews, tenants, settings) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, min_samples=100)
    for start in range(0, 300, 50):
        predict(replica, alice, reviews_texts(300, seed=2)[start : start + 50])
    result = evaluate(replica, alice)
    assert result["fired"] == [] and result["versions"][0]["judged"] == ["confidence_drift", "prediction_drift"]
    drift = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice).get_json()
    signals = drift["windows"][-1]["versions"]["4"]["drift"]
    assert signals["prediction_js"] < 0.1 and signals["confidence_ks_pvalue"] > 0.01
    assert not [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "model.degraded"]
    # its evaluation report predates input statistics: no input drift judged, and the report says why
    window = drift["windows"][-1]["versions"]["4"]
    assert window["input_drift"] == {"judged": False, "note": window["input_drift"]["note"]}
    assert "holds no input statistics" in window["input_drift"]["note"]
    assert drift["versions"][0]["baseline"]["input_stats"] is None


def test_unshifted_inputs_raise_no_input_drift(inference, reviews_with_inputs, tenants, settings) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, min_samples=100)
    for start in range(0, 300, 50):
        predict(replica, alice, reviews_texts(300, seed=2)[start : start + 50])
    result = evaluate(replica, alice)
    assert result["fired"] == []
    assert result["versions"][0]["judged"] == [
        "confidence_drift",
        "input_drift",
        "prediction_drift",
        "unknown_token_drift",
    ]
    report = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice).get_json()
    inputs = report["windows"][-1]["versions"]["4"]["input_drift"]
    assert inputs["judged"] and inputs["chars_ks_pvalue"] > 0.01 and inputs["unknown_rate_diff"] == 0.0
    assert report["versions"][0]["baseline"]["input_stats"]["chars"] == pytest.approx(
        np.mean([len(t) for t in reviews_texts(200, seed=1)])
    )
    assert not [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "model.degraded"]


def test_longer_texts_fire_input_drift_within_min_samples(
    inference, reviews_with_inputs, tenants, settings, logs
) -> None:
    """The same sentiments (so the same predictions and confidences), each text four words longer."""
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, min_samples=100)
    longer = [f"{text} film film film film" for text in reviews_texts(100, seed=3)]
    predict(replica, alice, longer[:50])
    predict(replica, alice, longer[50:99])
    assert evaluate(replica, alice)["fired"] == []  # 99 predictions: not judged yet
    predict(replica, alice, longer[99:])
    fired = evaluate(replica, alice)["fired"]
    assert [alert["kind"] for alert in fired] == ["input_drift"], fired
    (alert,) = fired
    assert alert["samples"] == 100 and alert["value"] > 0.3 and alert["details"]["statistic"] == "chars"
    assert "text length" in alert["reason"] and alert["details"]["chars_ks_pvalue"] < 0.01
    assert evaluate(replica, alice)["fired"] == []  # active: it does not fire again

    (event,) = [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "model.degraded"]
    assert event["payload"]["kind"] == "input_drift" and "text length" in event["payload"]["reason"]
    gauges = metric_samples(replica.client.get("/metrics").get_data(as_text=True), "flywheel_monitor_alert")
    assert {labels["kind"] for labels, value in gauges if value == 1.0} == {"input_drift"}
    drift = metric_samples(replica.client.get("/metrics").get_data(as_text=True), "flywheel_monitor_drift")
    assert any(labels["signal"] == "input_chars_ks" and value > 0.3 for labels, value in drift)
    (line,) = logs.find(event="monitoring_alert_fired")
    assert line["kind"] == "input_drift" and line["level"] == "warning" and line["samples"] == 100


def test_unknown_tokens_fire_unknown_token_drift(inference, reviews_with_inputs, tenants) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, min_samples=100)
    # symbols the tokenizer does not know: two [UNK] among seven tokens, where the evaluation texts had none
    for start in (0, 50):
        texts = reviews_texts(100, seed=4)[start : start + 50]
        predict(replica, alice, [text.replace(" film", " \u2603 \u265e film") for text in texts])
    fired = {alert["kind"]: alert for alert in evaluate(replica, alice)["fired"]}
    assert "unknown_token_drift" in fired, fired
    alert = fired["unknown_token_drift"]
    assert alert["threshold"] == 0.05 and alert["details"]["baseline_unknown_rate"] == 0.0
    assert 0.2 < alert["details"]["unknown_rate"] < 0.34 and alert["value"] == alert["details"]["unknown_rate"]


def test_shifted_traffic_fires_the_drift_alert_within_min_samples(inference, reviews, tenants, settings, logs) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, min_samples=100)
    predict(replica, alice, [NEUTRAL] * 50)
    predict(replica, alice, [NEUTRAL] * 49)
    assert evaluate(replica, alice)["fired"] == []  # 99 predictions: not judged yet
    predict(replica, alice, [NEUTRAL])
    result = evaluate(replica, alice)
    fired = result["fired"]
    assert fired, result
    assert {alert["kind"] for alert in fired} == {"prediction_drift", "confidence_drift"}
    assert all(alert["samples"] == 100 and alert["model_version"] == 4 for alert in fired)
    assert evaluate(replica, alice)["fired"] == []  # an active alert does not fire again

    (event,) = [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "model.degraded"]
    payload = event["payload"]
    assert (payload["model_name"], payload["model_version"], payload["dataset_id"]) == ("reviews", 4, "ds_reviews")
    assert "drifted" in payload["reason"] and payload["samples"] == 100
    alerts = replica.client.get("/v1/monitoring/alerts?active=true", headers=alice).get_json()["alerts"]
    assert {a["kind"] for a in alerts} == {"prediction_drift", "confidence_drift"}
    assert {a["event_id"] for a in alerts} == {event["event_id"]}
    gauges = metric_samples(replica.client.get("/metrics").get_data(as_text=True), "flywheel_monitor_alert")
    assert {labels["kind"] for labels, value in gauges if value == 1.0} == {"prediction_drift", "confidence_drift"}
    lines = logs.find(event="monitoring_alert_fired")
    assert {line["kind"] for line in lines} == {"prediction_drift", "confidence_drift"}
    assert all(line["model_version"] == 4 and line["level"] == "warning" for line in lines)
    assert replica.client.get("/v1/monitoring/alerts", headers=tenants.bob.headers).get_json()["alerts"] == []


def test_policy_input_is_validated(inference, reviews, tenants) -> None:
    replica = inference()
    alice = tenants.alice.headers
    bad = replica.client.put("/v1/monitoring/models/reviews/policy", json={"sample_rate": 2}, headers=alice)
    assert bad.status_code == 422 and "sample_rate" in str(bad.get_json()["error"]["details"]["fields"])
    missing = replica.client.put("/v1/monitoring/models/reviews/policy", json={"shadow_version": 9}, headers=alice)
    assert missing.status_code == 422
    assert replica.client.get("/v1/monitoring/models/reviews/policy", headers=tenants.bob.headers).status_code == 404
    assert replica.client.get("/v1/monitoring/models/reviews?windows=0", headers=alice).status_code == 422
    too_high = replica.client.put(
        "/v1/monitoring/models/reviews/policy", json={"unknown_rate_threshold": 2}, headers=alice
    )
    assert too_high.status_code == 422
    policy = set_policy(replica, alice, input_drift_threshold=0.4)
    assert policy["input_drift_threshold"] == 0.4 and policy["unknown_rate_threshold"] == 0.05
    schemas = replica.client.get("/openapi.json").get_json()["components"]["schemas"]
    assert {"input_drift_threshold", "unknown_rate_threshold"} <= set(schemas["MonitorPolicy"]["properties"])


# -- sampling and shadow traffic ---------------------------------------------------------------------------------


def test_sampling_sends_predictions_to_labeling_tagged_with_their_version(
    inference, reviews, tenants, settings
) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, sample_rate=1.0)
    answers = predict(replica, alice, [NEUTRAL, POSITIVE])
    replica.server.prediction_log.flush()

    def sampled_items() -> list[dict]:
        # The writer thread may flush between the two predictions: one event per flush, so gather them all.
        events = [e for e in queued_events(settings.redis_url, "labeling") if e["type"] == "prediction.sampled"]
        items = [item for event in events for item in event["payload"]["items"]]
        return items if len(items) >= len(answers) else []

    items = eventually(sampled_items, what="prediction.sampled on labeling's queue, for both predictions")
    assert {item["prediction_id"] for item in items} == {a["prediction_id"] for a in answers}
    assert all(item["model_version"] == 4 and item["input"]["bucket"] == "raw" for item in items)
    assert all(p["sampled"] for p in query(replica, alice)["predictions"])


def test_sampling_weights_low_confidence_three_to_one_at_the_policy_rate() -> None:
    """k=2: a certain answer (confidence 1) weighs 0.5, a coin flip (0.5) weighs 1.5; half of each averages 1."""
    sampler = Sampler(np.random.default_rng(7))
    confidences = [0.5, 1.0] * 10_000
    one_by_one = [sampler.pick(("t", "m"), 0.2, [c], 2)[0] for c in confidences]  # one prediction per request
    batched = Sampler(np.random.default_rng(8)).pick(("t", "m"), 0.2, confidences, 2)  # one request of them all
    for picks in (one_by_one, batched):
        unsure, certain = np.mean(picks[0::2]), np.mean(picks[1::2])
        assert np.mean(picks) == pytest.approx(0.2, abs=0.015)
        assert unsure == pytest.approx(0.3, abs=0.02) and certain == pytest.approx(0.1, abs=0.015)
    assert sampler.pick(("t", "m"), 0.0, [0.5], 2) == [False] and sampler.pick(("t", "m"), 1.0, [1.0], 2) == [True]


def test_shadow_answers_are_logged_never_returned(inference, reviews, tenants) -> None:
    replica = inference()
    alice = tenants.alice.headers
    before = predict(replica, alice, [POSITIVE, NEUTRAL])
    set_policy(replica, alice, shadow_version=5, shadow_rate=1.0)
    after = predict(replica, alice, [POSITIVE, NEUTRAL])
    strip = [{k: v for k, v in p.items() if k != "prediction_id"} for p in before]
    assert [{k: v for k, v in p.items() if k != "prediction_id"} for p in after] == strip
    eventually(
        lambda: (
            replica.server.metrics.shadow_requests.labels(tenants.alice.tenant, "reviews", "5", "answered")._value.get()
            == 1
        ),
        what="the shadow answered",
    )
    replica.server.prediction_log.flush()
    report = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice).get_json()
    shadow = report["windows"][-1]["shadow"]["5"]
    assert shadow["shadowed"] == 2 and shadow["failed"] == 0 and shadow["agreement"] == 1.0


def test_a_failing_shadow_never_fails_a_request(inference, reviews, tenants, registry, store, model_folders) -> None:
    replica = inference()
    alice = tenants.alice.headers
    set_policy(replica, alice, shadow_version=5, shadow_rate=1.0)
    model = replica.server.model(tenants.alice.tenant, "reviews")
    model.state.versions[5].batcher.close()  # the shadow version's batcher refuses everything from now on
    answers = predict(replica, alice, [POSITIVE, NEGATIVE])
    assert [a["label"] for a in answers] == ["pos", "neg"]
    eventually(
        lambda: (
            replica.server.metrics.shadow_requests.labels(tenants.alice.tenant, "reviews", "5", "failed")._value.get()
            == 1
        ),
        what="the shadow failed",
    )
    replica.server.prediction_log.flush()
    shadow = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=alice).get_json()
    assert shadow["windows"][-1]["shadow"]["5"]["failed"] == 2


# -- the terminal view -------------------------------------------------------------------------------------------


def test_flywheel_monitor_prints_versions_side_by_side_with_sparklines(
    inference, reviews, tenants, labeler, capsys
) -> None:
    from cli.monitor import monitor
    from shared.client.api import InferenceClient

    replica = inference()
    alice = tenants.alice
    answers = predict(replica, alice.headers, [POSITIVE, NEGATIVE, NEUTRAL, POSITIVE])
    for answer in answers:
        labeler.label(alice.tenant, answer["prediction_id"], "pos")
    eventually(lambda: len(query(replica, alice.headers, labeled="true")["predictions"]) == 4, what="labels joined")
    client = InferenceClient(replica.serve(), alice.key)
    assert monitor(client, "reviews", windows=4, window_s=600, watch=None) == 0
    out = capsys.readouterr().out
    assert "model reviews: 4 windows of 600s" in out
    line = next(line for line in out.splitlines() if line.startswith("v4"))
    assert "production" in line and "50.0%" in line and "90.0%" in line  # live 2 of 4, evaluation 0.9
    assert "█" in line or "▄" in line
    assert "input KS" in out and " n/a " in line  # its evaluation report predates input statistics
    assert next(line for line in out.splitlines() if line.startswith("v5")).split()[1] == "loaded"
    assert "active alerts: 0" in out


def test_class_drift_needs_more_than_a_noisy_distance_from_a_small_baseline() -> None:
    """A 30-item test split (the gate's minimum) over 10 classes is itself a noisy sample: traffic from the very
    distribution it was drawn from lies more than 0.2 (Jensen-Shannon) from it 70% of the time. The chi-square
    test of homogeneity keeps that from firing; a real shift fires."""
    from services.inference import monitoring
    from services.inference.baseline import Baseline
    from services.inference.policies import DEFAULT_POLICY, check

    labels = [str(d) for d in range(10)]
    rng = np.random.default_rng(0)  # one draw of many like it (JS above 0.2 in 70% of seeds)
    sample = rng.choice(labels, size=30)
    counts = {label: int((sample == label).sum()) for label in labels}
    baseline = Baseline(
        labels=labels,
        class_distribution={label: counts[label] / 30 for label in labels},
        confidences=None,
        accuracy=0.9,
        macro_f1=0.9,
        items=30,
        source="evaluation_report",
    )
    now = datetime.now(UTC)

    def rows(predicted: list[str]) -> list[monitoring.Row]:
        return [monitoring.Row(f"p{i}", 1, label, None, 1.0, None, None, now) for i, label in enumerate(predicted)]

    policy = {**DEFAULT_POLICY, "min_samples": 100}
    same = rows(list(rng.choice(labels, size=2000)))  # the distribution the baseline sampled
    result = monitoring.drift(same, baseline)
    assert result["prediction_js"] > policy["prediction_drift_threshold"]  # the distance alone would fire
    assert result["prediction_chi2_pvalue"] > policy["drift_p_value"]
    found, judged = check(policy, same, baseline)
    assert "prediction_drift" in judged and not [f for f in found if f["kind"] == "prediction_drift"]

    shifted = rows(list(rng.choice(labels[:3], size=2000)))  # only three classes predicted any more
    found, _ = check(policy, shifted, baseline)
    assert [f["kind"] for f in found] == ["prediction_drift"]


def test_the_internal_token_reads_monitoring_for_the_tenant_it_names_only(inference, reviews, tenants) -> None:
    """The console's operator pages read a tenant's monitoring with the internal token and `X-Flywheel-Tenant`."""
    replica = inference()
    predict(replica, tenants.alice.headers, reviews_texts(20, seed=3))
    as_alice = {**INTERNAL, TENANT_HEADER: tenants.alice.tenant}
    report = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=as_alice)
    assert report.status_code == 200, report.get_json()
    own = replica.client.get("/v1/monitoring/models/reviews?windows=1", headers=tenants.alice.headers).get_json()
    assert report.get_json()["versions"] == own["versions"] and own["versions"]
    assert replica.client.get("/v1/monitoring/alerts", headers=as_alice).status_code == 200
    as_bob = {**INTERNAL, TENANT_HEADER: tenants.bob.tenant}  # bob serves no model of that name
    assert replica.client.get("/v1/monitoring/models/reviews", headers=as_bob).status_code == 404
    unnamed = replica.client.get("/v1/monitoring/models/reviews", headers=INTERNAL)
    assert unnamed.status_code == 401 and TENANT_HEADER in unnamed.get_json()["error"]["message"]
    # writes stay the partner's own
    assert replica.client.put("/v1/monitoring/models/reviews/policy", json={}, headers=as_alice).status_code == 401
