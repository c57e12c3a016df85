"""What a fitted synthesizer lets an attack use besides its samples.

A synthesizer declares `capabilities: frozenset[str]` of the names below, and an attack the ones it
`requires` (privbench.attacks): it applies to a run only when the run's synthesizer declares them all.
Declaring one promises the interface written beside its name. Attacks never guess from a
synthesizer's attributes: a GAN whose generator happens to be called `net` declares nothing and gets
only the black-box attacks.
"""

from __future__ import annotations

# `synthesizer.net`: the network F_theta(x, c_noise, labels) the synthesizer samples with, which
# privbench.diffusion.edm preconditions with privbench.diffusion.pipeline.EDM into a denoiser of
# images in [-1, 1] NCHW; the white-box attacks query it through those functions.
DENOISER = "denoiser"


def capabilities(synthesizer: object) -> frozenset[str]:
    """What `synthesizer` declares; a synthesizer that declares nothing offers nothing."""
    return frozenset(getattr(synthesizer, "capabilities", ()))
