"""Image classification: torchvision backbones (resnet18, mobilenet_v3_small) with a head for the run's labels.

Base weights come from the `base-models` bucket (see `base_models.py`); without them the backbone starts from
random initialisation and the run's record says so. Every image is decoded to RGB (grayscale, palette and
alpha images included) and resized to `image_size` (small images are scaled up); training adds random
resized crops, optional horizontal flips and colour jitter, validation and serving only resize and normalise.
A frozen backbone (`freeze_encoder`) trains its head alone, or with its last `trainable_layers` stages
(`BACKBONE_STAGES`), their BatchNorm layers frozen (`ImageClassifier` says why).
"""

from __future__ import annotations

import io
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms

from services.training.base_models import (
    IMAGE_ARCHITECTURES,
    MOBILENET_V3_SMALL,
    RESNET18,
    BaseWeights,
    imported_record,
    load_base_weights,
    scratch_record,
)
from services.training.data import Example, SnapshotData
from services.training.failures import DataError
from services.training.spec import ExportSpec, PreparedTask
from shared.storage import ObjectStore

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
INPUT_NAME = "pixels"


BACKBONE_STAGES: dict[str, tuple[tuple[str, ...], ...]] = {
    RESNET18: (("layer1",), ("layer2",), ("layer3",), ("layer4",)),
    MOBILENET_V3_SMALL: (
        ("features.1",),
        ("features.2", "features.3"),
        tuple(f"features.{i}" for i in range(4, 9)),
        (*(f"features.{i}" for i in range(9, 13)), "classifier.0"),
    ),
}
"""Each backbone's stages, bottom first, by the modules they hold: one per feature resolution (ResNet-18's four
layers; MobileNetV3's blocks at strides 4, 8, 16 and 32, the last with the classifier's first linear layer, which
sits between it and the head). The stem stays frozen. `trainable_layers` trains the last N; see `ImageClassifier`."""


class ImageClassifier(nn.Module):
    """The backbone, whose last layer is the head. Frozen (`freeze_backbone`), only the head trains, and the modules
    named in `trained_blocks` (the last stages, `BACKBONE_STAGES`) except their BatchNorm layers: those stay frozen
    in eval mode, a fixed per-channel affine map of the statistics they were loaded with. Trained, BatchNorm would
    mix statistics across the batch, and its running statistics, a plain average of the train split's activations,
    would learn from the data outside DP-SGD; frozen, the stage trains its convolutions with per-item gradients as
    exact as a head's, private or not, and a private and a non-private run train the same parameters."""

    def __init__(
        self,
        backbone: nn.Module,
        *,
        freeze_backbone: bool,
        head_prefixes: tuple[str, ...],
        trained_blocks: tuple[str, ...] = (),
        trained_description: str = "",
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.freeze_backbone = freeze_backbone
        self.trained_blocks = list(trained_blocks) if freeze_backbone else []
        self.trained_description = trained_description
        if freeze_backbone:
            trained = tuple(f"{block}." for block in self.trained_blocks)
            for name, param in self.named_parameters():
                param.requires_grad_(name.startswith(head_prefixes + trained))
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.requires_grad_(False)

    def train(self, mode: bool = True) -> ImageClassifier:
        super().train(mode)
        if self.freeze_backbone:  # frozen layers keep their BatchNorm statistics too, in trained stages as well
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone(pixels)


def trained_stages(base_model: str, count: int) -> tuple[tuple[str, ...], str]:
    """The modules (named as the classifier names them) of a backbone's last `count` stages, and how to say so."""
    if count <= 0:
        return (), ""
    stages = BACKBONE_STAGES.get(base_model, ())
    if count > len(stages):
        raise DataError(f"trainable_layers is {count}, but {base_model} has {len(stages)} stages")
    blocks = tuple(f"backbone.{name}" for stage in stages[len(stages) - count :] for name in stage)
    return blocks, f"last {count} backbone stage{'s' if count > 1 else ''} (BatchNorm frozen)"


def decode_rgb(example: Example) -> Image.Image:
    """Decoded exactly as serving decodes (EXIF orientation applied, then RGB): no train/serve skew."""
    try:
        with Image.open(io.BytesIO(example.content)) as image:
            return ImageOps.exif_transpose(image).convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"item {example.item_id} is not a readable image: {exc}") from exc


class ImageItems(Dataset):
    def __init__(self, images: list[Image.Image], labels: list[int], transform: Any) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.images[index]), self.labels[index]


def collate_images(items: list[tuple[torch.Tensor, int]]) -> dict[str, torch.Tensor]:
    return {
        INPUT_NAME: torch.stack([pixels for pixels, _ in items]),
        "labels": torch.tensor([label for _, label in items], dtype=torch.long),
    }


def eval_transform(
    size: int | tuple[int, int], mean: list[float] = IMAGENET_MEAN, std: list[float] = IMAGENET_STD
) -> Any:
    """Validation's and serving's preprocessing of a decoded image: bilinear resize to `size` ((height, width)
    or a square's side), pixel values / 255, then (x - mean) / std per channel, channels first."""
    height, width = (size, size) if isinstance(size, int) else size
    return transforms.Compose(
        [
            transforms.Resize((height, width), interpolation=transforms.InterpolationMode.BILINEAR, antialias=True),
            transforms.ToTensor(),
            transforms.Normalize(mean, std),
        ]
    )


def train_transform(size: int, *, augment: bool, horizontal_flip: bool) -> Any:
    if not augment and not horizontal_flip:
        return eval_transform(size)
    steps: list[Any] = []
    if augment:
        steps.append(transforms.RandomResizedCrop((size, size), scale=(0.6, 1.0), antialias=True))
    else:
        steps.append(transforms.Resize((size, size), antialias=True))
    if horizontal_flip:
        steps.append(transforms.RandomHorizontalFlip())
    if augment:
        steps.append(transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return transforms.Compose(steps)


def build_backbone(architecture_name: str, num_labels: int, weights: BaseWeights | None) -> nn.Module:
    architecture = IMAGE_ARCHITECTURES[architecture_name]
    backbone = architecture.build(num_labels)
    if weights is not None:
        state = {k: v for k, v in weights.state.items() if not k.startswith(architecture.classifier_prefixes)}
        result = backbone.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(architecture.classifier_prefixes)]
        if missing:
            raise DataError(f"the imported {architecture_name} weights lack {len(missing)} tensors, e.g. {missing[0]}")
    return backbone


def prepare_image_task(
    store: ObjectStore, data: SnapshotData, hyperparameters: dict[str, Any], base_model: str
) -> PreparedTask:
    architecture = IMAGE_ARCHITECTURES[base_model]
    weights = load_base_weights(store, base_model)
    head_prefixes = tuple(f"backbone.{prefix}" for prefix in architecture.classifier_prefixes)
    trained_blocks, trained_description = trained_stages(base_model, hyperparameters.get("trainable_layers", 0))
    model = ImageClassifier(
        build_backbone(base_model, len(data.labels), weights),
        freeze_backbone=hyperparameters["freeze_encoder"],
        head_prefixes=head_prefixes,
        trained_blocks=trained_blocks,
        trained_description=trained_description,
    )
    size = hyperparameters["image_size"]
    train_images = [decode_rgb(example) for example in data.train]
    val_images = [decode_rgb(example) for example in data.validation]
    augmented = train_transform(
        size, augment=hyperparameters["augment"], horizontal_flip=hyperparameters["horizontal_flip"]
    )
    export = ExportSpec(
        input_names=[INPUT_NAME],
        inputs=[{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        preprocessing={
            "kind": "image",
            "size": [size, size],
            "mean": IMAGENET_MEAN,
            "std": IMAGENET_STD,
            "channels": 3,
            "color_mode": "RGB",
            "resize": "bilinear",
            "scale": "pixel values / 255, then (x - mean) / std, channels first",
        },
    )
    return PreparedTask(
        model=model,
        train_set=ImageItems(train_images, [e.label for e in data.train], augmented),
        val_set=ImageItems(val_images, [e.label for e in data.validation], eval_transform(size)),
        train_collate=collate_images,
        eval_collate=collate_images,
        head_prefixes=head_prefixes,
        base_model=imported_record(weights) if weights is not None else scratch_record(base_model),
        export=export,
    )
