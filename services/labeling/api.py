"""Labeling's HTTP API."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask_smorest import Blueprint
from sqlalchemy import select

from services.labeling.models import LabelingDataset, Task
from services.labeling.schemas import TaskListQuery, TaskListSchema
from shared.auth import current_principal, require_partner
from shared.errors import NotFound

datasets = Blueprint("labeling_datasets", __name__, url_prefix="/v1/datasets", description="Labeling tasks")


@datasets.get("/<dataset_id>/tasks")
@require_partner
@datasets.arguments(TaskListQuery, location="query")
@datasets.response(200, TaskListSchema)
def list_tasks(query: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """The dataset's labeling tasks in creation order, paged by the `after` cursor."""
    runtime = current_app.extensions["flywheel"]
    with runtime.db.session() as session:
        dataset = session.get(LabelingDataset, dataset_id)
        if dataset is None or dataset.tenant != current_principal().tenant:
            raise NotFound(f"dataset {dataset_id} does not exist")
        tasks = session.scalars(
            select(Task)
            .where(Task.dataset_id == dataset_id, Task.id > query["after"])
            .order_by(Task.id)
            .limit(query["limit"])
        ).all()
    next_after = tasks[-1].id if len(tasks) == query["limit"] else None
    return {"tasks": tasks, "next_after": next_after}
