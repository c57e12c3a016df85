"""Classifiers for small images: the downstream models of CA and PrivImage's semantic query.

Inputs are float NCHW in [-1, 1] at any resolution from 28x28 up; global pooling before the linear
head makes the same module work at 28, 32 and 64 pixels.

DPImageBench scores CA with three families at paper size: ResNet-110, WRN-28-10 and ResNeXt-29
8x64d. Each family is also registered at light sizes (names family-depth-config) for CPU presets.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

from torch import nn

from privbench.registry import Registry

CLASSIFIERS: Registry[Callable[[int, int], nn.Module]] = Registry("classifier")


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (width, 2x, 4x channels) with 2x2 max-pooling between, global max-pooling.

    Sized to train on a CPU in seconds per thousand images. BatchNorm and the global max (rather than
    GroupNorm and a global mean) reach 90% on MNIST within a few hundred steps; the alternatives took
    several times longer.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32):
        super().__init__()
        w = (width, 2 * width, 4 * width)
        self.features = nn.Sequential(
            _conv_block(in_channels, w[0]), nn.MaxPool2d(2),
            _conv_block(w[0], w[1]), nn.MaxPool2d(2),
            _conv_block(w[1], w[2]),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Linear(w[2], num_classes)

    def forward(self, x):
        return self.head(self.features(x))


def _projection(cin: int, cout: int, stride: int) -> nn.Module:
    """The shortcut of a residual block: identity when the shape is kept, else a strided 1x1 convolution."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


def _stages(
    stem: nn.Module, width: int, stage_widths: tuple[int, int, int], blocks: int,
    make_block: Callable[[int, int, int, int], nn.Module], tail: Callable[[int], list[nn.Module]] = lambda width: [],
) -> tuple[nn.Sequential, int]:
    """The CIFAR layout the three families share: a stem of `width` channels, three stages of `blocks`
    blocks (`make_block(cin, cout, stride, stage)`; the first block of stages 2 and 3 halves the
    resolution), `tail`, then global average pooling. Returns the features and their width."""
    layers = [stem]
    for stage, cout in enumerate(stage_widths):
        for block in range(blocks):
            layers.append(make_block(width, cout, 2 if stage > 0 and block == 0 else 1, stage))
            width = cout
    return nn.Sequential(*layers, *tail(width), nn.AdaptiveAvgPool2d(1), nn.Flatten()), width


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth = 6n + 2, three stages of n blocks at 16, 32, 64 channels."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        widths = (width, 2 * width, 4 * width)
        self.features, out = _stages(_conv_block(in_channels, width), width, widths, (depth - 2) // 6,
                                     lambda cin, cout, stride, stage: _BasicBlock(cin, cout, stride))
        self.head = nn.Linear(out, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class _WideBlock(nn.Module):
    """Pre-activation block (BN-ReLU-conv twice) with dropout between the convolutions, as in WRN.

    A projecting shortcut reads the activated input, an identity shortcut the raw one (He et al. 2016,
    "Identity mappings"): this keeps the identity path free of any nonlinearity.
    """

    def __init__(self, cin: int, cout: int, stride: int, dropout: float):
        super().__init__()
        self.pre = nn.Sequential(nn.BatchNorm2d(cin), nn.ReLU(inplace=True))
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
        )  # fmt: skip
        # No BatchNorm on the projection: the next block's pre-activation normalises the sum.
        self.project = None if stride == 1 and cin == cout else nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        a = self.pre(x)
        return self.body(a) + (x if self.project is None else self.project(a))


class WideResNet(nn.Module):
    """WRN-depth-widen of Zagoruyko & Komodakis (2016): depth = 6n + 4, a 16-channel stem, then three
    stages of n pre-activation blocks at 16k, 32k, 64k channels; WRN-28-10 with dropout 0.3 is the CA model."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 28, widen: int = 10, dropout: float = 0.3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        self.features, out = _stages(
            nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), 16, (16 * widen, 32 * widen, 64 * widen), (depth - 4) // 6,
            lambda cin, cout, stride, stage: _WideBlock(cin, cout, stride, dropout),
            # The blocks end in a convolution, so the sum is normalised and activated once before pooling.
            tail=lambda width: [nn.BatchNorm2d(width), nn.ReLU(inplace=True)],
        )
        self.head = nn.Linear(out, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class _ResNeXtBlock(nn.Module):
    """Bottleneck of type C: 1x1 reduce, grouped 3x3 (strided when downsampling), 1x1 expand."""

    def __init__(self, cin: int, cout: int, inner: int, cardinality: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, inner, 3, stride, 1, groups=cardinality, bias=False), nn.BatchNorm2d(inner),
            nn.ReLU(inplace=True),
            nn.Conv2d(inner, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = _projection(cin, cout, stride)

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


class ResNeXt(nn.Module):
    """The CIFAR ResNeXt of Xie et al. (2017): depth = 9n + 2, a 3x3 stem, then three stages of n
    bottlenecks whose inner width, cardinality * bottleneck_width, doubles with each stage as the
    resolution halves. ResNeXt-29 8x64d is the CA model.

    The paper's stem (64) and stage outputs (256, 512, 1024), all at bottleneck width 64, scale here with
    the bottleneck width, so that depth-CxWd names the whole network. With fixed outputs a light member
    still carries 256 channels at full resolution through memory-bound 1x1 convolutions: ResNeXt-11 2x8d
    took 53 s per epoch of 2000 28x28 images on two CPU cores, against 2.5 s scaled.
    """

    def __init__(
        self, in_channels: int, num_classes: int, depth: int = 29, cardinality: int = 8, bottleneck_width: int = 64
    ):
        super().__init__()
        if depth < 11 or (depth - 2) % 9:
            raise ValueError(f"ResNeXt depth must be 9n + 2 with n >= 1, got {depth}")
        d = bottleneck_width
        self.features, out = _stages(
            _conv_block(in_channels, d), d, (4 * d, 8 * d, 16 * d), (depth - 2) // 9,
            lambda cin, cout, stride, stage: _ResNeXtBlock(cin, cout, cardinality * d * 2**stage, cardinality, stride),
        )
        self.head = nn.Linear(out, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


CLASSIFIERS.register("cnn")(SmallCNN)
# The three marked ones are DPImageBench's CA models; the others are light members of each family.
CLASSIFIERS.register("resnet20")(partial(ResNet, depth=20))
CLASSIFIERS.register("resnet110")(partial(ResNet, depth=110))  # paper
CLASSIFIERS.register("wrn-10-2")(partial(WideResNet, depth=10, widen=2))
CLASSIFIERS.register("wrn-16-2")(partial(WideResNet, depth=16, widen=2))
CLASSIFIERS.register("wrn-16-4")(partial(WideResNet, depth=16, widen=4))
CLASSIFIERS.register("wrn-28-10")(partial(WideResNet, depth=28, widen=10))  # paper
CLASSIFIERS.register("resnext11-2x8d")(partial(ResNeXt, depth=11, cardinality=2, bottleneck_width=8))
CLASSIFIERS.register("resnext29-2x16d")(partial(ResNeXt, depth=29, cardinality=2, bottleneck_width=16))
CLASSIFIERS.register("resnext29-8x64d")(partial(ResNeXt, depth=29, cardinality=8, bottleneck_width=64))  # paper


def build_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised classifier by registry name (unknown names raise PrivbenchError)."""
    return CLASSIFIERS.get(name)(in_channels, num_classes)
