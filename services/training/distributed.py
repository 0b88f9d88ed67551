"""Distributed training: one run across several processes with DistributedDataParallel.

The same entry point runs a run in one process or under `torchrun`:

    torchrun --nproc_per_node=2 -m services.training.distributed RUN_ID      # 2 processes, one machine
    python -m services.training.distributed RUN_ID                           # one process

Under torchrun every process joins one process group (NCCL on GPUs, gloo on CPUs), trains its shard of
each epoch (DistributedSampler) and all-reduces gradients; rank 0 alone holds the run's lease, evaluates,
checkpoints, exports and publishes. A run meant for such a launcher is created with `"launch": "external"`
(`POST /v1/runs`), so that no worker picks it up from the queue. It reads the same environment as every
other process of the service (`FLYWHEEL_HOME`, `TRAINING_DATABASE_URL`, `S3_ENDPOINT`, `REDIS_URL`, ...).
"""

from __future__ import annotations

import argparse
import sys

from services.training.world import World


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute one training run, alone or as one rank under torchrun.")
    parser.add_argument("run_id")
    parser.add_argument("--backend", choices=("nccl", "gloo"), default=None, help="default: nccl on GPU, else gloo")
    args = parser.parse_args(argv)

    from services.training.app import SPEC
    from services.training.pipeline import Outcome, execute_run
    from shared.runtime import Runtime

    world = World.from_launcher(args.backend)
    runtime = Runtime(SPEC)
    if world.is_main:
        runtime.start()
    try:
        outcome = execute_run(runtime, args.run_id, world=world)
    finally:
        world.close()
        runtime.close()
    return 0 if outcome is Outcome.SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
