"""Plain torch modules: classifiers (and, elsewhere in this package, the UNet and generators)."""

from privbench.nets.classifiers import CLASSIFIERS, ResNet, ResNeXt, SmallCNN, WideResNet, build_classifier

__all__ = ["CLASSIFIERS", "ResNet", "ResNeXt", "SmallCNN", "WideResNet", "build_classifier"]
