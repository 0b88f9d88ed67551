"""The synthetic MiniLM tagger the token tests and the PII benchmark train: MiniLM fine-tuned by the recipe's
Trainer on 400 synthetic sentences (cli/demo_data.py's templates, faker-made names, companies, places and dates)
for 3 epochs on the CPU; 60 more sentences are its validation split. Seeded, so every caller trains the same
weights."""

from __future__ import annotations

from typing import Any

import torch

from cli.demo_data import ENTITY_LABELS, ENTITY_TEMPLATES, entity_sentences
from services.training.base_models import MINILM
from services.training.token_model import TokenItem, prepare_token_task
from services.training.trainer import FitResult, Recipe, Trainer

MAX_LENGTH = 48
TRAIN, VALIDATION, EPOCHS = 400, 60, 3
RECIPE = Recipe(
    epochs=EPOCHS,
    batch_size=16,
    learning_rate=2e-4,
    head_learning_rate=2e-3,
    weight_decay=0.01,
    warmup_ratio=0.1,
    max_grad_norm=1.0,
    early_stopping_patience=2,
    seed=0,
    num_workers=0,
)


def tagger_sentences() -> tuple[list[TokenItem], list[TokenItem]]:
    """The train and validation sentences."""
    sentences = [
        TokenItem(text, spans)
        for text, spans in entity_sentences(TRAIN + VALIDATION, seed=1, templates=ENTITY_TEMPLATES)
    ]
    return sentences[:TRAIN], sentences[TRAIN:]


def prepare_tagger(train: list[TokenItem], validation: list[TokenItem]) -> Any:
    """What `prepare_token_task` returns for those sentences: an untrained tagger, its datasets and collator."""
    return prepare_token_task(train, validation, list(ENTITY_LABELS), {"max_length": MAX_LENGTH}, MINILM)


def fit_tagger(prepared: Any) -> FitResult:
    """Train `prepared.model` in place with the recipe above."""
    return Trainer(
        prepared.model,
        prepared.train_set,
        prepared.val_set,
        prepared.collate,
        RECIPE,
        device=torch.device("cpu"),
        head_prefixes=prepared.head_prefixes,
        lr_scale=prepared.lr_scale,
    ).fit()
