"""Training tests run torch on one intra-op thread, and train text models on a tiny BERT.

The CI machine has two cores shared with other suites. With more runnable threads than cores, torch's OpenMP
workers wait at every parallel region for a peer that is not scheduled, and training gets 10-50x slower
(measured here: mobilenet_v3_small steps at 2-9 samples/s on two threads, 108-142 on one, under the same load).
One thread keeps the suite's time predictable; it changes no result the tests check. The worker subprocesses
the tests start get OMP_NUM_THREADS=1 for the same reason.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from services.training import base_models
from services.training.base_models import TEXT_ENCODERS

TINY_BERT = "tiny-bert"


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A one-layer BERT with random weights beside MiniLM's own tokenizer files: a text encoder that trains in
    seconds and is tokenized exactly as the bundled one."""
    from transformers import BertConfig, BertModel

    minilm = TEXT_ENCODERS[base_models.MINILM]()
    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(str(folder))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        if (minilm / name).exists():
            shutil.copy(minilm / name, folder / name)
    return folder


@pytest.fixture
def tiny_bert(monkeypatch: pytest.MonkeyPatch, tiny_bert_folder: Path) -> str:
    monkeypatch.setitem(TEXT_ENCODERS, TINY_BERT, lambda: tiny_bert_folder)
    return TINY_BERT
