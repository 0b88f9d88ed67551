"""`GET /v1/annotators/me`: an annotator's own figures per dataset it may label (annotations, skips, agreement)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers import INTERNAL, bearer

pytestmark = pytest.mark.timeout(120)

PER = {"start": 0, "end": 3, "label": "PER"}
LOC = {"start": 13, "end": 19, "label": "LOC"}  # "Lisbon" in "Ana lives in Lisbon"


def me(harness, headers: dict[str, str]) -> dict[str, Any]:
    response = harness.labeling.client.get("/v1/annotators/me", headers=headers)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def answer(harness, headers: dict[str, str], dataset: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """Lease the next task and label it (`body`), or skip it (`None`)."""
    task = harness.next(headers, dataset)
    assert task is not None
    client = harness.labeling.client
    if body is None:
        response = client.post(f"/v1/tasks/{task['id']}/skip", headers=headers)
    else:
        response = client.post(f"/v1/tasks/{task['id']}/annotations", json=body, headers=headers)
    assert response.status_code in (200, 201), response.get_json()
    return response.get_json()


def test_my_counts_skips_and_agreement_with_consensus(harness) -> None:
    reviews = harness.dataset(overlap=2)
    news = harness.dataset(name="news", task_type="token_classification", labels=["PER", "LOC"], overlap=2)
    harness.push(reviews, ["agreed", "outvoted", "undecided", "skipped"])
    pushed = harness.ingestion.client.post(
        f"/v1/datasets/{news}/items",
        json={"items": [{"text": "Ana lives in Lisbon"}, {"text": "Bea lives in Madrid"}]},
        headers=harness.partner,
    )
    assert pushed.status_code == 200
    harness.wait_tasks(reviews, 4)
    harness.wait_tasks(news, 2)
    alice = harness.annotator("alice", reviews, news)
    bob = harness.annotator("bob", reviews, news)
    carol = harness.annotator("carol", reviews)

    fresh = me(harness, alice)
    assert fresh["name"] == "alice" and fresh["tenant"] == harness.tenant
    assert [(d["dataset_id"], d["annotations"], d["agreement_with_consensus"]) for d in fresh["datasets"]] == sorted(
        [(reviews, 0, None), (news, 0, None)]
    )

    for body in ({"label": "pos"}, {"label": "neg"}, {"label": "pos"}, None):  # agreed, outvoted, undecided, skip
        answer(harness, alice, reviews, body)
    answer(harness, bob, reviews, {"label": "pos"})  # "agreed": pos, pos -> done
    assert answer(harness, bob, reviews, {"label": "pos"})["task_status"] == "open", "outvoted: a tie escalates"
    assert answer(harness, carol, reviews, {"label": "pos"})["consensus_label"] == "pos"
    # News: the same spans on the first text (agreed); different spans on the second (a tie: undecided).
    answer(harness, alice, news, {"spans": [PER, LOC]})
    answer(harness, alice, news, {"spans": [PER]})
    assert answer(harness, bob, news, {"spans": [LOC, PER]})["task_status"] == "done"
    assert answer(harness, bob, news, {"spans": []})["task_status"] == "open"

    figures = {d["dataset_id"]: d for d in me(harness, alice)["datasets"]}
    assert figures[reviews] | {"labels": None} == {
        "dataset_id": reviews,
        "name": "reviews",
        "task_type": "text_classification",
        "labels": None,
        "annotations": 3,
        "skips": 1,
        "decided": 2,
        "agreed": 1,
        "agreement_with_consensus": 0.5,
    }
    assert (figures[news]["annotations"], figures[news]["skips"], figures[news]["decided"]) == (2, 0, 1)
    assert figures[news]["agreement_with_consensus"] == 1.0 and figures[news]["labels"] == ["PER", "LOC"]
    bobs = {d["dataset_id"]: d for d in me(harness, bob)["datasets"]}
    assert (bobs[reviews]["annotations"], bobs[reviews]["agreement_with_consensus"]) == (2, 1.0)
    carols = me(harness, carol)["datasets"]
    assert [(d["dataset_id"], d["annotations"], d["agreed"]) for d in carols] == [(reviews, 1, 1)]


def test_me_needs_an_annotator_token(harness) -> None:
    client = harness.labeling.client
    assert client.get("/v1/annotators/me").status_code == 401
    assert client.get("/v1/annotators/me", headers=harness.partner).status_code == 401
    assert client.get("/v1/annotators/me", headers=INTERNAL).status_code == 401
    assert client.get("/v1/annotators/me", headers=bearer("fwa_forged")).status_code == 401
