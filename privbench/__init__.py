"""privbench: a benchmark and evaluation suite for differentially private synthetic image generation.

`privbench.fit(method, images, labels, epsilon=...)` fits a private synthesizer to images held as
arrays (privbench.synthesize); the `privbench` command runs the benchmark (privbench.cli).
"""

from privbench.synthesize import PrivateSynthesizer, fit

__version__ = "0.1.0"
__all__ = ["PrivateSynthesizer", "fit"]
