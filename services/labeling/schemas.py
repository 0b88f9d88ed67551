"""Labeling's request and response schemas (marshmallow)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate


class TaskSchema(Schema):
    id = fields.Integer()
    item_id = fields.String()
    dataset_id = fields.String()
    kind = fields.String()
    sha256 = fields.String()
    partner_label = fields.String(allow_none=True)
    status = fields.String()
    created_at = fields.DateTime()


class TaskListQuery(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    after = fields.Integer(load_default=0, validate=validate.Range(min=0))


class TaskListSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema))
    next_after = fields.Integer(allow_none=True)
