"""Token classification (named entities): the bundled MiniLM encoder with a per-token tagging head.

Items are texts with entity spans `{start, end, label}` in Unicode code points (see docs/ner.md). The tag set is
IOB2 over the dataset's entity labels: `O`, then `B-<label>`, `I-<label>` for each label in order.

- Alignment: the tokenizer's words (its pre-tokenizer splits on spaces and punctuation, and each CJK character is
  a word) are located in the text through its offset mapping. A word inside a span is tagged `B-<label>` if it is
  the span's first word, `I-<label>` otherwise, and `O` outside every span. The tag goes on the word's first word
  piece; its other pieces and the special tokens get -100, which the loss ignores (`nn.CrossEntropyLoss`'s
  `ignore_index`).
- The model's `forward` returns one row of logits per token position, flattened over the batch
  (`[batch * sequence, tags]`), so the shared `Trainer` (AdamW, warm-up and decay, early stopping, class weights
  over tags) trains it unchanged: its labels are the flattened tags, -100 included. `TokenLogits` is the same model
  shaped `[batch, sequence, tags]`, which is what is exported and served.
- Decoding (`shared.entities.decode_entities`, shared with inference), the rule recorded with the exported graph:
  each word's tag probabilities are those of its first piece (softmax of the logits); the words' tags are the
  most probable sequence that is valid IOB2 (Viterbi: `I-X` only after `B-X` or `I-X`, never first), so that a
  multi-word entity whose words lean to different types comes out as one entity of the type the words agree on
  most. An entity is a `B-X` word and the `I-X` words after it; its offsets run from its first word's start to its
  last word's end, moved out to the nearest character (grapheme) boundary, and its score is the mean probability
  of its words' tags.
- Evaluation (`services.training.evaluate.entity_report`): the decoded word-level tag sequences against the true
  ones, scored with `seqeval` in strict IOB2 mode: entity-level precision, recall and F1 (micro over entities;
  `entity_f1`), per entity type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from services.training.base_models import text_base_model_record
from services.training.evaluate import entity_report
from services.training.text_model import (
    EMBEDDING_PARAMETER,
    INPUT_NAMES,
    layer_lr_scale,
    load_encoder,
    reinitialise_top_layers,
)
from shared.entities import DECODING_RULE as DECODING_RULE  # re-exported: token_export records it
from shared.entities import Words, decode_entities, tag_set, word_predictions, words_from

IGNORED = -100
"""The label of word pieces that are not a word's first piece, and of special and padding tokens."""
DEFAULT_MAX_LENGTH = 128


@dataclass(frozen=True)
class TokenItem:
    text: str
    spans: list[dict[str, Any]]


class TokenItems(Dataset):
    def __init__(self, items: list[TokenItem]) -> None:
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> TokenItem:
        return self.items[index]


class TokenTagger(nn.Module):
    """Encoder + dropout + a linear layer over each token's hidden state; logits flattened over the batch."""

    def __init__(self, encoder: nn.Module, num_tags: int, *, dropout: float, freeze_encoder: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(encoder.config.hidden_size, num_tags)
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> TokenTagger:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(self.dropout(hidden))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        logits = self.token_logits(input_ids, attention_mask)
        return logits.reshape(-1, logits.shape[-1])


class TokenLogits(nn.Module):
    """The tagger as exported and served: logits `[batch, sequence, tags]`."""

    def __init__(self, tagger: TokenTagger) -> None:
        super().__init__()
        self.tagger = tagger

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.tagger.token_logits(input_ids, attention_mask)


def words_of(encoding: Any, index: int) -> Words:
    """The words of text `index` of a batch encoding (made with `return_offsets_mapping=True`)."""
    return words_from(encoding.word_ids(index), encoding["offset_mapping"][index])


def word_tags(words: Words, spans: list[dict[str, Any]]) -> list[str]:
    """IOB2 tags of the words: B- on the first word that starts inside a span, I- on the following ones."""
    tags = ["O"] * len(words.offsets)
    for span in spans:
        inside = [i for i, (start, _) in enumerate(words.offsets) if span["start"] <= start < span["end"]]
        for n, i in enumerate(inside):
            tags[i] = f"{'B' if n == 0 else 'I'}-{span['label']}"
    return tags


def encode(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    return tokenizer(
        texts,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="np",
    )


class TokenCollator:
    """Tokenizes a batch (padded to its longest text, truncated at `max_length`) and aligns the tags to the
    first word piece of each word; `labels` are flattened like the model's logits."""

    def __init__(self, tokenizer: Any, tags: list[str], max_length: int) -> None:
        self.tokenizer = tokenizer
        self.index = {tag: i for i, tag in enumerate(tags)}
        self.max_length = max_length

    def __call__(self, items: list[TokenItem]) -> dict[str, torch.Tensor]:
        encoded = encode(self.tokenizer, [item.text for item in items], self.max_length)
        labels = np.full(encoded["input_ids"].shape, IGNORED, dtype=np.int64)
        for row, item in enumerate(items):
            words = words_of(encoded, row)
            for position, tag in zip(words.first_piece, word_tags(words, item.spans), strict=True):
                labels[row, position] = self.index[tag]
        return {
            "input_ids": torch.from_numpy(encoded["input_ids"].astype(np.int64)),
            "attention_mask": torch.from_numpy(encoded["attention_mask"].astype(np.int64)),
            "labels": torch.from_numpy(labels.reshape(-1)),
        }


def tag_counts(tokenizer: Any, items: list[TokenItem], tags: list[str], max_length: int) -> list[int]:
    """How often each tag labels a first word piece in `items` (for class-weighted loss)."""
    collate = TokenCollator(tokenizer, tags, max_length)
    counts = np.zeros(len(tags), dtype=np.int64)
    for start in range(0, len(items), 256):
        labels = collate(items[start : start + 256])["labels"].numpy()
        counts += np.bincount(labels[labels >= 0], minlength=len(tags))
    return counts.tolist()


def predict_entities(
    model: nn.Module, tokenizer: Any, texts: list[str], tags: list[str], max_length: int, batch_size: int = 32
) -> list[list[dict[str, Any]]]:
    """Entities of each text from the torch model (`TokenTagger`), in order."""
    core = model.to("cpu").float().eval()
    found: list[list[dict[str, Any]]] = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = texts[start : start + batch_size]
            encoded = encode(tokenizer, batch, max_length)
            logits = core.token_logits(
                torch.from_numpy(encoded["input_ids"].astype(np.int64)),
                torch.from_numpy(encoded["attention_mask"].astype(np.int64)),
            ).numpy()
            for row, text in enumerate(batch):
                found.append(decode_entities(text, words_of(encoded, row), logits[row], tags))
    return found


def evaluate_entities(
    model: nn.Module, tokenizer: Any, items: list[TokenItem], tags: list[str], max_length: int
) -> dict[str, Any]:
    """seqeval's strict IOB2 scores of the model's word tags against the items' spans (`entity_report`)."""
    core = model.to("cpu").float().eval()
    true_tags: list[list[str]] = []
    predicted: list[list[str]] = []
    with torch.inference_mode():
        for start in range(0, len(items), 32):
            batch = items[start : start + 32]
            encoded = encode(tokenizer, [item.text for item in batch], max_length)
            logits = core.token_logits(
                torch.from_numpy(encoded["input_ids"].astype(np.int64)),
                torch.from_numpy(encoded["attention_mask"].astype(np.int64)),
            ).numpy()
            for row, item in enumerate(batch):
                words = words_of(encoded, row)
                true_tags.append(word_tags(words, item.spans))
                predicted.append(word_predictions(words, logits[row], tags)[0])
    return entity_report(true_tags, predicted)


class ValidationEntityF1:
    """The trainer's selection score for a tagger: seqeval's strict entity F1 of the validation split, computed from
    the logits the trainer's validation pass produced (flattened over each batch, in the loader's order, batches of
    `batch_size` items each padded to its own longest text, as `TokenCollator` makes them)."""

    def __init__(self, tokenizer: Any, items: list[TokenItem], tags: list[str], max_length: int, batch_size: int):
        self.tags = tags
        self.batches = [
            (encode(tokenizer, [item.text for item in items[start : start + batch_size]], max_length), start)
            for start in range(0, len(items), batch_size)
        ]
        self.items = items

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> float:
        true_tags: list[list[str]] = []
        predicted: list[list[str]] = []
        offset = 0
        for encoded, start in self.batches:
            rows, length = encoded["input_ids"].shape
            block = logits[offset : offset + rows * length].reshape(rows, length, -1)
            offset += rows * length
            for row in range(rows):
                words = words_of(encoded, row)
                true_tags.append(word_tags(words, self.items[start + row].spans))
                predicted.append(word_predictions(words, block[row], self.tags)[0])
        if offset != len(logits):
            raise ValueError(f"{len(logits)} validation logits for {offset} token positions: the batches differ")
        return float(entity_report(true_tags, predicted)["entity_f1"])


def tagged_entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """The entities of a valid IOB2 word tag sequence: (label, first word, last word + 1). On valid sequences (the
    truth from `word_tags`, Viterbi's decoding) these are exactly the entities seqeval's strict mode counts."""
    found: set[tuple[str, int, int]] = set()
    label, start = None, 0
    for index, tag in enumerate([*tags, "O"]):
        if label is not None and tag != f"I-{label}":
            found.add((label, start, index))
            label = None
        if tag.startswith("B-") or (tag.startswith("I-") and label is None):
            label, start = tag[2:], index
    return found


def entity_counts(true_tags: list[str], predicted_tags: list[str], labels: list[str]) -> dict[str, list[int]]:
    """One text's true positives, false positives and false negatives per entity label, in `labels` order."""
    truth, predicted = tagged_entities(true_tags), tagged_entities(predicted_tags)
    return {
        "tp": [sum(1 for e in truth & predicted if e[0] == label) for label in labels],
        "fp": [sum(1 for e in predicted - truth if e[0] == label) for label in labels],
        "fn": [sum(1 for e in truth - predicted if e[0] == label) for label in labels],
    }


@dataclass
class PreparedTokenTask:
    """What a token-classification run trains: the model, its data and collators, and what export needs."""

    model: TokenTagger
    tokenizer: Any
    tags: list[str]
    max_length: int
    train_set: TokenItems
    val_set: TokenItems
    collate: TokenCollator
    head_prefixes: tuple[str, ...]
    base_model: dict[str, Any]
    lr_scale: Any
    embedding_parameter: str
    train_tag_counts: list[int]

    @property
    def input_names(self) -> list[str]:
        return INPUT_NAMES


def prepare_token_task(
    train: list[TokenItem],
    validation: list[TokenItem],
    entity_labels: list[str],
    hyperparameters: dict[str, Any],
    base_model: str,
) -> PreparedTokenTask:
    torch.manual_seed(hyperparameters.get("seed", 0))  # the head's initial weights, and so the run, are reproducible
    encoder, tokenizer = load_encoder(base_model)
    reinitialise_top_layers(encoder, hyperparameters.get("reinit_layers", 0))
    tags = tag_set(entity_labels)
    model = TokenTagger(
        encoder,
        len(tags),
        dropout=hyperparameters.get("dropout", 0.1),
        freeze_encoder=hyperparameters.get("freeze_encoder", False),
    )
    max_length = hyperparameters.get("max_length") or DEFAULT_MAX_LENGTH
    return PreparedTokenTask(
        model=model,
        tokenizer=tokenizer,
        tags=tags,
        max_length=max_length,
        train_set=TokenItems(train),
        val_set=TokenItems(validation),
        collate=TokenCollator(tokenizer, tags, max_length),
        head_prefixes=("head.",),
        base_model=text_base_model_record(base_model),
        lr_scale=layer_lr_scale(encoder.config.num_hidden_layers, hyperparameters.get("layer_decay", 1.0)),
        embedding_parameter=EMBEDDING_PARAMETER,
        train_tag_counts=tag_counts(tokenizer, train, tags, max_length),
    )
