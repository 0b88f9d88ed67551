"""Does the CUDA execution provider truly load here, and how fast is it?

    python -m services.inference.gpu_check                    # a built-in MLP graph
    python -m services.inference.gpu_check --model model.onnx # your graph, fed zeros

Builds a session the way the service does (CUDA first, after preloading the CUDA/cuDNN libraries the pinned
torch brings), prints `session.get_providers()`, and measures items/s at several batch sizes on CUDA beside the
CPU provider. Without an NVIDIA driver it says so and exits 0; with a driver but a CUDA provider that does not
load (missing or mismatched CUDA 13 / cuDNN 9 libraries) it exits 1, since that is a broken install.
"""

from __future__ import annotations

import argparse
import ctypes
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from services.inference.sessions import CPU, CUDA, graph_io, session_options
from shared.tables import print_table

BATCHES = (1, 8, 32, 128, 512)


def gpu_present() -> tuple[bool, str]:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False, "no NVIDIA driver (libcuda.so.1 does not load)"
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            names = subprocess.run(
                [smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
            )
            return True, names.stdout.strip() or "an NVIDIA GPU"
        except (OSError, subprocess.SubprocessError):
            pass
    return True, "an NVIDIA driver (nvidia-smi did not answer)"


def mlp_graph(path: Path, width: int = 1024, layers: int = 4) -> Path:
    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) * 0.02).astype(np.float32), f"w{i}"))
        inits.append(numpy_helper.from_array(np.zeros(width, np.float32), f"b{i}"))
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"h{i}"]))
        nodes.append(helper.make_node("Relu", [f"h{i}"], [f"r{i}"]))
        current = f"r{i}"
    nodes.append(helper.make_node("Identity", [current], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "gpu_check_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.save(model, str(path))
    return path


def throughput(session: ort.InferenceSession, batch: int, seconds: float) -> float:
    inputs, _ = graph_io(session)
    feeds = {spec.name: np.zeros([batch, *(d if d > 0 else 16 for d in spec.shape[1:])], spec.dtype) for spec in inputs}
    if "attention_mask" in feeds:
        feeds["attention_mask"][:] = 1
    session.run(None, feeds)
    items, began = 0, time.perf_counter()
    while time.perf_counter() - began < seconds:
        session.run(None, feeds)
        items += batch
    return items / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check ONNX Runtime's CUDA execution provider.")
    parser.add_argument("--model", type=Path, help="an ONNX graph with a dynamic batch axis (default: an MLP)")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per batch size")
    args = parser.parse_args(argv)
    print(f"onnxruntime {ort.__version__}; providers built in: {ort.get_available_providers()}")
    present, what = gpu_present()
    if not present:
        print(f"no GPU here: {what}; the service serves on {CPU}")
        return 0
    print(f"GPU: {what}")
    if CUDA not in ort.get_available_providers():
        print(f"this onnxruntime has no {CUDA}: is the CPU `onnxruntime` package installed beside onnxruntime-gpu?")
        return 1
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    with tempfile.TemporaryDirectory() as scratch:
        graph = args.model or mlp_graph(Path(scratch) / "mlp.onnx")
        options = session_options(intra_op_threads=0, allow_spinning=False)
        cuda = ort.InferenceSession(str(graph), options, providers=[CUDA, CPU])
        print(f"session.get_providers(): {cuda.get_providers()}")
        if cuda.get_providers()[0] != CUDA:
            print(f"{CUDA} did not load (CUDA 13 and cuDNN 9 libraries are needed; they come with the pinned torch)")
            return 1
        cpu = ort.InferenceSession(str(graph), options, providers=[CPU])
        rows = []
        for batch in BATCHES:
            on_gpu, on_cpu = throughput(cuda, batch, args.seconds), throughput(cpu, batch, min(args.seconds, 1.0))
            rows.append([batch, f"{on_gpu:,.0f}", f"{on_cpu:,.0f}", f"{on_gpu / on_cpu:.1f}x"])
        print_table(["batch", "CUDA items/s", "CPU items/s", "speedup"], rows, align=">>>>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
