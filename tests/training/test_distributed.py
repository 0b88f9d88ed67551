"""Two processes under torchrun, DistributedDataParallel over gloo on the CPU, one run, one result.

The run starts from mobilenet_v3_small weights imported into the `base-models` bucket (random weights saved by the test
stand in for pretrained ones: nothing is downloaded), so the run's lineage names their sha256.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from services.training.base_models import IMAGE_ARCHITECTURES, import_base_model
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import INTERNAL
from tests.training.support import all_runs, digits_run_body, published

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_a_two_process_gloo_ddp_run(platform, settings, tmp_path) -> None:
    api = platform("training")
    weights = tmp_path / "mobilenet.safetensors"
    save_file(IMAGE_ARCHITECTURES["mobilenet_v3_small"].build(1000).state_dict(), str(weights))
    imported = import_base_model(api.runtime, "mobilenet_v3_small", weights)
    body = digits_run_body(
        api.runtime.storage,
        digits=(0, 1, 2),
        count=90,
        hyperparameters={"epochs": 2, "batch_size": 8, "early_stopping_patience": 0},
        launch="external",
    )
    run_id = api.client.post("/v1/runs", json=body, headers=INTERNAL).get_json()["id"]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(settings.home)),
        "PYTHONPATH": str(REPO),
        "FLYWHEEL_HOME": str(settings.home),
        "REDIS_URL": settings.redis_url,
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "FLYWHEEL_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "TRAINING_DATABASE_URL": f"sqlite:///{settings.home / 'db' / 'training.sqlite3'}",
        "OMP_NUM_THREADS": "1",  # see tests/training/conftest.py
    }
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "-m",
        "services.training.distributed",
        run_id,
    ]
    done = subprocess.run(launch, cwd=REPO, env=env, capture_output=True, text=True, timeout=160, check=False)
    output = done.stdout + done.stderr
    (tmp_path / "torchrun.log").write_text(output)
    assert done.returncode == 0, output[-5000:]

    [run] = all_runs(api.runtime)
    assert run.status == "succeeded", run.failure_reason
    assert run.world_size == 2 and run.attempts == 1
    assert run.base_weights["weights"] == "pretrained" and run.base_weights["sha256"] == imported["sha256"]
    assert [epoch["epoch"] for epoch in run.history] == [1, 2]
    started = [json.loads(line) for line in output.splitlines() if '"run_started"' in line]
    assert sorted(line["rank"] for line in started) == [0, 1]
    assert all(line["world_size"] == 2 for line in started)

    [completed] = published(api.runtime, "training.completed", run_id)
    lineage = completed["payload"]["metadata"]["lineage"]
    assert lineage["world_size"] == 2
    assert lineage["base_model"]["sha256"] == imported["sha256"]
    assert lineage["base_model"]["source"] == f"base-models/mobilenet_v3_small/{imported['sha256']}.safetensors"
