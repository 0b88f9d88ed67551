"""The GPU checks run in every checkout: on a machine without a GPU they say so and succeed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HAS_GPU = shutil.which("nvidia-smi") is not None


@pytest.mark.parametrize("module", ["services.training.gpu_check", "services.inference.gpu_check"])
def test_gpu_check_runs_and_reports(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module], cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    if not HAS_GPU:
        assert "no GPU" in result.stdout + result.stderr
