"""A recipe search's winner, kept (`keep_winner`): labeling lays it over the dataset's training settings, and
the next retrain cycle asks training for it."""

from __future__ import annotations

import pytest

from tests.helpers import eventually

pytestmark = pytest.mark.timeout(60)


def test_a_kept_recipe_is_laid_over_the_datasets_training_hyperparameters(harness) -> None:
    dataset = harness.dataset()
    path = f"/v1/datasets/{dataset}/settings"
    answer = harness.labeling.client.patch(
        path, json={"training_hyperparameters": {"seed": 5, "epochs": 8}}, headers=harness.partner
    )
    assert answer.status_code == 200, answer.get_json()
    harness.send(
        "training.recipe_chosen",
        {
            "run_id": "run_searched",
            "dataset_id": dataset,
            "snapshot_id": "snap_1",
            "model_name": "reviews",
            "hyperparameters": {"epochs": 3, "learning_rate": 0.0003},
            "validation_macro_f1": 0.81,
        },
    )

    def kept() -> dict | None:
        shown = harness.labeling.client.get(f"/v1/datasets/{dataset}", headers=harness.partner).get_json()
        hyperparameters = shown["training_hyperparameters"]
        return hyperparameters if hyperparameters.get("epochs") == 3 else None

    # The winner's values replace the ones it searched; the owner's other settings stay.
    assert eventually(kept, timeout=30, what="the kept recipe") == {"seed": 5, "epochs": 3, "learning_rate": 0.0003}
