#!/usr/bin/env bash
# GPU checks: is CUDA really used (torch, and ONNX Runtime's CUDA execution provider, read back from
# session.get_providers()), a bf16 mixed-precision training step, and GPU inference throughput.
# On a machine without an NVIDIA GPU each check says so and exits 0, so this script runs everywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${VENV:-.venv}/bin/python"
echo "== training: CUDA, bf16 autocast training step"
"$PY" -m services.training.gpu_check
echo "== inference: ONNX Runtime CUDA execution provider"
"$PY" -m services.inference.gpu_check
