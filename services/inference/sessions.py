"""ONNX Runtime sessions: which execution provider truly loads, tuned session options, checks and warm-up.

CUDA is tried only where it can work (the CUDA provider is built in and an NVIDIA driver answers), after
preloading the CUDA/cuDNN libraries that the pinned torch wheel brings; whether it *truly* loaded is read back
from `session.get_providers()`, never assumed. The outcome is a property of the process, decided at the first
session and said once in the log; later sessions reuse it.
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from shared.logging import get_logger

log = get_logger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

ORT_TO_NUMPY: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}


class ModelRefused(Exception):
    """The graph does not load, or does not match its metadata."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: Any  # numpy dtype
    shape: tuple[int, ...]  # -1 = dynamic; axis 0 is the batch axis


class _ProviderChoice:
    """The process-wide answer to 'does CUDA load here?', decided once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cuda_works: bool | None = None
        self._preloaded = False

    def providers(self, prefer_gpu: bool) -> list[str]:
        with self._lock:
            if not prefer_gpu or self._cuda_works is False:
                return [CPU]
            if self._cuda_works is None and not self._cuda_candidate():
                self._decide(False, "no CUDA provider or NVIDIA driver in this process")
                return [CPU]
            return [CUDA, CPU]

    def observe(self, session: ort.InferenceSession, requested: list[str]) -> None:
        """Record what the first session that asked for CUDA actually got."""
        with self._lock:
            if self._cuda_works is None and CUDA in requested:
                loaded = CUDA in session.get_providers()
                self._decide(loaded, "CUDA provider loaded" if loaded else "CUDA provider failed to load")

    def _decide(self, cuda: bool, why: str) -> None:
        self._cuda_works = cuda
        log.info(
            "onnxruntime_provider_selected",
            provider=CUDA if cuda else CPU,
            reason=why,
            onnxruntime=ort.__version__,
            available=ort.get_available_providers(),
        )

    def _cuda_candidate(self) -> bool:
        if CUDA not in ort.get_available_providers():
            return False
        try:
            ctypes.CDLL("libcuda.so.1")
        except OSError:
            return False
        if not self._preloaded and hasattr(ort, "preload_dlls"):
            self._preloaded = True
            try:  # the CUDA 13 / cuDNN 9 libraries come with the pinned torch's nvidia-* wheels
                ort.preload_dlls()
            except Exception as exc:
                log.warning("cuda_libraries_not_preloaded", error=str(exc)[:300])
        return True

    @property
    def decided(self) -> str | None:
        return None if self._cuda_works is None else (CUDA if self._cuda_works else CPU)


PROVIDERS = _ProviderChoice()


def session_options(*, intra_op_threads: int, allow_spinning: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.enable_mem_pattern = True
    options.enable_cpu_mem_arena = True
    options.log_severity_level = 3  # errors only; a failed CUDA attempt is reported once by us, not per session
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    return options


def create_session(
    graph: Path, *, intra_op_threads: int, allow_spinning: bool, prefer_gpu: bool
) -> ort.InferenceSession:
    providers = PROVIDERS.providers(prefer_gpu)
    options = session_options(intra_op_threads=intra_op_threads, allow_spinning=allow_spinning)
    try:
        session = ort.InferenceSession(str(graph), options, providers=providers)
    except Exception as exc:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
        raise ModelRefused("invalid_graph", f"ONNX Runtime cannot load the graph: {str(exc)[:500]}") from exc
    PROVIDERS.observe(session, providers)
    return session


def graph_io(session: ort.InferenceSession) -> tuple[list[TensorSpec], list[TensorSpec]]:
    def spec(node: Any) -> TensorSpec:
        dtype = ORT_TO_NUMPY.get(node.type)
        if dtype is None:
            raise ModelRefused("unsupported_graph", f"tensor {node.name} has unsupported type {node.type}")
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in node.shape)
        return TensorSpec(node.name, np.dtype(dtype), shape)

    return [spec(node) for node in session.get_inputs()], [spec(node) for node in session.get_outputs()]


def check_contract(inputs: list[TensorSpec], outputs: list[TensorSpec], metadata: dict[str, Any]) -> None:
    """The graph's inputs and outputs are the ones metadata.json declares, with a batch axis and logits."""
    declared_inputs = sorted(str(item.get("name")) for item in metadata["inputs"])
    if sorted(spec.name for spec in inputs) != declared_inputs:
        raise ModelRefused(
            "contract_mismatch",
            f"graph inputs {[s.name for s in inputs]} differ from metadata.json's {declared_inputs}",
        )
    if "logits" not in {spec.name for spec in outputs}:
        raise ModelRefused("contract_mismatch", "the graph has no 'logits' output")
    for spec in (*inputs, *outputs):
        if not spec.shape or spec.shape[0] != -1:
            raise ModelRefused("contract_mismatch", f"tensor {spec.name} has no dynamic batch axis")


def warm_up(
    session: ort.InferenceSession,
    inputs: list[TensorSpec],
    batch_sizes: list[int],
    labels: int,
    seq_len: int = 16,
    *,
    per_token: bool = False,
) -> None:
    """Run the graph at the batch sizes it will see so first requests do not pay for allocation and tuning,
    and check the logits have one column per label (`per_token`: one row per token, `[batch, sequence, tags]`)."""
    output_names = [node.name for node in session.get_outputs()]
    for batch in sorted(set(batch_sizes)):
        feeds = {
            spec.name: np.zeros([batch, *(dim if dim > 0 else seq_len for dim in spec.shape[1:])], dtype=spec.dtype)
            for spec in inputs
        }
        for spec in inputs:
            if spec.name == "attention_mask":
                feeds[spec.name][:] = 1
        try:
            results = session.run(output_names, feeds)
        except Exception as exc:
            raise ModelRefused("warm_up_failed", f"the graph fails on a batch of {batch}: {str(exc)[:500]}") from exc
        logits = results[output_names.index("logits")]
        expected = (batch, seq_len, labels) if per_token else (batch, labels)
        if logits.shape != expected:
            raise ModelRefused(
                "contract_mismatch", f"logits have shape {list(logits.shape)}, expected {list(expected)}"
            )
