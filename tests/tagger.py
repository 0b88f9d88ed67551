"""One trained MiniLM tagger for the tests that need one (training's and inference's token tests): MiniLM
fine-tuned by the recipe's Trainer on 400 synthetic sentences for 3 epochs (CPU, one thread), trained once per
test session however many pytest-xdist processes ask. The first to ask trains it under a file lock in the
session's shared temporary folder and saves its weights; the others wait, then load them into a freshly prepared
model (the Trainer is seeded, so every process would have trained the same weights)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from filelock import FileLock

from cli.demo_data import ENTITY_LABELS, ENTITY_TEMPLATES, entity_sentences
from services.training.base_models import MINILM
from services.training.token_model import TokenItem, prepare_token_task
from services.training.trainer import Recipe, Trainer

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


@dataclass
class TrainedTagger:
    prepared: Any
    """What `prepare_token_task` returned, its model holding the trained weights."""
    best_macro_f1: float
    """The Trainer's best validation token macro-F1 (first pieces only)."""
    validation_texts: list[str]


def trained_tagger(tmp_path_factory: pytest.TempPathFactory) -> TrainedTagger:
    shared = tmp_path_factory.getbasetemp().parent  # one folder for every xdist process of this session
    weights, record = shared / "tagger.pt", shared / "tagger.json"
    sentences = [
        TokenItem(text, spans)
        for text, spans in entity_sentences(TRAIN + VALIDATION, seed=1, templates=ENTITY_TEMPLATES)
    ]
    train, validation = sentences[:TRAIN], sentences[TRAIN:]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FileLock(str(shared / "tagger.lock")):
            prepared = prepare_token_task(train, validation, list(ENTITY_LABELS), {"max_length": MAX_LENGTH}, MINILM)
            if weights.exists():
                prepared.model.load_state_dict(torch.load(weights, weights_only=True))
                best = json.loads(record.read_text())["best_macro_f1"]
            else:
                fit = Trainer(
                    prepared.model,
                    prepared.train_set,
                    prepared.val_set,
                    prepared.collate,
                    RECIPE,
                    device=torch.device("cpu"),
                    head_prefixes=prepared.head_prefixes,
                    lr_scale=prepared.lr_scale,
                ).fit()
                best = fit.best_macro_f1
                torch.save(prepared.model.state_dict(), weights)
                record.write_text(json.dumps({"best_macro_f1": best}))
    finally:
        torch.set_num_threads(before)
    prepared.model.eval()
    return TrainedTagger(prepared, best, [item.text for item in validation])
