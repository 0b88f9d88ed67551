"""The ML stack is the one pinned: the GPU build of ONNX Runtime alone, and JSON-only messaging."""

from __future__ import annotations

from importlib import metadata

import pytest


def test_the_cpu_onnxruntime_is_not_installed_beside_the_gpu_build() -> None:
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("onnxruntime")
    assert metadata.version("onnxruntime-gpu")
    import onnxruntime

    # The GPU build offers the CUDA provider (it falls back to CPU at session creation without a GPU).
    assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()


def test_torch_is_the_pinned_build() -> None:
    assert metadata.version("torch") == "2.14.1"
    assert metadata.version("torchvision") == "0.29.1"


def test_the_bus_speaks_json_only(settings) -> None:
    from shared.events.celery_app import make_celery

    conf = make_celery(settings, "labeling").conf
    assert conf.accept_content == ["json"]
    assert conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] >= 3600
