"""Differential privacy (DP-SGD, `services/training/privacy.py`): per-item clipping and noise, a reproducible run,
the epsilon spent within its target, the top encoder layers and last backbone stage trained privately
(`trainable_layers`) with everything below them unchanged, what DP refuses, and a private run through the API
recording its epsilon and what it trained."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from marshmallow import ValidationError
from torch import nn
from torch.utils.data import TensorDataset

from services.training.base_models import IMAGE_ARCHITECTURES, MINILM, MOBILENET_V3_SMALL, TEXT_ENCODERS
from services.training.image_model import BACKBONE_STAGES, ImageClassifier, trained_stages
from services.training.privacy import PrivacyBudget, PrivateSGD, default_delta
from services.training.schemas import DP_MAX_LENGTH, IMAGE_BACKBONE_STAGES, resolve_hyperparameters
from services.training.text_model import TextClassifier, TextCollator, TextItems, load_tokenizer
from services.training.trainer import Recipe, Trainer
from tests.helpers import INTERNAL
from tests.training.support import text_items, wait_for_run, write_snapshot

pytestmark = pytest.mark.timeout(120)

LABELS = ["databases", "numerics", "web"]


class FrozenBody(nn.Module):
    """A frozen feature layer under a trainable linear head, as a DP run trains a model."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.body.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(features))


def collate(items):
    return {"features": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


def data() -> tuple[TensorDataset, TensorDataset]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return TensorDataset(x[:90], y[:90]), TensorDataset(x[90:], y[90:])


def recipe(seed: int = 3, privacy: PrivacyBudget | None = None, epochs: int = 3, patience: int = 0) -> Recipe:
    return Recipe(
        epochs=epochs,
        batch_size=15,
        learning_rate=1e-2,
        head_learning_rate=5e-2,
        weight_decay=0.0,
        warmup_ratio=0.0,
        max_grad_norm=1.0,
        early_stopping_patience=patience,
        seed=seed,
        privacy=privacy,
    )


def fitted(seed: int = 3, privacy: PrivacyBudget | None = None, **options) -> tuple[Trainer, dict | None]:
    torch.manual_seed(1)  # the same initial weights every time
    train, val = data()
    trainer = Trainer(FrozenBody(), train, val, collate, recipe(seed, privacy, **options))
    return trainer, trainer.fit().privacy


def head_weights(trainer: Trainer) -> torch.Tensor:
    return torch.cat([trainer.core.head.weight.detach().flatten(), trainer.core.head.bias.detach()])


def per_item_gradients(model: FrozenBody, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each item's own gradient of its loss over the head's parameters, one backward pass per item."""
    grads = []
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        grads.append(torch.cat([model.head.weight.grad.flatten(), model.head.bias.grad]))
    return torch.stack(grads)


def private_gradient(noise_multiplier: float | None, x: torch.Tensor, y: torch.Tensor, clip: float) -> torch.Tensor:
    """The gradient DP-SGD's optimizer applies to the head for one batch (x, y)."""
    torch.manual_seed(1)
    model = FrozenBody()
    privacy = PrivateSGD(
        PrivacyBudget(epsilon=2.0, delta=1e-5, max_grad_norm=clip), train_items=90, steps_per_epoch=6, epochs=3
    )
    if noise_multiplier is not None:
        privacy.noise_multiplier = noise_multiplier
    wrapped = privacy.wrap_model(model)
    optimizer = privacy.wrap_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0))
    optimizer.zero_grad()
    nn.functional.cross_entropy(wrapped(x), y).backward()
    optimizer.step()
    return torch.cat([model.head.weight.grad.flatten(), model.head.bias.grad]), privacy


def test_dp_sgd_clips_each_items_gradient_and_adds_the_noise_its_budget_needs() -> None:
    train, _ = data()
    x, y = train.tensors[0][:15], train.tensors[1][:15]
    torch.manual_seed(1)
    own = per_item_gradients(FrozenBody(), x, y)
    clip = 0.05
    assert (own.norm(dim=1) > clip).all()  # every item's gradient is above the norm: each one is clipped
    clipped = own * (clip / own.norm(dim=1, keepdim=True))
    plain_mean = own.mean(0)

    # Without noise, the update is the mean of the clipped per-item gradients (over the expected batch, 15).
    noiseless, _ = private_gradient(0.0, x, y, clip)
    assert torch.allclose(noiseless, clipped.sum(0) / 15, atol=1e-6)
    assert not torch.allclose(noiseless, plain_mean, atol=1e-3)

    # With the budget's noise, the update moves off the clipped mean by noise_multiplier * clip / batch per
    # coordinate (51 coordinates: the standard deviation is checked within a loose factor).
    noisy, privacy = private_gradient(None, x, y, clip)
    assert privacy.noise_multiplier > 0.5
    deviation = (noisy - clipped.sum(0) / 15).std().item()
    expected = privacy.noise_multiplier * clip / 15
    assert 0.6 * expected < deviation < 1.5 * expected, (deviation, expected)


def test_a_private_run_is_reproducible_and_spends_close_to_its_target_epsilon() -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    first, spent = fitted(privacy=budget)
    again, spent_again = fitted(privacy=budget)
    other_seed, _ = fitted(seed=4, privacy=budget)
    plain, none = fitted()
    assert torch.equal(head_weights(first), head_weights(again))
    assert not torch.allclose(head_weights(first), head_weights(other_seed))
    assert not torch.allclose(head_weights(first), head_weights(plain))
    assert none is None and spent == spent_again

    assert spent["epsilon"] <= budget.epsilon and spent["epsilon"] >= budget.epsilon - 0.05, spent
    assert spent["steps"] == 3 * first.steps_per_epoch == 18 and spent["sample_rate"] == pytest.approx(1 / 6, abs=1e-6)
    assert spent["delta"] == 1e-5 and spent["sampling"] == "poisson" and spent["trained"] == "head"
    # The frozen body did not move under DP.
    torch.manual_seed(1)
    assert torch.equal(first.core.body[0].weight, FrozenBody().body[0].weight)


def test_early_stopping_spends_less_than_the_budget_and_the_default_delta_is_below_one_over_n() -> None:
    budget = PrivacyBudget(epsilon=4.0, delta=None, max_grad_norm=1.0)
    _, full = fitted(privacy=budget, epochs=6)
    stopped, early = fitted(privacy=budget, epochs=6, patience=1)
    if stopped.progress.epoch < 6:
        assert early["epsilon"] < full["epsilon"]
    assert early["steps"] == stopped.progress.epoch * stopped.steps_per_epoch
    assert full["delta"] == default_delta(90) == pytest.approx(min(1e-5, 90**-1.1)) and full["delta"] < 1 / 90
    assert full["delta_source"] == "default"


def two_layer_text_model(trainable_layers: int) -> TextClassifier:
    """A two-layer BERT with random weights (the same every time) under a head: one layer frozen, one trained."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    encoder = BertModel(config)
    return TextClassifier(encoder, 3, dropout=0.1, freeze_encoder=True, trainable_layers=trainable_layers)


def text_sets() -> tuple[TextItems, TextItems]:
    items = text_items(per_label=8)
    split = {name: ([], []) for name in ("train", "validation")}
    for item in items:
        texts, labels = split[item["split"]]
        texts.append(item["content"].decode())
        labels.append(LABELS.index(item["label"]))
    return TextItems(*split["train"]), TextItems(*split["validation"])


def private_text_run(seed: int = 3) -> tuple[Trainer, dict, dict[str, torch.Tensor]]:
    """One private epoch of the two-layer model with its top layer trainable: the trainer, its privacy record and
    the weights it started from."""
    model = two_layer_text_model(trainable_layers=1)
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    train, val = text_sets()
    collate = TextCollator(load_tokenizer(TEXT_ENCODERS[MINILM]()), max_length=32)
    budget = PrivacyBudget(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    trainer = Trainer(
        model,
        train,
        val,
        collate,
        replace(recipe(seed, budget, epochs=1), batch_size=6, learning_rate=1e-2),
    )
    return trainer, trainer.fit().privacy, before


def test_a_private_run_trains_the_top_encoder_layer_and_nothing_below_it() -> None:
    trainer, spent, before = private_text_run()
    assert spent["epsilon"] <= 4.0 and spent["epsilon"] >= 3.95, spent
    assert spent["trained"] == "head + top 1 encoder layer"
    assert spent["trained_modules"] == ["encoder.encoder.layer.1", "head"]
    after = trainer.core.state_dict()
    trained = {name for name, p in trainer.core.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("encoder.encoder.layer.1.", "head.")) for name in trained)
    assert spent["trainable_parameters"] == sum(after[name].numel() for name in trained)
    frozen = [name for name in after if name.startswith(("encoder.embeddings.", "encoder.encoder.layer.0."))]
    assert frozen and all(torch.equal(after[name], before[name]) for name in frozen)
    for name in (
        "encoder.encoder.layer.1.attention.self.query.weight",
        "encoder.encoder.layer.1.output.dense.weight",
        "encoder.encoder.layer.1.output.LayerNorm.weight",
        "head.weight",
    ):
        assert not torch.allclose(after[name], before[name]), name

    again, spent_again, _ = private_text_run()
    query = "encoder.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(again.core.state_dict()[query], after[query]) and spent_again == spent


def test_a_private_image_run_trains_the_last_stage_with_its_batchnorm_frozen() -> None:
    torch.manual_seed(0)
    blocks, description = trained_stages(MOBILENET_V3_SMALL, 1)
    model = ImageClassifier(
        IMAGE_ARCHITECTURES[MOBILENET_V3_SMALL].build(3),
        freeze_backbone=True,
        head_prefixes=("backbone.classifier.3.",),
        trained_blocks=blocks,
        trained_description=description,
    )
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(40, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 3, (40,), generator=generator)
    train, val = TensorDataset(pixels[:30], labels[:30]), TensorDataset(pixels[30:], labels[30:])

    def collate_pixels(items):
        return {"pixels": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}

    budget = PrivacyBudget(epsilon=4.0, delta=1e-5, max_grad_norm=1.0)
    head = ("backbone.classifier.3.",)
    trainer = Trainer(
        model, train, val, collate_pixels, replace(recipe(privacy=budget, epochs=1), batch_size=10), head_prefixes=head
    )
    spent = trainer.fit().privacy
    assert spent["trained"] == "head + last 1 backbone stage (BatchNorm frozen)" and spent["epsilon"] <= 4.0
    assert (
        spent["trained_modules"][-1] == "backbone.classifier.3" and "backbone.features.12" in spent["trained_modules"]
    )
    after = trainer.core.state_dict()
    batchnorm = [name for name in after if name.startswith("backbone.features.12.1.")]  # the last block's BatchNorm
    assert batchnorm and all(torch.equal(after[name], before[name]) for name in batchnorm)
    assert not torch.allclose(after["backbone.features.12.0.weight"], before["backbone.features.12.0.weight"])
    assert not torch.allclose(after["backbone.classifier.0.weight"], before["backbone.classifier.0.weight"])
    assert torch.equal(after["backbone.features.8.block.0.0.weight"], before["backbone.features.8.block.0.0.weight"])
    assert all(len(stages) == IMAGE_BACKBONE_STAGES for stages in BACKBONE_STAGES.values())


def test_dp_sgd_refuses_a_trainable_batchnorm_and_an_undeclared_trainable_layer() -> None:
    class Named(nn.Module):
        def __init__(self, trained: list[str]) -> None:
            super().__init__()
            self.block = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16))
            self.head = nn.Linear(16, 3)
            self.trained_blocks = trained

    with pytest.raises(ValueError, match=r"BatchNorm \(block.1\)"):
        PrivateSGD.check_trainable(Named(["block"]), ("head.",), distributed=False)
    with pytest.raises(ValueError, match=r"block\.0\.weight is trainable"):
        PrivateSGD.check_trainable(Named([]), ("head.",), distributed=False)


def test_the_hyperparameters_of_a_private_run() -> None:
    text = resolve_hyperparameters("text_classification", {"dp_epsilon": 8})
    assert text["freeze_encoder"] and not text["class_weighted_loss"] and not text["wide"]
    assert text["max_length"] == DP_MAX_LENGTH and text["dp_delta"] is None and text["dp_max_grad_norm"] == 1.0
    assert resolve_hyperparameters("text_classification", {"dp_epsilon": 8, "max_length": 40})["max_length"] == 40
    image = resolve_hyperparameters("image_classification", {"dp_epsilon": 1, "dp_delta": 1e-6})
    assert image["freeze_encoder"] and not image["class_weighted_loss"]
    plain = resolve_hyperparameters("text_classification", {})
    assert plain["dp_epsilon"] is None and plain["wide"] and not plain["freeze_encoder"]
    with pytest.raises(ValidationError) as refused:
        resolve_hyperparameters(
            "text_classification",
            {"dp_epsilon": 8, "wide": True, "freeze_encoder": False, "class_weighted_loss": True},
        )
    assert set(refused.value.messages) == {"wide", "freeze_encoder", "class_weighted_loss"}
    with pytest.raises(ValidationError) as alone:
        resolve_hyperparameters("text_classification", {"dp_delta": 1e-6})
    assert alone.value.messages == {"dp_delta": ["applies with dp_epsilon only"]}


def test_trainable_layers_unfreeze_the_top_of_a_frozen_encoder_only() -> None:
    private = resolve_hyperparameters("text_classification", {"dp_epsilon": 8, "trainable_layers": 2})
    assert private["trainable_layers"] == 2 and private["freeze_encoder"] and not private["wide"]
    reference = resolve_hyperparameters("text_classification", {"freeze_encoder": True, "trainable_layers": 6})
    assert reference["trainable_layers"] == 6 and reference["dp_epsilon"] is None
    image = resolve_hyperparameters("image_classification", {"dp_epsilon": 8, "trainable_layers": 4})
    assert image["trainable_layers"] == 4
    assert resolve_hyperparameters("image_classification", {})["trainable_layers"] == 0

    def refusal(task_type: str, hp: dict) -> list[str]:
        with pytest.raises(ValidationError) as refused:
            resolve_hyperparameters(task_type, hp)
        assert set(refused.value.messages) == {"trainable_layers"}, refused.value.messages
        return refused.value.messages["trainable_layers"]

    assert refusal("text_classification", {"trainable_layers": 1}) == [
        "applies with freeze_encoder true or dp_epsilon only: otherwise every layer trains"
    ]
    assert refusal("text_classification", {"dp_epsilon": 8, "trainable_layers": 7})
    assert refusal("text_classification", {"dp_epsilon": 8, "trainable_layers": -1})
    assert refusal("image_classification", {"dp_epsilon": 8, "trainable_layers": 5}) == [
        "the image backbones have 4 stages: at most that many"
    ]
    assert refusal("token_classification", {"freeze_encoder": True, "trainable_layers": 1}) == [
        "applies to text and image classification models only"
    ]


def test_the_run_api_refuses_what_dp_cannot_cover(platform) -> None:
    api = platform("training")
    snapshot = write_snapshot(
        api.runtime.storage,
        tenant="acme",
        dataset_id="ds_docs",
        task_type="text_classification",
        labels=LABELS,
        items=text_items(per_label=4),
    )
    body = {"tenant": "acme", "dataset_id": "ds_docs", "snapshot_id": snapshot["snapshot_id"]}

    def post(**changes):
        return api.client.post("/v1/runs", json=body | changes, headers=INTERNAL)

    wide = post(hyperparameters={"dp_epsilon": 8, "wide": True})
    assert wide.status_code == 422
    assert set(wide.get_json()["error"]["details"]["fields"]["hyperparameters"]) == {"wide"}
    assert post(hyperparameters={"dp_epsilon": 0}).status_code == 422
    assert post(hyperparameters={"dp_epsilon": 8, "dp_delta": 0.5}).status_code == 422
    searched = post(hyperparameters={"dp_epsilon": 8}, search={"trials": 2, "max_seconds": 60})
    assert searched.status_code == 422
    assert "search" in searched.get_json()["error"]["details"]["fields"]
    external = post(hyperparameters={"dp_epsilon": 8}, launch="external")
    assert external.status_code == 422
    assert "launch" in external.get_json()["error"]["details"]["fields"]
    for hyperparameters in ({"trainable_layers": 1}, {"dp_epsilon": 8, "trainable_layers": 7}):
        layers = post(hyperparameters=hyperparameters)
        assert layers.status_code == 422, hyperparameters
        assert set(layers.get_json()["error"]["details"]["fields"]["hyperparameters"]) == {"trainable_layers"}


@pytest.mark.slow
def test_a_private_run_through_the_api_records_the_epsilon_it_spent(platform, worker, tiny_bert) -> None:
    api = platform("training")
    snapshot = write_snapshot(
        api.runtime.storage,
        tenant="acme",
        dataset_id="ds_docs",
        task_type="text_classification",
        labels=LABELS,
        items=text_items(per_label=12),
    )
    body = {
        "tenant": "acme",
        "dataset_id": "ds_docs",
        "snapshot_id": snapshot["snapshot_id"],
        "base_model": tiny_bert,
        "hyperparameters": {"dp_epsilon": 8, "epochs": 2, "batch_size": 9, "max_length": 32, "trainable_layers": 1},
    }
    with worker("training") as training:
        created = api.client.post("/v1/runs", json=body, headers=INTERNAL)
        assert created.status_code == 202, created.get_json()
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=100, run_id=created.get_json()["id"])
        assert run.status == "succeeded", run.failure_reason
        shown = api.client.get(f"/v1/runs/{run.id}", headers=INTERNAL).get_json()
        ref = run.artifacts["metadata.json"]
        metadata = json.loads(training.storage.get_bytes(ref["bucket"], ref["key"]))

    privacy = shown["metrics"]["privacy"]
    assert privacy["target_epsilon"] == 8 and 7.9 <= privacy["epsilon"] <= 8.0, privacy
    assert privacy["steps"] == 2 * shown["progress"]["steps"] and privacy["noise_multiplier"] > 0
    assert privacy["delta"] == pytest.approx(min(1e-5, 27**-1.1))  # 27 train items: 9 per label
    assert shown["hyperparameters"]["wide"] is False and shown["hyperparameters"]["freeze_encoder"] is True
    assert privacy["trained"] == "head + top 1 encoder layer"  # the tiny BERT's one layer
    assert privacy["trained_modules"] == ["encoder.encoder.layer.0", "head"]
    assert metadata["training"]["privacy"] == privacy
