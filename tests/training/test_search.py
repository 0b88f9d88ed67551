"""A run's recipe search: optuna trials on the training workers, bounded by trials and wall time, the winner
trained, exported and published; bad search bounds answer 422 before anything is recorded."""

from __future__ import annotations

from datetime import datetime

import optuna
import pytest

from services.training.search import distributions, open_study
from services.training.search_space import DEFAULT_SPACES, resolve_search
from tests.helpers import INTERNAL
from tests.training.support import (
    all_runs,
    published,
    request_training,
    text_items,
    wait_for_run,
    write_snapshot,
)

pytestmark = pytest.mark.timeout(120)

LABELS = ["databases", "numerics", "web"]
SPACE = {
    "learning_rate": {"low": 1e-4, "high": 1e-3, "log": True},
    "epochs": {"low": 2, "high": 3},
    "max_length": {"choices": [16, 24]},
    "batch_size": {"choices": [8, 16]},
    "weight_decay": None,
    "dropout": None,
}
MAX_SECONDS = 90


def snapshot(storage, per_label: int = 12) -> dict:
    return write_snapshot(
        storage,
        tenant="acme",
        dataset_id="ds_docs",
        task_type="text_classification",
        labels=LABELS,
        items=text_items(per_label=per_label),
    )


@pytest.mark.slow
@pytest.mark.parametrize("database", ["sqlite", "postgres"])
def test_a_two_trial_search_finishes_within_its_budget_and_publishes_the_best_trial(
    request, platform, worker, tiny_bert, database
) -> None:
    """On either database: the study lives in the training service's own, shared by both trials' workers."""
    overrides = {"database_url": request.getfixturevalue("postgres_database")()} if database == "postgres" else {}
    api = platform("training", **overrides)
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot(api.runtime.storage)["snapshot_id"],
        "base_model": tiny_bert,
        "hyperparameters": {"head_learning_rate": 1e-2, "early_stopping_patience": 0, "seed": 3},
        "search": {"trials": 2, "max_seconds": MAX_SECONDS, "space": SPACE, "keep_winner": True},
    }
    with worker("training", **overrides) as training:
        created = api.client.post("/v1/runs", json=body, headers=INTERNAL)
        assert created.status_code == 202, created.get_json()
        run_id = created.get_json()["id"]
        assert created.get_json()["search"]["state"] == "waiting"
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=110, run_id=run_id)
        assert run.status == "succeeded", run.failure_reason
        shown = api.client.get(f"/v1/runs/{run_id}", headers=INTERNAL).get_json()
        study = open_study(training, _run_info(training, run_id))
        study_trials = {trial.number: trial for trial in study.get_trials(deepcopy=False)}

    search = shown["search"]
    assert search["state"] == "chosen"
    assert search["settings"]["trials"] == 2 and search["settings"]["pruner"] == "median"
    assert set(search["settings"]["space"]) == {"learning_rate", "epochs", "max_length", "batch_size"}
    # Within its budget: the whole search, and so each trial, took less than max_seconds.
    started, finished = (datetime.fromisoformat(search[name]) for name in ("started_at", "finished_at"))
    assert 0 < search["seconds"] == pytest.approx((finished - started).total_seconds(), abs=0.01)
    assert search["seconds"] < MAX_SECONDS

    trials = search["trials"]
    assert [trial["number"] for trial in trials] == [0, 1]
    assert len(study_trials) == 2 and {trial["study_trial"] for trial in trials} == set(study_trials)
    assert trials[0]["params"] != trials[1]["params"]  # trials asked at once on two workers drew different values
    for trial in trials:
        assert trial["state"] in ("complete", "pruned"), trial
        assert 0 < trial["seconds"] <= search["seconds"]
        # Each trial tried values inside the searched space, and recorded one validation score per epoch.
        params = trial["params"]
        assert set(params) == set(search["settings"]["space"])
        assert 1e-4 <= params["learning_rate"] <= 1e-3 and params["epochs"] in (2, 3)
        assert params["max_length"] in (16, 24) and params["batch_size"] in (8, 16)
        epochs = [epoch["epoch"] for epoch in trial["history"]]
        assert epochs == list(range(1, len(epochs) + 1))
        scores = [epoch["macro_f1"] for epoch in trial["history"]]
        assert trial["validation_macro_f1"] == pytest.approx(max(scores), abs=1e-6)
        # What the run shows is what optuna recorded: the same values, state and per-epoch reports.
        recorded = study_trials[trial["study_trial"]]
        assert recorded.params == params
        assert recorded.intermediate_values == pytest.approx(dict(zip(epochs, scores, strict=True)), abs=1e-6)
        if trial["state"] == "complete":
            assert len(epochs) == params["epochs"] and trial["reason"] is None
            assert recorded.state == optuna.trial.TrialState.COMPLETE
            assert recorded.value == pytest.approx(trial["validation_macro_f1"], abs=1e-6)
        else:
            assert len(epochs) < params["epochs"] and trial["reason"].startswith("pruned after epoch")
            assert recorded.state == optuna.trial.TrialState.PRUNED

    # The chosen trial is the complete one with the best validation macro-F1, and its recipe is what was trained.
    complete = [trial for trial in trials if trial["state"] == "complete"]
    best = max(complete, key=lambda trial: trial["validation_macro_f1"])
    assert search["chosen"] == {
        "trial": best["number"],
        "params": best["params"],
        "validation_macro_f1": best["validation_macro_f1"],
    }
    assert {name: shown["hyperparameters"][name] for name in best["params"]} == best["params"]
    assert shown["progress"]["epochs"] == best["params"]["epochs"] == len(run.history)
    [completed] = published(api.runtime, "training.completed", run_id)
    metadata = completed["payload"]["metadata"]
    assert {name: metadata["hyperparameters"][name] for name in best["params"]} == best["params"]
    assert metadata["preprocessing"]["max_length"] == best["params"]["max_length"]
    assert "model.onnx" in completed["payload"]["artifacts"] and completed["payload"]["evaluation"] is not None
    assert "test" in shown["metrics"]

    # keep_winner: one training.recipe_chosen with the winning values, for labeling to keep.
    [kept] = published(api.runtime, "training.recipe_chosen", run_id)
    assert kept["tenant"] == "acme"
    assert kept["payload"]["dataset_id"] == "ds_docs"
    assert kept["payload"]["hyperparameters"] == best["params"]


def _run_info(runtime, run_id: str):
    from services.training.runs import RunInfo

    [run] = [run for run in all_runs(runtime) if run.id == run_id]
    return RunInfo.of(run)


@pytest.mark.parametrize(
    ("search", "field", "message"),
    [
        ({"trials": 0, "max_seconds": 60}, "trials", "greater than or equal to 1"),
        ({"trials": 2, "max_seconds": 3}, "max_seconds", "greater than or equal to 10"),
        ({"max_seconds": 60}, "trials", "Missing data"),
        ({"trials": 2, "max_seconds": 60, "pruner": "hyperband"}, "pruner", "Must be one of"),
        ({"trials": 2, "max_seconds": 60, "space": {"epochs": {"low": 5, "high": 2}}}, "space.epochs", "above high"),
        (
            {"trials": 2, "max_seconds": 60, "space": {"learning_rate": {"low": 0, "high": 0.1, "log": True}}},
            "space.learning_rate",
            "0: Must be greater than 0",
        ),
        ({"trials": 2, "max_seconds": 60, "space": {"image_size": {"low": 32, "high": 64}}}, "space.image_size", ""),
        ({"trials": 2, "max_seconds": 60, "space": {"batch_size": {"choices": []}}}, "space.batch_size", "non-empty"),
        ({"trials": 2, "max_seconds": 60, "space": {"max_length": {"low": 4, "high": 64}}}, "space.max_length", "8"),
    ],
)
def test_bad_search_bounds_answer_422_and_record_nothing(platform, search, field, message) -> None:
    api = platform("training")
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot(api.runtime.storage, per_label=4)["snapshot_id"],
        "search": search,
    }
    answer = api.client.post("/v1/runs", json=body, headers=INTERNAL)
    assert answer.status_code == 422, answer.get_json()
    error = answer.get_json()["error"]
    assert error["code"] == "validation_failed" or error["code"]
    problems = _find(error["details"], field)
    assert problems is not None, error
    assert message in " ".join(problems), problems
    assert api.client.get("/v1/runs", headers=INTERNAL).get_json()["runs"] == []


def test_a_requested_search_with_bad_bounds_is_recorded_as_a_failed_run_with_its_reason(worker) -> None:
    with worker("training") as training:
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_docs",
            snapshot=snapshot(training.storage, per_label=4),
            task_type="text_classification",
            labels=LABELS,
            search={"trials": 2, "max_seconds": 60, "space": {"epochs": {"low": 4, "high": 2}}},
        )
        run = wait_for_run(training, status="failed", timeout=30)
    assert "search" in run.failure_reason and "low (4) is above high (2)" in run.failure_reason
    [failed] = published(training, "training.failed", run.id)
    assert failed["payload"]["reason"] == run.failure_reason


def test_an_external_launch_cannot_search_and_the_api_documents_the_search(platform) -> None:
    api = platform("training")
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot(api.runtime.storage, per_label=4)["snapshot_id"],
        "launch": "external",
        "search": {"trials": 2, "max_seconds": 60},
    }
    answer = api.client.post("/v1/runs", json=body, headers=INTERNAL)
    assert answer.status_code == 422
    assert "launch must be queue" in " ".join(_find(answer.get_json()["error"]["details"], "launch"))

    schemas = api.client.get("/openapi.json").get_json()["components"]["schemas"]
    assert {"trials", "max_seconds", "space", "pruner", "keep_winner"} == set(schemas["SearchRequest"]["properties"])
    assert "search" in schemas["RunCreate"]["properties"] and "search" in schemas["Run"]["properties"]
    assert {"params", "history", "state", "seconds"} <= set(schemas["Trial"]["properties"])


def test_a_search_without_a_space_records_the_whole_default_space_as_trials_ask_it(platform) -> None:
    api = platform("training")
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot(api.runtime.storage, per_label=4)["snapshot_id"],
        "search": {"trials": 2, "max_seconds": 60},
    }
    answer = api.client.post("/v1/runs", json=body, headers=INTERNAL)
    assert answer.status_code in (201, 202), answer.get_json()
    space = answer.get_json()["search"]["settings"]["space"]
    assert set(space) == set(DEFAULT_SPACES["text_classification"])
    for task_type in DEFAULT_SPACES:  # and the image task's default space, as a run would resolve it
        resolved = resolve_search(task_type, {"trials": 2, "max_seconds": 60}, launch="queue")
        space = resolved["space"] if task_type != "text_classification" else space
        assert all("choices" in bounds or {"low", "high", "log"} <= set(bounds) for bounds in space.values()), space
        asked = optuna.create_study().ask(distributions(space)).params  # what a trial does first
        assert set(asked) == set(DEFAULT_SPACES[task_type])


def _find(details, field: str):
    """The messages of `field` anywhere in a 422's nested details."""
    if isinstance(details, dict):
        for key, value in details.items():
            if key == field and isinstance(value, list):
                return [str(v) for v in value]
            found = _find(value, field)
            if found is not None:
                return found
    return None


@pytest.mark.slow
def test_a_trial_below_the_median_is_pruned_and_a_search_without_a_complete_trial_fails(
    platform, worker, tiny_bert
) -> None:
    api = platform("training")
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot(api.runtime.storage)["snapshot_id"],
        "base_model": tiny_bert,
        "hyperparameters": {"head_learning_rate": 1e-3, "early_stopping_patience": 0},
        "search": {"trials": 1, "max_seconds": MAX_SECONDS, "space": {**SPACE, "epochs": {"low": 3, "high": 3}}},
    }
    run_id = api.client.post("/v1/runs", json=body, headers=INTERNAL).get_json()["id"]
    # Before any worker starts: the study already holds a perfect trial, so the median at every epoch is 1.0.
    study = open_study(api.runtime, _run_info(api.runtime, run_id))
    perfect = optuna.trial.create_trial(
        params={"epochs": 3},
        distributions={"epochs": optuna.distributions.IntDistribution(3, 3)},
        value=1.0,
        intermediate_values={1: 1.0, 2: 1.0, 3: 1.0},
    )
    study.add_trial(perfect)
    with worker("training") as training:
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=100, run_id=run_id)
    shown = api.client.get(f"/v1/runs/{run_id}", headers=INTERNAL).get_json()
    [trial] = shown["search"]["trials"]
    assert trial["history"][0]["macro_f1"] < 1.0, trial  # the tiny model is not perfect after one epoch
    assert trial["state"] == "pruned" and trial["reason"].startswith("pruned after epoch 1"), trial
    assert len(trial["history"]) == 1
    assert study.trials[trial["study_trial"]].state == optuna.trial.TrialState.PRUNED
    assert run.status == "failed" and "completed no trial" in run.failure_reason
    assert shown["search"]["state"] == "failed" and shown["search"]["chosen"] is None
    assert published(api.runtime, "training.completed", run_id) == []
    assert published(api.runtime, "training.recipe_chosen", run_id) == []
