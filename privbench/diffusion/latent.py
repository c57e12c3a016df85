"""Latent diffusion for the DP methods that fine-tune in an autoencoder's latent space (DP-LDM, DP-LoRA).

fit = autoencoder trained on the public set (cached) -> UNet pre-trained on the public latents,
conditioned on the public labels as LDM's is (cached) -> the method's choice of trainable parameters
-> DP-SGD on the members' latents -> sample latents with EDM's sampler and decode them.

Privacy: the autoencoder and the pre-trained UNet see public images only. A member enters once,
through its latent z_i = E(x_i), the posterior mean of an encoder whose weights are fixed before
DP-SGD starts: z_i depends on x_i alone, so adding or removing a member adds or removes exactly one
row of DP-SGD's data. Per-example clipping of the UNet's gradients then bounds each member's
contribution to every step by the clipping norm, and the phase is the subsampled Gaussian mechanism
the ledger accounts, exactly as for DPDM in pixel space. The latent scale comes from public latents.

A pre-trained AutoencoderKL in diffusers' on-disk format (`pretrained_vae`: a Stable Diffusion
download whose `vae/` holds it) may replace the public-trained autoencoder; only the autoencoder is
read, the latent UNet is still pre-trained on the public latents. Its encoder is as fixed as the
trained one's, so the argument above is unchanged, provided its weights never saw the members.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from privbench.checks import (
    FLAG, POSITIVE, POSITIVE_INT, UNCHECKED, Rule, check_fields, each, number, optional, shown,
)
from privbench.compute import ComputeConfig
from privbench.context import RunContext, Task
from privbench.data.base import ImageSet
from privbench.data.transforms import to_model
from privbench.diffusion.edm import train_plain
from privbench.diffusion.pipeline import (
    EDM, DiffusionMethod, DiffusionSynthesizer, PretrainedDiffusionConfig, SamplerConfig, architecture, build_model, cached_training,
    fine_tune, key_digest, release_class_proportions, train_denoiser,
)
from privbench.dp import PrivacyLedger
from privbench.dp.distributed import per_rank
from privbench.errors import PrivbenchError
from privbench.nets.autoencoder import Autoencoder
from privbench.nets.unet import ConditionalUNet, norm_groups

# Rows encoded or decoded per forward pass (memory only).
CODING_BATCH = 500


@dataclass(frozen=True)
class AutoencoderConfig:
    base_channels: int
    channel_mult: tuple[int, ...]  # one level per entry; the latent side is the image's / 2**(levels - 1)
    layers_per_block: int
    latent_channels: int
    kl_weight: float  # 0: a plain autoencoder; > 0: KL-regularised (LDM's "KL-f" autoencoders)
    steps: int  # Adam steps on public batches drawn with replacement
    batch_size: int
    lr: float

    def validate(self, where: str = "params.autoencoder.") -> None:
        check_fields(self, where, base_channels=POSITIVE_INT, channel_mult=each(POSITIVE_INT), layers_per_block=POSITIVE_INT,
                     latent_channels=POSITIVE_INT, kl_weight=number(0), steps=POSITIVE_INT, batch_size=POSITIVE_INT, lr=POSITIVE)
        widths = tuple(self.base_channels * m for m in self.channel_mult)
        if not norm_groups(widths):
            raise PrivbenchError(f"settings '{where}base_channels' x '{where}channel_mult' give channel widths {widths} "
                                 f"without a common GroupNorm group count: e.g. --set {where}base_channels=32")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class LatentDiffusionConfig(PretrainedDiffusionConfig):
    autoencoder: AutoencoderConfig
    # A diffusers-format folder whose `vae/` holds an AutoencoderKL (e.g. Stable Diffusion's) to use
    # instead of training `autoencoder`; None trains it on the public set.
    pretrained_vae: str | None
    # Pre-train the UNet on the public labels (LDM's class-conditional pre-training), so that the class
    # embeddings DP-SGD fine-tunes already steer the frozen layers; sensitive class k then starts from
    # public class k's embedding, as DPImageBench's fine-tuning indexes its pre-trained 1,001-entry embedder.
    conditional_pretraining: bool

    def validate(self, where: str = "params.", **rules: Rule) -> None:
        super().validate(where, pretrained_vae=optional(UNCHECKED, "train the autoencoder on the public set"),
                         conditional_pretraining=FLAG, **rules)
        if self.pretrained_vae is not None:
            vae_config(self.pretrained_vae, f"{where}pretrained_vae")

    def latent_side(self, resolution: int, where: str = "params.") -> int:
        """The latent side at `resolution`, or a refusal naming the setting that sets the factor."""
        if self.pretrained_vae is not None:
            factor, setting = vae_factor(vae_config(self.pretrained_vae, f"{where}pretrained_vae")), f"{where}pretrained_vae"
        else:
            factor, setting = self.autoencoder.factor, f"{where}autoencoder.channel_mult"
        if resolution % factor:
            raise PrivbenchError(f"setting '{setting}' downsamples by {factor}, which does not divide the {resolution} px "
                                 f"images: use an autoencoder whose factor divides {resolution}, e.g. --set "
                                 f"{where}autoencoder.channel_mult={shown((1, 2))}")
        return resolution // factor

    def check_resolution(self, resolution: int, where: str = "params.") -> None:
        """The UNet is checked at the latent side, where it runs."""
        self.unet.check_resolution(self.latent_side(resolution, where), f"{where}unet.")


def vae_config(folder: str, setting: str) -> dict[str, Any]:
    """The config.json of the AutoencoderKL in `folder`/vae, refused unless it is one."""
    path = Path(folder).expanduser() / "vae" / "config.json"
    fix = "name a diffusers-format folder whose vae/ holds an AutoencoderKL (config.json and weights), e.g. a Stable Diffusion download"
    if not path.is_file():
        raise PrivbenchError(f"setting '{setting}' names {folder!r}, which has no vae/config.json: {fix}")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PrivbenchError(f"setting '{setting}': {path} is not JSON: {fix}") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise PrivbenchError(f"setting '{setting}': {path} describes a {config.get('_class_name')!r}, not an AutoencoderKL: {fix}")
    return config


def vae_factor(config: dict[str, Any]) -> int:
    return 2 ** (len(config["block_out_channels"]) - 1)


class PretrainedVAE(nn.Module):
    """A diffusers AutoencoderKL behind Autoencoder's encode/decode: scaled posterior means in, images
    out. Grey images are repeated to its three channels and decoded back to their mean."""

    def __init__(self, folder: str, channels: int):
        super().__init__()
        from diffusers import AutoencoderKL

        self.vae = AutoencoderKL.from_pretrained(Path(folder).expanduser(), subfolder="vae").requires_grad_(False).eval()
        self.channels, self.scale = channels, float(self.vae.config.scaling_factor)
        self.factor, self.latent_channels = vae_factor(self.vae.config), self.vae.config.latent_channels

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x.expand(-1, self.vae.config.in_channels, -1, -1) if x.shape[1] == 1 else x
        return self.vae.encode(x).latent_dist.mean * self.scale

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x = self.vae.decode(z / self.scale).sample
        return x.mean(dim=1, keepdim=True) if self.channels == 1 else x

    def identity(self) -> str:
        """A hash of the weights, for the pre-training cache key."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.vae.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return digest.hexdigest()[:16]


def build_autoencoder(config: AutoencoderConfig, channels: int, ctx: RunContext) -> Autoencoder:
    torch.manual_seed(ctx.stage_seed("autoencoder-init"))
    return Autoencoder(channels, config.base_channels, config.channel_mult, config.layers_per_block, config.latent_channels,
                       kl=config.kl_weight > 0).to(ctx.device)


def autoencoder_key(public: ImageSet, config: AutoencoderConfig, ctx: RunContext) -> list:
    """What the trained autoencoder depends on: public images, architecture, training settings, seed, compute."""
    return [public.content_hash(), "Autoencoder", public.channels, asdict(config), ctx.seed, asdict(ctx.compute)]


def fit_autoencoder(public: ImageSet, config: AutoencoderConfig, ctx: RunContext) -> Autoencoder:
    """The autoencoder trained on `public` only (cached under "autoencoder" by autoencoder_key), with its
    latent scale set so that the public latents' standard deviation is EDM's sigma_data."""
    model = build_autoencoder(config, public.channels, ctx)

    def train() -> None:
        images = to_model(public.images)
        draws = ctx.device_generator(per_rank("autoencoder-draws"))

        def loss_fn(forward, x: torch.Tensor) -> torch.Tensor:
            eps = torch.randn((len(x), config.latent_channels, x.shape[2] // model.factor, x.shape[3] // model.factor),
                              generator=draws, device=x.device)
            return forward(x, eps, config.kl_weight)

        _, ema = train_plain(model, loss_fn, (images,), steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                             generator=ctx.generator("autoencoder-batches"), ema_decay=0.0, progress=ctx.progress,
                             compute=ctx.compute)
        model.load_state_dict(ema.state_dict())
        model.eval()
        with torch.no_grad():
            spread = torch.cat([model.posterior(images[i : i + CODING_BATCH].to(ctx.device))[0]
                                for i in range(0, len(images), CODING_BATCH)]).std()
            model.latent_scale.fill_(EDM.sigma_data / spread.clamp(min=1e-8).item())

    cached_training(model, "autoencoder", autoencoder_key(public, config, ctx), "autoencoder", train, ctx)
    return model.eval().requires_grad_(False)


def encode(coder: nn.Module, images: np.ndarray, device: torch.device) -> torch.Tensor:
    """Scaled latents of uint8 NHWC images, in batches."""
    return torch.cat([coder.encode(to_model(images[i : i + CODING_BATCH], device)) for i in range(0, len(images), CODING_BATCH)])


class LatentSynthesizer(DiffusionSynthesizer):
    """Latents sampled in the released class proportions, decoded to images.

    No white-box capability: the network denoises latents, not pixels, so the attacks that probe a
    pixel denoiser (privbench.capabilities.DENOISER) cannot use it; it is audited through its samples.
    """

    capabilities = frozenset()

    def __init__(self, net: ConditionalUNet, coder: nn.Module, latent_shape: tuple[int, int, int], proportions: torch.Tensor,
                 task: Task, sampler: SamplerConfig, progress: bool, compute: ComputeConfig):
        super().__init__(net, proportions, task, sampler, progress, compute)
        self.coder, self.shape = coder.eval(), latent_shape

    def to_images(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.coder.decode(x[i : i + CODING_BATCH]) for i in range(0, len(x), CODING_BATCH)])

    def loss(self, images: ImageSet, sigma: torch.Tensor, noise: torch.Tensor) -> np.ndarray:
        raise PrivbenchError("a latent diffusion model denoises latents, not images: white-box pixel attacks cannot probe it")

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters()) + sum(p.numel() for p in self.coder.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "autoencoder": self.coder.state_dict()}


class LatentDiffusionMethod(DiffusionMethod):
    """fit = autoencoder (public) -> UNet pre-trained on public latents -> `prepare` chooses what DP-SGD
    trains -> DP-SGD on the members' latents. Subclasses set `name`, `Config` and override `prepare`."""

    uses_public = True

    def prepare(self, model: ConditionalUNet, ctx: RunContext) -> None:
        """Make the pre-trained `model` what DP-SGD fine-tunes: add modules, freeze parameters."""
        raise NotImplementedError

    def coder(self, task: Task, ctx: RunContext) -> tuple[nn.Module, str]:
        """The first stage and what identifies it in the pre-training cache key."""
        c = self.config
        if c.pretrained_vae is not None:
            vae = PretrainedVAE(c.pretrained_vae, task.channels).to(ctx.device)
            return vae, vae.identity()
        return fit_autoencoder(task.public, c.autoencoder, ctx), key_digest(autoencoder_key(task.public, c.autoencoder, ctx))

    @staticmethod
    def latent_shape(task: Task, coder: nn.Module) -> tuple[int, int, int]:
        return coder.latent_channels, task.resolution // coder.factor, task.resolution // coder.factor

    def pretraining_key(self, public: ImageSet, coder_id: str, model: ConditionalUNet, ctx: RunContext) -> list:
        """What the pre-trained UNet depends on: the public images and labels, the first stage, whether the
        labels condition it, the architecture and settings."""
        return [public.content_hash(), coder_id, self.config.conditional_pretraining, architecture(model),
                asdict(self.config.pretrain), ctx.seed, asdict(ctx.compute)]

    def class_embeddings(self, task: Task) -> int:
        """Class embeddings besides the unconditional one: enough for the public classes as well when the
        UNet pre-trains on them."""
        return max(len(task.public.classes), len(task.classes)) if self.config.conditional_pretraining else len(task.classes)

    def fit(self, task: Task, ledger: PrivacyLedger, ctx: RunContext) -> LatentSynthesizer:
        c = self.config
        proportions = release_class_proportions(task, ledger, c.class_counts_sigma, ctx)
        coder, coder_id = self.coder(task, ctx)
        shape = self.latent_shape(task, coder)
        model = build_model(c.unet, task, ctx, shape[:2], self.class_embeddings(task))
        public = task.public
        labels = public.labels if c.conditional_pretraining else np.full(len(public), model.unconditional_label)
        cached_training(model, "diffusion-pretrain", self.pretraining_key(public, coder_id, model, ctx), "pretrain",
                        lambda: train_denoiser(model, encode(coder, public.images, ctx.device), labels, c.pretrain, ctx), ctx)
        self.prepare(model, ctx)
        members = (encode(coder, task.members.images, ctx.device), torch.from_numpy(task.members.labels))
        net = fine_tune(model, members, ledger, c.dp, ctx)
        ctx.log.info("%s fitted: composed epsilon %.4g, %d of %d UNet parameters trained", self.name, ledger.spent(),
                     sum(p.numel() for p in model.parameters() if p.requires_grad), sum(p.numel() for p in model.parameters()))
        return LatentSynthesizer(net, coder, shape, proportions, task, c.sampler, ctx.progress, ctx.compute)

    def restore(self, state: dict[str, Any], task: Task, ctx: RunContext) -> LatentSynthesizer:
        c = self.config
        if c.pretrained_vae is not None:
            coder = PretrainedVAE(c.pretrained_vae, task.channels).to(ctx.device)
        else:
            coder = build_autoencoder(c.autoencoder, task.channels, ctx)
        coder.load_state_dict(state["autoencoder"])
        shape = self.latent_shape(task, coder)
        embeddings = state["model"]["unet.class_embedding.weight"].shape[0] - 1
        model = build_model(c.unet, task, ctx, shape[:2], embeddings)
        self.prepare(model, ctx)
        model.load_state_dict(state["model"])
        return LatentSynthesizer(model, coder, shape, state["proportions"], task, c.sampler, ctx.progress, ctx.compute)

