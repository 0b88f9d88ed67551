"""Where one process stands in a training job: its rank among the processes of one run, the device it
trains on, and the few collective operations the trainer and the pipeline need (broadcast, any, DDP wrap).

A lone process is a world of one, and every operation is then a no-op; under `torchrun` the process joins
the job's process group (NCCL on GPUs, gloo on CPUs). Launching a run is `services.training.distributed`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class World:
    """Where this process stands in a (possibly one-process) training job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_launcher(cls, backend: str | None = None, timeout_s: float = 1800) -> World:
        """Join the process group when started by torchrun; a lone process is a world of one."""
        if not dist.is_torchelastic_launched():
            return cls()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        local_rank = dist.get_node_local_rank(fallback_rank=dist.get_rank())
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, backend)

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        if not self.distributed:
            return model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def broadcast(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any rank."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([1.0 if flag else 0.0], device=device if self.backend == "nccl" else "cpu")
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()
