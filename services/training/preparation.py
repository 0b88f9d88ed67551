"""A run's task made ready to train: the text, image or token model, its datasets and collators (`spec.PreparedTask`),
for the run's training (`pipeline.py`) and for each trial of its recipe search (`search.py`) alike."""

from __future__ import annotations

from typing import Any

from services.training.runs import RunInfo
from services.training.spec import PreparedTask
from shared.runtime import Runtime


def prepare_task(runtime: Runtime, run: RunInfo, data: Any) -> PreparedTask:
    if run.task_type == "token_classification":
        from services.training.token_runs import prepare_token_run

        return prepare_token_run(data, run.hyperparameters, run.base_model)
    if run.task_type == "text_classification":
        from services.training.text_model import prepare_text_task

        return prepare_text_task(data, run.hyperparameters, run.base_model)
    from services.training.image_model import prepare_image_task

    return prepare_image_task(runtime.storage, data, run.hyperparameters, run.base_model)
