"""The CA classifier families: shapes at every supported input, paper parameter counts, depth rules."""

import re

import pytest
import torch

from privbench.errors import PrivbenchError
from privbench.nets.classifiers import (
    CLASSIFIERS,
    ResNet,
    ResNeXt,
    WideResNet,
    _ResNeXtBlock,
    _WideBlock,
    build_classifier,
)

PAPER = ("resnet110", "wrn-28-10", "resnext29-8x64d")  # DPImageBench's CA models
PUBLISHED = {"resnet20": 0.27e6, "resnet110": 1.7e6, "wrn-28-10": 36.5e6, "resnext29-8x64d": 34.4e6}  # on CIFAR-10


def _parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", CLASSIFIERS.names())
@pytest.mark.parametrize("channels, size", [(1, 28), (3, 32), (3, 64)])
def test_every_classifier_maps_images_to_logits(name, channels, size):
    if size == 64 and name in PAPER:
        pytest.skip("paper-size models take about a second each at 64 px on a CPU; the light members cover 64 px")
    model = build_classifier(name, channels, 10)
    with torch.inference_mode():
        logits = model(torch.rand(2, channels, size, size) * 2 - 1)
    assert logits.shape == (2, 10) and logits.isfinite().all()


def test_the_paper_families_are_registered_and_other_names_are_user_errors():
    assert {"cnn", "resnet20", *PAPER, "wrn-10-2", "wrn-16-2", "wrn-16-4", "resnext11-2x8d", "resnext29-2x16d"} <= set(
        CLASSIFIERS.names()
    )
    with pytest.raises(PrivbenchError, match="unknown classifier 'wrn-28-12' \\(did you mean 'wrn-28-10'\\?\\)"):
        build_classifier("wrn-28-12", 3, 10)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_parameter_counts(name):
    assert _parameters(build_classifier(name, 3, 10)) == pytest.approx(PUBLISHED[name], rel=0.02)


@pytest.mark.parametrize("name", [n for n in CLASSIFIERS.names() if n.startswith(("wrn-", "resnext"))])
def test_names_state_the_configuration(name):
    """wrn-D-K has 3(D - 4)/6 blocks, the first K times 16 wide; resnextD-CxWd has 3(D - 2)/9 blocks,
    the first with C groups of W channels in its grouped convolution and 4W outputs (256 at 8x64d)."""
    model = build_classifier(name, 3, 10)
    if name.startswith("wrn-"):
        depth, widen = map(int, re.fullmatch(r"wrn-(\d+)-(\d+)", name).groups())
        blocks = [m for m in model.modules() if isinstance(m, _WideBlock)]
        assert len(blocks) == 3 * (depth - 4) // 6 and blocks[0].body[0].out_channels == 16 * widen
    else:
        depth, cardinality, width = map(int, re.fullmatch(r"resnext(\d+)-(\d+)x(\d+)d", name).groups())
        blocks = [m for m in model.modules() if isinstance(m, _ResNeXtBlock)]
        grouped = blocks[0].body[3]
        assert len(blocks) == 3 * (depth - 2) // 9
        assert (grouped.groups, grouped.out_channels) == (cardinality, cardinality * width)
        assert blocks[0].body[-1].num_features == 4 * width


def test_wide_resnet_drops_out_only_in_training():
    model = WideResNet(1, 10, depth=10, widen=1, dropout=0.5)
    x = torch.rand(4, 1, 28, 28)
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(
    "build, rule",
    [
        (lambda: ResNet(3, 10, depth=21), "6n \\+ 2"),
        (lambda: ResNet(3, 10, depth=2), "6n \\+ 2"),
        (lambda: WideResNet(3, 10, depth=27), "6n \\+ 4"),
        (lambda: WideResNet(3, 10, depth=4), "6n \\+ 4"),
        (lambda: ResNeXt(3, 10, depth=28), "9n \\+ 2"),
        (lambda: ResNeXt(3, 10, depth=2), "9n \\+ 2"),
    ],
)
def test_invalid_depths_name_the_rule(build, rule):
    with pytest.raises(ValueError, match=f"depth must be {rule} with n >= 1"):
        build()
