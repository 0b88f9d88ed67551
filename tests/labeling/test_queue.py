"""The annotation queue: leases, overlap, consensus, escalation, review, and what annotators may do."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import select

from services.labeling.models import Annotation, Task
from tests.helpers import bearer, create_partner, eventually, in_lock_order

pytestmark = pytest.mark.timeout(120)


def test_leases_expire_and_abandoned_tasks_return_to_the_queue(harness) -> None:
    dataset = harness.dataset(overlap=1)
    harness.push(dataset, ["first", "second"])
    harness.wait_tasks(dataset, 2)
    alice = harness.annotator("alice", dataset)
    bob = harness.annotator("bob", dataset)
    held = harness.next(alice, dataset, lease_seconds=5)
    assert held["text"] == "first" and held["prelabel"] is None
    assert harness.next(alice, dataset, lease_seconds=5)["id"] == held["id"], "asking again renews the lease"
    other = harness.next(bob, dataset)
    assert other["id"] != held["id"] and other["text"] == "second"
    assert harness.label(bob, other["id"], "pos").status_code == 201
    assert harness.next(bob, dataset) is None, "alice's lease still holds the only open task"
    time.sleep(5.5)
    assert harness.next(bob, dataset)["id"] == held["id"], "an abandoned task returns once its lease expires"
    late = harness.label(alice, held["id"], "neg")
    assert late.status_code == 409 and "lease" in late.get_json()["error"]["message"]


def test_overlap_is_never_exceeded_under_concurrent_annotators(harness_factory, postgres_database) -> None:
    harness = harness_factory(database_url=postgres_database())
    dataset = harness.dataset(overlap=2)
    harness.push(dataset, [f"review {i}" for i in range(12)])
    harness.wait_tasks(dataset, 12)
    tokens = [harness.annotator(f"annotator-{i}", dataset) for i in range(5)]
    errors: list[str] = []

    def work(headers: dict[str, str]) -> None:
        while True:
            task = harness.next(headers, dataset)
            if task is None:
                return
            response = harness.label(headers, task["id"], "pos")
            if response.status_code not in (200, 201):
                errors.append(str(response.get_json()))

    threads = [threading.Thread(target=work, args=(t,)) for t in tokens]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    with harness.worker.db.session() as session:
        rows = session.execute(select(Annotation.task_id, Annotation.annotator_id)).all()
    per_task = Counter(task_id for task_id, _ in rows)
    assert len(per_task) == 12 and set(per_task.values()) == {2}, per_task
    assert len(set(rows)) == len(rows), "nobody labels a task twice"
    assert harness.task_count(dataset, "done") == 12


def test_majority_decides_and_a_tie_escalates_to_one_more_annotator(harness) -> None:
    dataset = harness.dataset(overlap=2, labels=["a", "b", "c"])
    harness.push(dataset, ["tie then majority"])
    harness.wait_tasks(dataset, 1)
    results = []
    for index, label in enumerate(["a", "b", "b"]):
        person = harness.annotator(f"p{index}", dataset)
        task = harness.next(person, dataset)
        assert task is not None, f"annotator {index} should get the task"
        results.append(harness.label(person, task["id"], label).get_json())
        if index == 1:
            tasks = harness.labeling.client.get(f"/v1/datasets/{dataset}/tasks", headers=harness.partner).get_json()
            assert tasks["tasks"][0]["required"] == 3, "a tie asks for one more label"
    assert [r["task_status"] for r in results] == ["open", "open", "done"]
    assert results[-1]["consensus_label"] == "b"
    stats = harness.labeling.client.get(f"/v1/datasets/{dataset}/stats", headers=harness.partner).get_json()
    assert stats["tasks"] == {"done": 1} and stats["label_counts"] == {"b": 1}
    assert stats["percent_agreement"] == pytest.approx(1 / 3)
    assert sorted(a["agreement_with_consensus"] for a in stats["annotators"]) == [0.0, 1.0, 1.0]


def test_review_after_escalations_and_owner_resolution(harness) -> None:
    dataset = harness.dataset(overlap=2, labels=["a", "b", "c", "d"])
    patched = harness.labeling.client.patch(
        f"/v1/datasets/{dataset}/settings", json={"max_extra_annotations": 1}, headers=harness.partner
    )
    assert patched.status_code == 200, patched.get_json()
    harness.push(dataset, ["contested"])
    harness.wait_tasks(dataset, 1)
    outcomes = []
    for index, label in enumerate(["a", "b", "c"]):
        person = harness.annotator(f"r{index}", dataset)
        task = harness.next(person, dataset)
        outcomes.append(harness.label(person, task["id"], label).get_json())
    assert outcomes[-1]["task_status"] == "review"
    late = harness.annotator("late", dataset)
    assert harness.next(late, dataset) is None, "a task in review is not handed out"
    resolved = harness.labeling.client.post(
        f"/v1/tasks/{outcomes[-1]['task_id']}/resolve", json={"label": "c"}, headers=harness.partner
    )
    assert resolved.status_code == 200
    assert resolved.get_json()["consensus_label"] == "c" and resolved.get_json()["consensus_source"] == "review"


def test_edits_before_consensus_and_bad_input(harness) -> None:
    dataset = harness.dataset(overlap=2)
    harness.push(dataset, ["edit me"])
    harness.wait_tasks(dataset, 1)
    alice = harness.annotator("alice", dataset)
    task = harness.next(alice, dataset)
    bad = harness.label(alice, task["id"], "maybe")
    assert bad.status_code == 422 and "label set" in bad.get_json()["error"]["message"]
    assert harness.label(alice, task["id"], "pos").status_code == 201
    edit = harness.label(alice, task["id"], "neg")
    assert edit.status_code == 200 and edit.get_json()["label"] == "neg"
    bob = harness.annotator("bob", dataset)
    done = harness.label(bob, harness.next(bob, dataset)["id"], "neg").get_json()
    assert done["task_status"] == "done"
    assert harness.label(alice, task["id"], "pos").status_code == 409, "no edits after consensus"

    client = harness.labeling.client
    assert client.get(f"/v1/datasets/{dataset}/tasks/next").status_code == 401
    assert client.get(f"/v1/datasets/{dataset}/tasks/next", headers=bearer("fwa_forged")).status_code == 401
    assert harness.label(alice, 99_999, "pos").status_code == 404
    other_dataset = harness.dataset(name="other")
    assert client.get(f"/v1/datasets/{other_dataset}/tasks/next", headers=alice).status_code == 404
    missing = client.post(
        "/v1/annotators",
        json={"tenant": harness.tenant, "name": "x", "datasets": ["ds_nope"]},
        headers={"Authorization": "Bearer test-internal-token"},
    )
    assert missing.status_code == 422
    assert (
        client.post(
            "/v1/annotators",
            json={"tenant": harness.tenant, "name": "x", "datasets": [dataset]},
            headers=harness.partner,
        ).status_code
        == 401
    )


def test_other_tenants_see_404_everywhere(harness) -> None:
    dataset = harness.dataset()
    harness.push(dataset, ["mine"], ["pos"])
    harness.wait_tasks(dataset, 1)
    snapshot = harness.labeling.client.post(f"/v1/datasets/{dataset}/snapshots", headers=harness.partner).get_json()
    stranger = bearer(create_partner(harness.ingestion.client, "globex")["api_key"])
    client = harness.labeling.client
    for path in (
        f"/v1/datasets/{dataset}",
        f"/v1/datasets/{dataset}/tasks",
        f"/v1/datasets/{dataset}/stats",
        f"/v1/datasets/{dataset}/snapshots",
        f"/v1/snapshots/{snapshot['id']}",
        f"/v1/snapshots/{snapshot['id']}/export",
    ):
        assert client.get(path, headers=stranger).status_code == 404, path
    assert client.post(f"/v1/datasets/{dataset}/snapshots", headers=stranger).status_code == 404
    assert client.post("/v1/tasks/1/resolve", json={"label": "pos"}, headers=stranger).status_code == 404


def test_partner_labels_count_and_deleted_items_are_withdrawn(harness) -> None:
    dataset = harness.dataset(overlap=1)
    ids = harness.push(dataset, ["labeled by partner", "to be erased"], ["pos", None])
    harness.wait_tasks(dataset, 2)
    assert harness.task_count(dataset, "done") == 1
    harness.ingestion.client.delete(f"/v1/items/{ids[1]}", headers=harness.partner)
    eventually(lambda: harness.task_count(dataset, "withdrawn") == 1, what="the erased item's task withdrawn")
    alice = harness.annotator("alice", dataset)
    assert harness.next(alice, dataset) is None


def test_simultaneous_requests_never_lease_one_task_twice(harness_factory, postgres_database) -> None:
    # Annotators who ask at the same instant race for the same first task: the loser of the row lock must
    # see the winner's lease and move on, not hand the task out a second time (overlap is 1).
    harness = harness_factory(database_url=postgres_database())
    dataset = harness.dataset(overlap=1)
    people, rounds = 6, 5
    harness.push(dataset, [f"review {i}" for i in range(people * rounds)])
    harness.wait_tasks(dataset, people * rounds)
    tokens = [harness.annotator(f"annotator-{i}", dataset) for i in range(people)]
    for round_number in range(rounds):
        barrier = threading.Barrier(people)
        handed: list[int | None] = []

        def ask(headers: dict[str, str], barrier: threading.Barrier, handed: list[int | None]) -> None:
            barrier.wait()
            task = harness.next(headers, dataset)
            handed.append(None if task is None else task["id"])

        threads = [threading.Thread(target=ask, args=(t, barrier, handed)) for t in tokens]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert None not in handed and len(set(handed)) == people, f"round {round_number}: {sorted(handed)}"
        for headers in tokens:  # each labels the task it holds, so the next round starts from fresh leases
            held = harness.next(headers, dataset)
            assert harness.label(headers, held["id"], "pos").status_code == 201


def test_an_edit_that_waited_behind_the_deciding_label_is_refused(harness_factory, postgres_database) -> None:
    # Bob's label decides the task while Alice's edit of her own label waits for the dataset's lock. When
    # Alice's turn comes the task is done: her edit must be refused, not applied on top of the consensus.
    database_url = postgres_database()
    harness = harness_factory(database_url=database_url)
    dataset = harness.dataset(overlap=2)
    harness.push(dataset, ["contested"])
    harness.wait_tasks(dataset, 1)
    alice, bob = harness.annotator("alice", dataset), harness.annotator("bob", dataset)
    task_id = harness.next(alice, dataset)["id"]
    assert harness.label(alice, task_id, "pos").status_code == 201
    assert harness.next(bob, dataset)["id"] == task_id

    def post(headers: dict[str, str], label: str) -> Callable[[], int]:
        return lambda: harness.label(headers, task_id, label).status_code

    lock = "SELECT id FROM datasets WHERE id = %s FOR UPDATE"
    # Bob's label queues for the dataset's lock first, then Alice's edit.
    bob_answer, alice_answer = in_lock_order(database_url, lock, (dataset,), [post(bob, "pos"), post(alice, "neg")])
    answers = {"bob": bob_answer, "alice": alice_answer}
    assert answers == {"bob": 201, "alice": 409}
    with harness.worker.db.session() as session:
        labels = dict(session.execute(select(Annotation.annotator_id, Annotation.label)).all())
        task = session.get(Task, task_id)
        assert (task.status, task.consensus_label, task.required) == ("done", "pos", 2)
    assert sorted(labels.values()) == ["pos", "pos"], "the consensus stands on the labels it was formed from"
