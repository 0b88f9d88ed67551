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

from testkit.tagger import fit_tagger, prepare_tagger, tagger_sentences


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
    train, validation = tagger_sentences()
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with FileLock(str(shared / "tagger.lock")):
            prepared = prepare_tagger(train, validation)
            if weights.exists():
                prepared.model.load_state_dict(torch.load(weights, weights_only=True))
                best = json.loads(record.read_text())["best_macro_f1"]
            else:
                fit = fit_tagger(prepared)
                best = fit.best_macro_f1
                torch.save(prepared.model.state_dict(), weights)
                record.write_text(json.dumps({"best_macro_f1": best}))
    finally:
        torch.set_num_threads(before)
    prepared.model.eval()
    return TrainedTagger(prepared, best, [item.text for item in validation])
