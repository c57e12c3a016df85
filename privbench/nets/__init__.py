"""Plain torch modules: classifiers (and, elsewhere in this package, the UNet and generators)."""

from privbench.nets.classifiers import CLASSIFIERS, ResNet, SmallCNN, build_classifier

__all__ = ["CLASSIFIERS", "ResNet", "SmallCNN", "build_classifier"]
