"""A run's checkpoints in object storage: the state after the last finished epoch, and the best model so far.

    checkpoints/<tenant>/<run_id>/checkpoint.pt    trainer state (model, optimizer, scheduler, history)
    checkpoints/<tenant>/<run_id>/best.pt          weights of the epoch with the best validation macro-F1

Both are `torch.save`d state dicts that never leave our storage; they are read back with
`torch.load(weights_only=True)`, which loads tensors and plain containers only, never code.

While every epoch improves, the best weights are the checkpoint's own and `best.pt` is not written (a large
model's weights cross the network once per epoch, not twice). After the first epoch that does not improve,
`best.pt` holds the best epoch's weights; it is always written before the `checkpoint.pt` that refers to it.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from shared.artifacts import CHECKPOINTS_BUCKET, checkpoint_key
from shared.logging import get_logger
from shared.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

log = get_logger(__name__)


class CheckpointStore:
    def __init__(self, store: ObjectStore, tenant: str, run_id: str) -> None:
        self.store = store
        self.key = checkpoint_key(tenant, run_id)
        self.best_key = self.key.rsplit("/", 1)[0] + "/best.pt"
        self._best_saved_for: int | None = None

    def save(self, state: dict[str, Any], best_state: dict[str, Any] | None) -> None:
        """Keep `state` (the trainer's checkpoint); `best_state` are the weights of epoch `state["best_epoch"]`."""
        best_epoch = state["best_epoch"]
        if best_epoch != state["epoch"] and self._best_saved_for != best_epoch and best_state is not None:
            self._put(self.best_key, {"epoch": best_epoch, "model": best_state})
            self._best_saved_for = best_epoch
        self._put(self.key, state)

    def load(self) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
        """The last checkpoint and the best weights it refers to, or None to start from the beginning."""
        state = self._get(self.key)
        if state is None:
            return None
        if not state["best_epoch"]:
            return state, None
        if state["best_epoch"] == state["epoch"]:
            return state, state["model"]
        best = self._get(self.best_key)
        if best is None or best.get("epoch") != state["best_epoch"]:
            log.warning("checkpoint_best_missing", key=self.best_key, action="starting over")
            return None
        self._best_saved_for = best["epoch"]
        return state, best["model"]

    def delete(self) -> None:
        for key in (self.key, self.best_key):
            try:
                self.store.delete(CHECKPOINTS_BUCKET, key)
            except Exception as exc:  # leftovers cost storage only; the run's outcome is already recorded
                log.warning("checkpoint_delete_failed", key=key, error=str(exc)[:300])

    def _put(self, key: str, state: dict[str, Any]) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.store.put(CHECKPOINTS_BUCKET, key, buffer.getvalue())

    def _get(self, key: str) -> dict[str, Any] | None:
        try:
            data = self.store.get_bytes(CHECKPOINTS_BUCKET, key)
        except ObjectNotFound:
            return None
        except ChecksumMismatch as exc:
            log.warning("checkpoint_corrupt", key=key, error=str(exc)[:300], action="ignored")
            return None
        try:
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:
            log.warning("checkpoint_unreadable", key=key, error=str(exc)[:300], action="ignored")
            return None
