"""Reading a task's item from object storage: a byte range of a packed object, or a whole object."""

from __future__ import annotations

import hashlib

from services.labeling.models import Task
from shared.errors import ServiceUnavailable
from shared.storage import ObjectStore


def task_content(storage: ObjectStore, task: Task) -> bytes:
    if task.offset is not None:
        data = storage.get_range(task.bucket, task.object_key, task.offset, task.length)
    else:
        data = storage.get_bytes(task.bucket, task.object_key, verify=False)
    if hashlib.sha256(data).hexdigest() != task.sha256:
        raise ServiceUnavailable(f"the content of task {task.id} does not match its sha256 (erased or corrupt)")
    return data
