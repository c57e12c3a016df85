"""Diffusion models: EDM preconditioning, training loss, deterministic sampler and plain trainer."""

from privbench.diffusion.edm import (
    EDMConfig,
    denoise,
    diffusion_loss_fn,
    edm_sampler,
    edm_variation,
    loss_weight,
    per_example_loss,
    precondition,
    sample_sigma,
    sigma_steps,
    train_plain,
    unconditional_label,
)

__all__ = [
    "EDMConfig",
    "denoise",
    "diffusion_loss_fn",
    "edm_sampler",
    "edm_variation",
    "loss_weight",
    "per_example_loss",
    "precondition",
    "sample_sigma",
    "sigma_steps",
    "train_plain",
    "unconditional_label",
]
