"""Classifiers for small images: the downstream models of CA and PrivImage's semantic query.

Inputs are float NCHW in [-1, 1] at any resolution from 28x28 up; global pooling before the linear
head makes the same module work at 28, 32 and 64 pixels.
"""

from __future__ import annotations

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


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout),
        )  # fmt: skip
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return (self.body(x) + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016): depth = 6n + 2, three stages of n blocks at 16, 32, 64 channels."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 20, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = [_conv_block(in_channels, width)]
        cin = width
        for stage, cout in enumerate(widths):
            for block in range(n):
                layers.append(_BasicBlock(cin, cout, stride=2 if stage > 0 and block == 0 else 1))
                cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


CLASSIFIERS.register("cnn")(SmallCNN)
@CLASSIFIERS.register("resnet20")
def resnet20(in_channels: int, num_classes: int) -> ResNet:
    return ResNet(in_channels, num_classes, depth=20)


def build_classifier(name: str, in_channels: int, num_classes: int) -> nn.Module:
    """A freshly initialised classifier by registry name (unknown names raise PrivbenchError)."""
    return CLASSIFIERS.get(name)(in_channels, num_classes)
