"""Importing base weights: checked against the architecture and by sha256, stored under their hash."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

from services.training.base_models import IMAGE_ARCHITECTURES, import_base_model, load_base_weights
from shared.storage import open_store

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def store(s3_server):
    return open_store(f"s3://{s3_server.endpoint}", access_key=s3_server.access_key, secret_key=s3_server.secret_key)


def test_import_checks_the_weights_and_records_their_sha256(store, tmp_path) -> None:
    state = IMAGE_ARCHITECTURES["mobilenet_v3_small"].build(1000).state_dict()
    path = tmp_path / "mobilenet.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)  # a DDP-style state dict is accepted
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()

    record = import_base_model(store, "mobilenet_v3_small", path, expected_sha256=sha256)
    assert record["sha256"] == sha256 and record["format"] == "torch"
    assert record["key"] == f"mobilenet_v3_small/{sha256}.pt"
    assert store.get_bytes("base-models", record["key"]) == path.read_bytes()
    assert json.loads(store.get_bytes("base-models", "mobilenet_v3_small/current.json")) == record
    loaded = load_base_weights(store, "mobilenet_v3_small")
    assert loaded is not None and torch.equal(loaded.state["features.0.0.weight"], state["features.0.0.weight"])

    with pytest.raises(ValueError, match="not the expected"):
        import_base_model(store, "mobilenet_v3_small", path, expected_sha256="0" * 64)
    with pytest.raises(ValueError, match="do not fit resnet18"):
        import_base_model(store, "resnet18", path)
    other = tmp_path / "other.safetensors"
    save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
    with pytest.raises(ValueError, match="tensors missing"):
        import_base_model(store, "resnet18", other)
    garbage = tmp_path / "weights.pt"
    garbage.write_bytes(b"not a state dict")
    with pytest.raises(ValueError, match="not a readable state dict"):
        import_base_model(store, "resnet18", garbage)
    with pytest.raises(ValueError, match="unknown image architecture"):
        import_base_model(store, "vgg11", path)
