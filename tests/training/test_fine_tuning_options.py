"""The recipe's fine-tuning options, on the real text pipeline (`prepare_text_task` with a tiny BERT and MiniLM's
tokenizer) and the real trainer: adversarial training on the embeddings (FGM), label smoothing, token dropout,
sequence length chosen from the data, layer-wise learning-rate decay, re-initialised top layers, pooling and the
wide layer (TF-IDF + logistic regression on the word pieces, averaged with the head in serving).
Their effect on quality is measured by the benchmark (bench/quality_bench.py, docs/training.md), not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from marshmallow import ValidationError
from torch import nn

from services.training.data import Example, SnapshotData
from services.training.schemas import resolve_hyperparameters
from services.training.text_model import (
    EMBEDDING_PARAMETER,
    TextClassifier,
    TextCollator,
    choose_max_length,
    fit_wide,
    layer_lr_scale,
    load_tokenizer,
    prepare_text_task,
    reinitialise_top_layers,
)
from services.training.trainer import FGM, Recipe, Trainer, seed_everything
from tests.training.support import text_items

pytestmark = pytest.mark.timeout(120)

TEXT = "text_classification"
LABELS = ["databases", "numerics", "web"]


def snapshot_data(per_label: int = 12) -> SnapshotData:
    items = text_items(per_label=per_label)
    examples = {"train": [], "validation": []}
    for number, item in enumerate(items):
        examples[item["split"]].append(Example(f"itm_{number}", LABELS.index(item["label"]), item["content"]))
    return SnapshotData(
        labels=LABELS, train=examples["train"], validation=examples["validation"], manifest_sha256="0" * 64
    )


def fit(tiny_bert: str, **overrides) -> tuple[list[dict], dict[str, torch.Tensor], object]:
    """Train the tiny BERT for two epochs as a run would (seed, task, recipe); the history and final weights."""
    hp = resolve_hyperparameters(
        TEXT,
        {"epochs": 2, "batch_size": 8, "head_learning_rate": 1e-2, "early_stopping_patience": 0, **overrides},
    )
    data = snapshot_data()
    seed_everything(hp["seed"])
    task = prepare_text_task(data, hp, tiny_bert)
    trainer = Trainer(
        task.model,
        task.train_set,
        task.val_set,
        task.train_collate,
        Recipe.from_hyperparameters(hp, data.train_label_counts()),
        eval_collate=task.eval_collate,
        head_prefixes=task.head_prefixes,
        lr_scale=task.lr_scale,
        embedding_parameter=task.embedding_parameter,
    )
    result = trainer.fit()
    weights = {name: tensor.detach().clone() for name, tensor in trainer.core.state_dict().items()}
    return result.history, weights, task


def test_fgm_changes_the_loss_and_is_reproducible_with_a_fixed_seed(tiny_bert) -> None:
    plain, plain_weights, _ = fit(tiny_bert)
    adversarial, adversarial_weights, _ = fit(tiny_bert, adversarial="fgm", adversarial_epsilon=2.0)
    again, again_weights, _ = fit(tiny_bert, adversarial="fgm", adversarial_epsilon=2.0)

    # The same seed, the same run: every loss and every weight.
    assert [epoch["train_loss"] for epoch in adversarial] == [epoch["train_loss"] for epoch in again]
    assert [epoch["val_loss"] for epoch in adversarial] == [epoch["val_loss"] for epoch in again]
    for name, tensor in adversarial_weights.items():
        assert torch.equal(tensor, again_weights[name]), name
    # FGM trains another model: the losses differ from the first epoch on, and so do the weights.
    assert adversarial[0]["train_loss"] != plain[0]["train_loss"]
    assert adversarial[-1]["val_loss"] != plain[-1]["val_loss"]
    assert not torch.equal(adversarial_weights[EMBEDDING_PARAMETER], plain_weights[EMBEDDING_PARAMETER])


def test_fgm_perturbs_the_embeddings_where_the_loss_rises_and_restores_them(tiny_bert) -> None:
    hp = resolve_hyperparameters(TEXT, {"max_length": 32})
    seed_everything(0)
    task = prepare_text_task(snapshot_data(), hp, tiny_bert)
    model = task.model.eval()  # no dropout: the two passes differ only by the perturbation
    batch = task.eval_collate([task.train_set[i] for i in range(8)])
    labels = batch.pop("labels")
    loss = nn.functional.cross_entropy(model(**batch), labels)
    loss.backward()
    embeddings = dict(model.named_parameters())[task.embedding_parameter]
    before = embeddings.detach().clone()

    attack = FGM(model, task.embedding_parameter, epsilon=1.0)
    attack.attack()
    moved = embeddings.detach() - before
    assert torch.linalg.vector_norm(moved).item() == pytest.approx(1.0, rel=1e-4)
    unused = torch.ones(len(before), dtype=torch.bool)
    unused[batch["input_ids"].unique()] = False
    assert torch.count_nonzero(moved[unused]) == 0  # only the rows of the batch's tokens move
    with torch.no_grad():
        adversarial_loss = nn.functional.cross_entropy(model(**batch), labels)
    assert adversarial_loss.item() > loss.item()  # along the gradient, the loss goes up

    attack.restore()
    assert torch.equal(embeddings.detach(), before)
    with pytest.raises(ValueError, match="embedding parameter"):
        FGM(model, "encoder.no_such.weight", epsilon=1.0)


def test_label_smoothing_spreads_the_target_and_reaches_the_loss() -> None:
    recipe = Recipe(
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        head_learning_rate=1e-3,
        weight_decay=0.0,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        early_stopping_patience=0,
        seed=0,
        label_smoothing=0.2,
    )
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.arange(8) % 3)

    def collate(items):
        return {"features": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(3, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.head(features)

    trainer = Trainer(Head(), data, data, collate, recipe)
    logits = torch.tensor([[4.0, 0.0, 0.0]])
    target = torch.tensor([0])
    log_probabilities = torch.log_softmax(logits, dim=1)[0]
    smoothed = -(0.8 * log_probabilities[0] + 0.2 * log_probabilities.mean())
    assert trainer.criterion(logits, target).item() == pytest.approx(smoothed.item(), rel=1e-6)
    assert trainer.criterion(logits, target).item() > nn.functional.cross_entropy(logits, target).item()


def test_token_dropout_masks_word_pieces_of_training_batches_only(tiny_bert_folder) -> None:
    tokenizer = load_tokenizer(tiny_bert_folder)
    texts = [("Return the cosine of the array, element by element, in radians.", 0)] * 16
    plain = TextCollator(tokenizer, 64)(texts)
    dropping = TextCollator(tokenizer, 64, token_dropout=0.3)
    torch.manual_seed(5)
    dropped = dropping(texts)
    torch.manual_seed(5)
    assert torch.equal(dropping(texts)["input_ids"], dropped["input_ids"])  # seeded: reproducible

    masked = dropped["input_ids"] == tokenizer.mask_token_id
    special = torch.isin(plain["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not (masked & special).any()  # [CLS], [SEP] and padding stay
    assert torch.equal(dropped["input_ids"][~masked], plain["input_ids"][~masked])
    share = masked.sum().item() / (~special).sum().item()
    assert 0.2 < share < 0.4
    assert torch.equal(dropped["attention_mask"], plain["attention_mask"])


def test_the_sequence_length_comes_from_the_train_split_and_the_export_records_it(tiny_bert) -> None:
    data = snapshot_data()
    task = prepare_text_task(data, resolve_hyperparameters(TEXT, {}), tiny_bert)
    tokenizer = task.train_collate.tokenizer
    texts = task.train_set.texts
    lengths = sorted(len(ids) for ids in tokenizer(texts)["input_ids"])
    expected = max(16, min(256, int(np.ceil(np.percentile(lengths, 95)))))
    assert task.chosen == {"max_length": expected, "max_length_source": "data", "wide": True}
    assert task.export.preprocessing["max_length"] == expected == task.eval_collate.max_length
    assert sum(length <= expected for length in lengths) >= 0.95 * len(lengths)
    given = prepare_text_task(data, resolve_hyperparameters(TEXT, {"max_length": 20}), tiny_bert)
    assert given.chosen == {"max_length": 20, "max_length_source": "given", "wide": True}
    # Capped: one very long text does not set the length of all.
    assert choose_max_length(tokenizer, ["word " * 2000] * 10) == 256
    assert choose_max_length(tokenizer, ["hi"] * 10) == 16


def test_layer_wise_decay_reinitialisation_and_pooling() -> None:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32
    )
    encoder = BertModel(config)
    model = TextClassifier(encoder, 3, dropout=0.0, freeze_encoder=False)
    scale = layer_lr_scale(3, 0.5)
    assert scale("encoder.encoder.layer.2.output.dense.weight") == 1.0
    assert scale("encoder.encoder.layer.0.output.dense.weight") == 0.25
    assert scale("encoder.embeddings.word_embeddings.weight") == 0.125
    assert layer_lr_scale(3, 1.0)("encoder.embeddings.word_embeddings.weight") == 1.0
    data = torch.utils.data.TensorDataset(torch.randint(0, 100, (4, 6)), torch.arange(4) % 3)

    def collate(items):
        ids = torch.stack([x for x, _ in items])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.stack([y for _, y in items])}

    recipe = Recipe(
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        head_learning_rate=1e-2,
        weight_decay=0.01,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        early_stopping_patience=0,
        seed=0,
    )
    trainer = Trainer(model, data, data, collate, recipe, lr_scale=scale)
    rates = {round(group["initial_lr"], 8) for group in trainer.optimizer.param_groups}
    assert rates == {1e-2, 1e-3, 5e-4, 2.5e-4, 1.25e-4}

    top_before = encoder.encoder.layer[2].output.dense.weight.detach().clone()
    lower_before = encoder.encoder.layer[1].output.dense.weight.detach().clone()
    reinitialise_top_layers(encoder, 1)
    assert not torch.equal(encoder.encoder.layer[2].output.dense.weight, top_before)
    assert torch.equal(encoder.encoder.layer[1].output.dense.weight, lower_before)

    ids = torch.randint(0, 100, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    cls = TextClassifier(encoder, 3, dropout=0.0, freeze_encoder=False, pooling="cls").eval()
    cls.head = model.head
    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(cls(ids, mask), model.head(hidden[:, 0]))


def test_reinitialising_a_loaded_encoder_gives_its_top_layer_fresh_weights(tiny_bert) -> None:
    """From a saved model, as runs load theirs (transformers 5 marks loaded tensors as initialised)."""
    from services.training.text_model import load_encoder

    encoder, _ = load_encoder(tiny_bert)
    loaded = encoder.encoder.layer[0].output.dense.weight.detach().clone()
    embeddings = encoder.embeddings.word_embeddings.weight.detach().clone()
    torch.manual_seed(0)
    reinitialise_top_layers(encoder, 1)
    fresh = encoder.encoder.layer[0].output.dense.weight.detach()
    assert not torch.equal(fresh, loaded)
    assert float(fresh.std()) == pytest.approx(encoder.config.initializer_range, rel=0.2)
    assert torch.equal(encoder.embeddings.word_embeddings.weight, embeddings)  # below the top layer: kept


def test_the_wide_layer_is_scikit_learns_tf_idf_and_logistic_regression_on_the_word_pieces(tiny_bert_folder) -> None:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    tokenizer = load_tokenizer(tiny_bert_folder)
    data = snapshot_data()
    texts = [example.content.decode() for example in data.train]
    labels = [example.label for example in data.train]
    wide = fit_wide(tokenizer, texts, labels, len(LABELS), 24, 10.0)
    special = set(tokenizer.all_special_ids)

    def pieces(text: str) -> list[str]:  # what the encoder sees: truncated at 24 with [CLS] and [SEP]
        return [str(i) for i in tokenizer(text, truncation=True, max_length=24)["input_ids"] if i not in special]

    reference = make_pipeline(
        TfidfVectorizer(analyzer=pieces, sublinear_tf=True), LogisticRegression(C=10.0, max_iter=5000)
    ).fit(texts, labels)
    unseen = [example.content.decode() for example in data.validation] + ["zebra cosine zebra, unheard-of words"]
    batch = TextCollator(tokenizer, 24).encode(unseen)
    ours = torch.softmax(wide(batch["input_ids"], batch["attention_mask"]), dim=-1).numpy()
    np.testing.assert_allclose(ours, reference.predict_proba(unseen), atol=2e-3)
    # Padding changes nothing: one text alone answers as it does in a padded batch.
    alone = TextCollator(tokenizer, 24).encode(unseen[-1:])
    torch.testing.assert_close(
        wide(alone["input_ids"], alone["attention_mask"]), wide(batch["input_ids"], batch["attention_mask"])[-1:]
    )
    # Two classes: scikit-learn keeps one weight vector; the layer still answers both, and an absent class never.
    two = fit_wide(tokenizer, texts[:10], [0, 2] * 5, 3, 24, 10.0)
    answers = two(batch["input_ids"], batch["attention_mask"]).argmax(dim=-1)
    assert set(answers.tolist()) <= {0, 2}
    assert fit_wide(tokenizer, texts[:4], [1] * 4, 3, 24, 10.0) is None


def test_serving_averages_head_and_wide_layer_while_training_sees_the_head_alone(tiny_bert) -> None:
    data = snapshot_data()
    task = prepare_text_task(data, resolve_hyperparameters(TEXT, {"dropout": 0.0}), tiny_bert)
    model = task.model
    calls = []
    model.wide.register_forward_hook(lambda *_: calls.append(1))
    batch = task.eval_collate.encode(task.train_set.texts[:5])
    model.train()
    model(**batch)
    assert calls == []  # the encoder learns the task itself, not the wide layer's residual
    model.eval()
    with torch.no_grad():
        served = model(**batch)
        wide, model.wide = model.wide, None
        head = model(**batch)
        model.wide = wide
        expected = torch.log((torch.softmax(head, -1) + torch.softmax(wide(**batch), -1)) / 2)
    torch.testing.assert_close(served, expected)
    torch.testing.assert_close(torch.softmax(served, -1).sum(-1), torch.ones(5))  # still log-probabilities
    off = prepare_text_task(data, resolve_hyperparameters(TEXT, {"wide": False}), tiny_bert)
    assert off.model.wide is None and off.chosen["wide"] is False


def test_the_options_are_validated() -> None:
    resolved = resolve_hyperparameters(TEXT, {"adversarial": "fgm", "token_dropout": 0.1, "label_smoothing": 0.1})
    assert (resolved["adversarial"], resolved["token_dropout"], resolved["label_smoothing"]) == ("fgm", 0.1, 0.1)
    with pytest.raises(ValidationError) as error:
        resolve_hyperparameters(TEXT, {"adversarial": "fgm", "freeze_encoder": True})
    assert "freeze_encoder" in error.value.messages["adversarial"][0]
    with pytest.raises(ValidationError) as error:
        resolve_hyperparameters(
            TEXT, {"adversarial": "pgd", "token_dropout": 0.9, "label_smoothing": -1, "pooling": "max", "wide_c": 0}
        )
    assert set(error.value.messages) == {"adversarial", "token_dropout", "label_smoothing", "pooling", "wide_c"}
    with pytest.raises(ValidationError) as error:
        resolve_hyperparameters("image_classification", {"adversarial": "fgm", "layer_decay": 0.8, "wide": True})
    assert set(error.value.messages) == {"adversarial", "layer_decay", "wide"}
    assert resolve_hyperparameters("image_classification", {"label_smoothing": 0.1})["label_smoothing"] == 0.1
