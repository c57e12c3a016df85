"""Presets keyed by (preset, dataset, epsilon): the published configurations they carry, the order
their entries are laid over one another, the fallback where a dataset or epsilon has no entry, and
the paper table that needs no runs."""

import logging
from pathlib import Path

import pandas as pd
import pytest

import privbench.methods
from privbench import cli
from privbench.config import from_dict, parse_overrides, resolve
from privbench.errors import PrivbenchError
from privbench.methods import METHODS, preset_values, presets

# DPImageBench's DP-MERF configuration, the same in configs/DP-MERF/mnist_28_eps1.0.yaml,
# mnist_28_eps10.0.yaml, cifar10_32_eps1.0.yaml and cifar10_32_eps10.0.yaml at
# github.com/2019ChenGong/DPImageBench@b52f514 (the commit leaderboards/paper/dpimagebench.csv cites):
# model.d_rff, model.rff_sigma, model.Generator.z_dim, train.epochs, train.batch_size, train.lr,
# train.lr_decay, gen.batch_size.
DP_MERF = {"d_rff": 10000, "rff_sigma": 105.0, "z_dim": 60, "epochs": 5, "batch_size": 100, "lr": 0.01,
           "lr_decay": 0.9, "sample_batch_size": 1000}
# The diffusion methods at the same commit, configs/{DPDM,PDP-Diffusion,PrivImage}/<file>.yaml: on CIFAR-10
# (cifar10_32_eps*) and CelebA 32 (celeba_male_32_eps*) model.network.ch_mult [2, 4], attn_resolutions [16],
# train.batch_size 4096, n_epochs 150, optim.params.lr 3e-4, loss.n_noise_samples 32, dp.max_grad_norm 0.001,
# model.ema_rate 0.999, model.sampler_acc.num_steps 250 and guid_scale 0.0 (privbench's guidance 1 + guid_scale);
# train.loss sets no label_unconditioning_prob, so EDMLoss's default 0.1 (models/DP_Diffusion/score_losses.py).
DIFFUSION_32PX = {"unet.channel_mult": (2, 4), "unet.attention_resolutions": (16,), "dp.logical_batch": 4096,
                  "dp.epochs": 150, "dp.lr": 3e-4, "dp.multiplicity": 32, "dp.clip_norm": 0.001, "dp.ema_decay": 0.999,
                  "dp.label_dropout": 0.1, "sampler.steps": 250, "sampler.guidance": 1.0}
# mnist_28_eps*: ch_mult [2, 2], attn_resolutions [14], sampler_acc.num_steps 1000 and guid_scale 0.0 at both
# epsilons (the 0.25 at eps 10 is model.sampler_fid's, which generate() does not sample with).
DIFFUSION_MNIST = {**DIFFUSION_32PX, "unet.channel_mult": (2, 2), "unet.attention_resolutions": (14,), "sampler.steps": 1000}
# celeba_male_64_eps10.0: PDP-Diffusion's and PrivImage's ch_mult [1, 2, 4] with attn_resolutions [32, 16];
# DPDM's [2, 4] with [32] at b52f514.
DIFFUSION_64PX = {**DIFFUSION_32PX, "unet.channel_mult": (1, 2, 4), "unet.attention_resolutions": (32, 16)}
# PrivImage: public_data.selective.ratio 0.05 and sigma 50 (500 on CelebA): num_words = int(1000 * 0.05 /
# classes) = 5 (25 on CelebA) classes per sensitive class, each member voting for its top num_words
# (data/dataset_loader.py); pretrain.batch_size 1024, n_epochs 3200 of 62 batches, cond true (10% dropped).
PRIVIMAGE = {"query.sigma": 50.0, "query.top_k": 5, "query.classes_per_class": 5, "pretrain.steps": 198_400,
             "pretrain.batch_size": 1024, "pretrain.lr": 3e-4, "pretrain.label_dropout": 0.1}
PRIVIMAGE_CELEBA = {**PRIVIMAGE, "query.sigma": 500.0, "query.top_k": 25, "query.classes_per_class": 25, "dp.epochs": 100}
# PDP-Diffusion: pretrain.batch_size 1024, n_epochs 160 of all ImageNet (1,251 batches); train.n_epochs 100 on
# CelebA 32, 50 with n_noise_samples 16 on CelebA 64.
PDP = {"pretrain.steps": 200_160, "pretrain.batch_size": 1024, "pretrain.lr": 3e-4}
# DPDM, celeba_male_64_eps10.0: train.n_epochs 100, loss.n_noise_samples 4.
DPDM_CELEBA64 = {**DIFFUSION_32PX, "unet.attention_resolutions": (32,), "dp.epochs": 100, "dp.multiplicity": 4}
# DP-FETA at github.com/2019ChenGong/DPImageBench@565f8d7 (b52f514 has none), configs/DP-FETA/<file>.yaml:
# public_data.central batch_size 6000, sigma 5, sample_num 5 on MNIST and CIFAR-10 (12000, 10, 250 on CelebA),
# downsampled by 1/2 (1/4 at 64 px; data/dataset_loader.py, CentralDataset); pretrain.n_epochs_time 2000 (1000 on
# CelebA) of floor(sample_num * classes / batch_size_time 50) batches, cond true; the shared diffusion values
# but train.n_epochs 50 and loss.n_noise_samples 4 on CelebA 64.
DP_FETA = {"central.batch_size": 6000, "central.sigma": 5.0, "central.releases": 5, "central.downsample": 2,
           "pretrain.steps": 2000, "pretrain.batch_size": 50, "pretrain.lr": 3e-4, "pretrain.label_dropout": 0.1}
DP_FETA_CELEBA = {**DP_FETA, "central.batch_size": 12000, "central.sigma": 10.0, "central.releases": 250,
                  "pretrain.steps": 10000}
# DP-FETA-Pro at 565f8d7 (b52f514 has none), configs/DP-FETA-Pro/<file>.yaml: DP-FETA's central images with
# public_data.central.sigma replaced by train.sigma_time (utils/utils.py, parse_config) and pretrain.n_epochs_time
# 1000; DP-MERF's release at train.sigma_freq with model.freq d_rff 10000, rff_sigma 105, Generator.z_dim 60,
# train.freq epochs 5, lr_decay 0.9 and batch_size / lr 100 / 0.01 or 500 / 0.005, gen.freq data_num 60000 and
# batch_size 1000; pretrain.n_epochs_freq 10 of floor(60000 / batch_size_freq 256) batches.
DP_FETA_PRO = {**DP_FETA, "pretrain.steps": 1000, "frequency.d_rff": 10000, "frequency.rff_sigma": 105.0,
               "frequency.z_dim": 60, "frequency.epochs": 5, "frequency.lr_decay": 0.9, "frequency.batch_size": 100,
               "frequency.lr": 0.01, "frequency.samples": 60000, "frequency.sample_batch_size": 1000,
               "frequency.downsample": 1, "frequency_pretrain.steps": 2340, "frequency_pretrain.batch_size": 256,
               "frequency_pretrain.lr": 3e-4, "frequency_pretrain.label_dropout": 0.1}
FREQ_500 = {"frequency.batch_size": 500, "frequency.lr": 0.005}
# train.sigma_time and train.sigma_freq by (dataset, eps).
FETA_PRO_SIGMAS = {("mnist", 1.0): (20.0, 26.6), ("mnist", 10.0): (5.0, 7.4), ("fashion-mnist", 1.0): (20.0, 26.6),
                   ("fashion-mnist", 10.0): (5.0, 7.4), ("cifar10", 1.0): (15.0, 32.6), ("cifar10", 10.0): (5.0, 8.2),
                   ("celeba32", 1.0): (15.0, 25.0), ("celeba32", 10.0): (50.0, 8.2), ("celeba64", 10.0): (50.0, 8.2),
                   ("camelyon", 1.0): (10.0, 49.6), ("camelyon", 10.0): (5.0, 8.4)}


def feta_pro(dataset: str, eps: float, *parts: dict) -> tuple:
    sigma_time, sigma_freq = FETA_PRO_SIGMAS[dataset, eps]
    merged = {k: v for part in (DP_FETA_PRO, *parts) for k, v in part.items()}
    return ("dp-feta-pro", dataset, eps, {**merged, "central.sigma": sigma_time, "frequency.sigma": sigma_freq})


# configs/DP-Kernel/*: model.sigma_list [1, 2, 4, 8, 16] over [-1, 1] pixels (halved over [0, 1]), train.max_iter
# 200002, train.batch_size 60, train.lr 5e-5 with RMSprop (models/dp_kernel.py), Generator.z_dim 60, gen.batch_size 1000.
DP_KERNEL = {"bandwidths": (0.5, 1.0, 2.0, 4.0, 8.0), "steps": 200002, "member_batch": 60, "batch_size": 60,
             "optimizer": "rmsprop", "lr": 5e-5, "z_dim": 60, "sample_batch_size": 1000}
# configs/DP-NTK/*: model_ntk fc_1l with ntk_width 800 on MNIST, fc_2l with widths 32 and 256 elsewhere; label_dim
# max(10, 1000); train.n_iter 2000, lr 1e-2, lr_decay 0.9, scheduler_interval 2001; train.batch_size 5000
# (2500 on CIFAR-10).
DP_NTK = {"ntk_widths": (800,), "ntk_outputs": 1000, "steps": 2000, "batch_size": 5000, "lr": 0.01, "lr_decay": 0.9,
          "decay_every": 2001, "z_dim": 60}
DP_NTK_CIFAR10 = {**DP_NTK, "ntk_widths": (32, 256), "batch_size": 2500}
DP_NTK_CELEBA = {**DP_NTK, "ntk_widths": (32, 256)}
# configs/DPGAN/*: train.batch_size 4096, n_epochs 150 (100 on CelebA), d_updates 5, optim.params d_lr 5e-4,
# g_lr 2e-4, beta1 0.0, dp.max_grad_norm 0.001, dp.max_physical_batch_size 8192, Generator.z_dim 60.
DP_GAN = {"logical_batch": 4096, "batch_size": 4096, "epochs": 150, "d_updates": 5, "d_lr": 5e-4, "lr": 2e-4,
          "betas": (0.0, 0.999), "clip_norm": 0.001, "physical_batch": 8192, "z_dim": 60}
DP_GAN_CELEBA = {**DP_GAN, "epochs": 100}
# configs/GS-WGAN/* (CIFAR-10's at 565f8d7, the commit that adds it): model.num_discriminators 1000,
# train.batch_size 32, iterations 20000, critic_iters 5, L_gp 10, L_epsilon 0.001, pretrain.iterations 2000,
# Generator.z_dim 10.
GS_WGAN = {"discriminators": 1000, "d_batch": 32, "batch_size": 32, "iterations": 20000, "critic_iters": 5,
           "gp_weight": 10.0, "drift": 0.001, "warmup_iters": 2000, "z_dim": 10}

# DPImageBench's PE configuration: configs/PE/mnist_28_eps1.0.yaml at 565f8d7 (its schedules changed since
# b52f514), mnist_28_eps10.0.yaml and cifar10_32_eps{1.0,10.0}.yaml at b52f514: train.num_samples_schedule
# (60000 over 10 classes; T = its length - 1), train.variation_degree_schedule[1..T], train.lookahead_degree,
# train.count_threshold, model.api_params.timestep_respacing, model.feature_extractor inception_v3.
PE = {"population": 6000, "lookahead": 8, "embedding": "inception"}
PE_MNIST_1 = {**PE, "sampler_steps": 10, "variation_degrees": (0, 0, 1, 1, 1, 1, 2, 2, 2, 2), "threshold": 24.0}
PE_MNIST_10 = {**PE, "sampler_steps": 10, "variation_degrees": (0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2), "threshold": 3.0}
PE_CIFAR10 = {**PE, "sampler_steps": 100, "variation_degrees": (2, 4, 6, 8, 10)}

BOTH = (1.0, 10.0)

# configs/{DP-LDM,DP-LORA}/* at 565f8d7 and the models/DP_LDM configs they point to (methods/latent.yaml):
# autoencoder_kl_*.yaml ddconfig (ch 128, 192 at 64 px; ch_mult [1, 2]; num_res_blocks 2; z_channels 3) and
# kl_weight 1e-6, 4 epochs of batch 64 over ImageNet; the latent UNet's model.network; pre-training 160 epochs
# of batch 1024 (80 of 512 at 64 px); train.batch_size 4096, n_epochs 150 (100 CelebA, 50 CelebA 64),
# dp.max_grad_norm 0.001; learning rates base_learning_rate 1e-6 times the batch; DDIM's 200 steps.
LATENT = {"autoencoder.base_channels": 128, "autoencoder.channel_mult": (1, 2), "autoencoder.layers_per_block": 2,
          "autoencoder.latent_channels": 3, "autoencoder.kl_weight": 1e-6, "autoencoder.steps": 80072,
          "autoencoder.batch_size": 64, "autoencoder.lr": 6.4e-5, "pretrain.steps": 200160, "pretrain.batch_size": 1024,
          "pretrain.lr": 1.024e-3, "dp.logical_batch": 4096, "dp.epochs": 150, "dp.clip_norm": 0.001, "dp.lr": 4.096e-3,
          "sampler.steps": 200, "unet.base_channels": 32, "unet.channel_mult": (1, 2, 2), "unet.attention_resolutions": (16, 8, 4)}
LATENT_28PX = {**LATENT, "unet.base_channels": 64, "unet.channel_mult": (1, 2), "unet.attention_resolutions": (14, 7)}
LATENT_CELEBA64 = {**LATENT, "autoencoder.base_channels": 192, "unet.attention_resolutions": (32, 16, 8), "pretrain.batch_size": 512,
                   "pretrain.lr": 5.12e-4, "dp.epochs": 50}
# finetuning/*.yaml: DP-LDM's ablation_blocks (-1 at 28 px: every module, else 9; the last entry of each
# cell below) and no noise multiplicity; DP-LoRA's model_lora_r 8, DPDM_k 8, use_ema false.
DP_LDM = {"dp.multiplicity": 1}
DP_LORA = {"lora_rank": 8, "dp.multiplicity": 8, "dp.ema_decay": 0.0}
LATENT_CELLS = [("mnist", BOTH, LATENT_28PX, 1), ("fashion-mnist", BOTH, LATENT_28PX, 1), ("cifar10", BOTH, LATENT, 9),
                ("celeba32", BOTH, {**LATENT, "dp.epochs": 100}, 9), ("celeba64", (10.0,), LATENT_CELEBA64, 9)]

PUBLISHED = [
    *[("dp-merf", dataset, eps, DP_MERF) for dataset in ("mnist", "cifar10", "celeba32") for eps in BOTH],
    ("dp-merf", "celeba64", 10.0, DP_MERF),
    *[("dp-kernel", dataset, eps, DP_KERNEL) for dataset in ("mnist", "cifar10", "celeba32") for eps in BOTH],
    ("dp-kernel", "celeba64", 10.0, DP_KERNEL),
    *[("dp-ntk", "mnist", eps, DP_NTK) for eps in BOTH],
    *[("dp-ntk", "cifar10", eps, DP_NTK_CIFAR10) for eps in BOTH],
    *[("dp-ntk", "celeba32", eps, DP_NTK_CELEBA) for eps in BOTH],
    ("dp-ntk", "celeba64", 10.0, DP_NTK_CELEBA),
    *[("dp-gan", dataset, eps, DP_GAN) for dataset in ("mnist", "cifar10") for eps in BOTH],
    *[("dp-gan", "celeba32", eps, DP_GAN_CELEBA) for eps in BOTH],
    ("dp-gan", "celeba64", 10.0, DP_GAN_CELEBA),
    *[("gs-wgan", dataset, eps, GS_WGAN) for dataset in ("mnist", "cifar10", "celeba32") for eps in BOTH],
    ("gs-wgan", "celeba64", 10.0, GS_WGAN),
    *[("dpdm", "mnist", eps, DIFFUSION_MNIST) for eps in BOTH],
    *[("dpdm", dataset, eps, DIFFUSION_32PX) for dataset in ("cifar10", "celeba32") for eps in BOTH],
    ("dpdm", "celeba64", 10.0, DPDM_CELEBA64),
    *[("pdp-diffusion", "mnist", eps, {**DIFFUSION_MNIST, **PDP}) for eps in BOTH],
    *[("pdp-diffusion", "cifar10", eps, {**DIFFUSION_32PX, **PDP}) for eps in BOTH],
    *[("pdp-diffusion", "celeba32", eps, {**DIFFUSION_32PX, **PDP, "dp.epochs": 100}) for eps in BOTH],
    ("pdp-diffusion", "celeba64", 10.0, {**DIFFUSION_64PX, **PDP, "dp.epochs": 50, "dp.multiplicity": 16}),
    *[("dp-feta", "mnist", eps, {**DIFFUSION_MNIST, **DP_FETA}) for eps in BOTH],
    *[("dp-feta", "cifar10", eps, {**DIFFUSION_32PX, **DP_FETA}) for eps in BOTH],
    *[("dp-feta", "celeba32", eps, {**DIFFUSION_32PX, **DP_FETA_CELEBA}) for eps in BOTH],
    ("dp-feta", "celeba64", 10.0, {**DIFFUSION_64PX, **DP_FETA_CELEBA, "central.downsample": 4, "dp.epochs": 50,
                                   "dp.multiplicity": 4}),
    *[feta_pro(dataset, eps, DIFFUSION_MNIST) for dataset in ("mnist", "fashion-mnist") for eps in BOTH],
    feta_pro("cifar10", 1.0, DIFFUSION_32PX),
    feta_pro("cifar10", 10.0, DIFFUSION_32PX, FREQ_500),
    feta_pro("celeba32", 1.0, DIFFUSION_32PX, DP_FETA_CELEBA, FREQ_500),
    feta_pro("celeba32", 10.0, DIFFUSION_32PX, DP_FETA_CELEBA),
    feta_pro("celeba64", 10.0, DIFFUSION_64PX, DP_FETA_CELEBA, {"central.downsample": 4, "frequency.downsample": 2,
                                                                 "dp.epochs": 50, "dp.multiplicity": 4}),
    *[feta_pro("camelyon", eps, DIFFUSION_32PX, DP_FETA_CELEBA, FREQ_500, {"dp.epochs": 50}) for eps in BOTH],
    *[("privimage", "mnist", eps, {**DIFFUSION_MNIST, **PRIVIMAGE}) for eps in BOTH],
    *[("privimage", "cifar10", eps, {**DIFFUSION_32PX, **PRIVIMAGE}) for eps in BOTH],
    *[("privimage", "celeba32", eps, {**DIFFUSION_32PX, **PRIVIMAGE_CELEBA}) for eps in BOTH],
    ("privimage", "celeba64", 10.0, {**DIFFUSION_64PX, **PRIVIMAGE_CELEBA, "dp.multiplicity": 16}),
    ("pe", "mnist", 1.0, PE_MNIST_1),
    ("pe", "mnist", 10.0, PE_MNIST_10),
    ("pe", "cifar10", 1.0, {**PE_CIFAR10, "threshold": 15.0}),
    ("pe", "cifar10", 10.0, {**PE_CIFAR10, "threshold": 2.0}),
    ("pe", "celeba32", 1.0, {**PE_CIFAR10, "population": 30000, "threshold": 15.0}),
    *[("dp-ldm", dataset, eps, {**values, **DP_LDM, "tuned_attention_from": first})
      for dataset, epsilons, values, first in LATENT_CELLS for eps in epsilons],
    *[("dp-lora", dataset, eps, {**values, **DP_LORA}) for dataset, epsilons, values, _ in LATENT_CELLS for eps in epsilons],
]


def resolved(method: str, dataset: str, epsilon: float, preset: str = "paper", sets=()):
    return resolve(METHODS.get(method), dataset, epsilon, 0, preset, "cpu", parse_overrides(list(sets)))


def value(params, dotted: str):
    for part in dotted.split("."):
        params = getattr(params, part)
    return params


@pytest.mark.parametrize("method, dataset, epsilon, expected", PUBLISHED)
def test_the_paper_preset_carries_the_published_values(method, dataset, epsilon, expected, caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved(method, dataset, epsilon)
    assert {key: value(config.params, key) for key in expected} == expected
    assert config.preset_fallback is None and "stand in" not in caplog.text  # DPImageBench configures it


@pytest.mark.parametrize("method", ["dp-merf", "dp-kernel", "dp-ntk", "dp-gan", "gs-wgan", "dpdm", "pdp-diffusion", "privimage", "dp-feta",
                                    "dp-feta-pro"])
def test_celeba64_at_eps_1_which_dpimagebench_does_not_configure_falls_back_to_its_eps_10(method, caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved(method, "celeba64", 1.0)
    assert config.preset_fallback == "paper/celeba64" and "no entry for celeba64 at eps 1" in caplog.text
    assert config.params == resolved(method, "celeba64", 10.0).params


def test_dp_merf_paper_on_cifar10_at_eps_10_is_dpimagebench_s_and_no_fallback(caplog):
    with caplog.at_level(logging.INFO, logger="privbench"):
        config = resolve(METHODS.get("dp-merf"), "cifar10", 10.0, 0, "paper", "cpu", {})
    assert {key: getattr(config.params, key) for key in DP_MERF} == DP_MERF
    assert config.preset_fallback is None and "stand in" not in caplog.text


@pytest.mark.parametrize(
    "dataset, epsilon, fallback, logged",
    [
        ("ham10000", 10.0, "paper", "dp-merf's paper preset has no entry for ham10000: the values of paper stand in"),
        ("eurosat", 1.0, "paper", "dp-merf's paper preset has no entry for eurosat: the values of paper stand in"),
        ("mnist", 5.0, "paper/mnist", "dp-merf's paper preset has no entry for mnist at eps 5: the values of paper/mnist stand in"),
    ],
)
def test_a_fallback_is_logged_and_recorded_in_the_config(dataset, epsilon, fallback, logged, caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved("dp-merf", dataset, epsilon)
    assert logged in caplog.text
    assert config.preset_fallback == fallback and config.to_dict()["preset_fallback"] == fallback
    assert from_dict(config.to_dict()) == config  # the stored config keeps the record
    assert {key: getattr(config.params, key) for key in DP_MERF} == DP_MERF


def test_a_preset_without_entries_is_one_setting_for_every_dataset(caplog):
    with caplog.at_level(logging.WARNING, logger="privbench"):
        config = resolved("dp-merf", "ham10000", 10.0, preset="cpu")
    assert config.preset_fallback is None and "stand in" not in caplog.text
    assert config.params == resolved("dp-merf", "mnist", 10.0, preset="cpu").params


def test_the_record_of_no_fallback_leaves_the_config_hash_alone():
    # leaderboards/cpu/mnist.csv: each cell's config_hash was computed before preset_fallback existed
    cells = pd.read_csv(Path(__file__).parents[1] / "leaderboards" / "cpu" / "mnist.csv")
    for _, cell in cells[cells["method"] == "dp-merf"].iterrows():
        config = resolve(METHODS.get("dp-merf"), cell["dataset"], cell["target_epsilon"], int(cell["seed"]), cell["preset"],
                         "cpu", {})
        assert config.preset_fallback is None and config.digest() == cell["config_hash"]


def test_the_fallback_cannot_be_set():
    with pytest.raises(PrivbenchError, match="setting 'preset_fallback' records .* cannot be set: drop --set preset_fallback"):
        resolved("dp-merf", "ham10000", 10.0, sets=["preset_fallback=null"])


class Keyed:
    """A method whose preset file (keyed.yaml) the tests write."""

    name = "keyed"


def write_presets(tmp_path, monkeypatch, text: str) -> Path:
    path = tmp_path / f"{__name__.rsplit('.', 1)[-1]}.yaml"
    path.write_text(text)
    monkeypatch.setattr(privbench.methods.resources, "files", lambda package: tmp_path)
    return path


KEYED = """
paper:
  <<: &paper {lr: 0.1, epochs: 5, z_dim: 60}
  datasets:
    cifar10:
      lr: 0.2
      eps:
        10: {epochs: 9}
        .inf: {epochs: 1}
    mnist: {z_dim: 5}
small:
  <<: *paper
"""


@pytest.mark.parametrize(
    "preset, dataset, epsilon, values, fallback",
    [
        ("paper", "cifar10", 10.0, {"lr": 0.2, "epochs": 9, "z_dim": 60}, None),  # preset + dataset + eps
        ("paper", "cifar10", float("inf"), {"lr": 0.2, "epochs": 1, "z_dim": 60}, None),
        ("paper", "cifar10", 1.0, {"lr": 0.2, "epochs": 5, "z_dim": 60}, "paper/cifar10"),  # preset + dataset
        ("paper", "mnist", 1.0, {"lr": 0.1, "epochs": 5, "z_dim": 5}, None),  # a dataset without entries per eps
        ("paper", "celeba32", 10.0, {"lr": 0.1, "epochs": 5, "z_dim": 60}, "paper"),  # preset
        ("small", "cifar10", 10.0, {"lr": 0.1, "epochs": 5, "z_dim": 60}, None),  # the anchor leaves entries out
    ],
)
def test_the_most_specific_entry_wins(preset, dataset, epsilon, values, fallback, tmp_path, monkeypatch):
    write_presets(tmp_path, monkeypatch, KEYED)
    assert preset_values(Keyed, preset, dataset, epsilon) == (values, fallback)
    assert presets(Keyed)["paper"] == {"lr": 0.1, "epochs": 5, "z_dim": 60}  # without the entries


@pytest.mark.parametrize(
    "entries, complaint",
    [
        ("datasets: {cifar-10: {lr: 0.2}}", "paper.datasets names 'cifar-10', which is not a sensitive dataset: use one of"),
        ("datasets: {imagenet32: {lr: 0.2}}", "paper.datasets names 'imagenet32', which is not a sensitive dataset"),
        ("datasets: [cifar10]", "paper.datasets must map dataset names to settings"),
        ("datasets: {cifar10: {eps: {ten: {}}}}", "paper.datasets.cifar10.eps has the key 'ten', which is not an epsilon"),
        ("datasets: {cifar10: {eps: {0: {}}}}", "paper.datasets.cifar10.eps has the key 0, which is not an epsilon"),
        ("datasets: {cifar10: {eps: [1, 10]}}", "paper.datasets.cifar10.eps must map epsilons to settings"),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_method_the_file_and_the_fix(entries, complaint, tmp_path, monkeypatch):
    path = write_presets(tmp_path, monkeypatch, f"paper:\n  lr: 0.1\n  {entries}\n")
    with pytest.raises(PrivbenchError) as refused:
        preset_values(Keyed, "paper", "cifar10", 10.0)
    message = str(refused.value)
    assert complaint in message and str(path) in message and "'keyed'" in message
    assert len(message.splitlines()) == 1


def test_the_paper_table_prints_without_a_database(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a fresh clone: no privbench-runs/results.sqlite
    assert cli.main(["table", "--paper", "dpimagebench", "--dataset", "cifar10"]) == 0
    out = capsys.readouterr().out
    # leaderboards/paper/dpimagebench.csv, DP-MERF on CIFAR-10: CA 27.2 / 29.0 at eps 1 / 10, FID 214.1 at eps 10
    row = next(line for line in out.splitlines() if line.startswith("| dp-merf "))
    assert [cell.strip() for cell in row.strip("|").split("|")] == ["dp-merf", "27.2", "214.1", "29.0"]
    assert "privbench |" not in out and "no results database to compare" in out
    assert list(tmp_path.iterdir()) == []  # no database made on the way


def test_a_named_database_that_is_missing_is_still_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["table", "--paper", "dpimagebench", "--out", "elsewhere"]) == 2
    assert "no results database in elsewhere" in capsys.readouterr().err


DIFFUSION_METHODS = ["dpdm", "pdp-diffusion", "privimage", "dp-feta", "dp-feta-pro"]
SIDES = {"mnist": 28, "cifar10": 32, "folder": 32, "celeba64": 64}  # a dataset per native side, and a user's folder
PUBLIC = {"folder": ["public=tiny-imagenet"]}  # a folder has no default public set


@pytest.mark.parametrize("preset", ["smoke", "cpu", "small", "paper"])
@pytest.mark.parametrize("method", DIFFUSION_METHODS)
def test_each_preset_s_unet_attends_at_levels_it_has_at_28_32_and_64_px(method, preset):
    for dataset, native in SIDES.items():
        config = resolved(method, dataset, 10.0, preset=preset, sets=PUBLIC.get(dataset, ()))
        side = config.data.resolution or native  # the cpu tier's 16 px
        unet = config.params.unet
        assert set(unet.attention_resolutions) <= set(unet.levels(side)), (dataset, side, unet)
        assert side % 2 ** (len(unet.channel_mult) - 1) == 0
        if preset != "cpu":  # cpu's UNet has no attention at any side; the others attend at every side
            assert unet.attention_resolutions, (dataset, unet)


def test_the_smoke_unet_on_cifar10_is_built_with_the_attention_its_preset_names():
    from diffusers.models.attention_processor import Attention

    from privbench.nets.unet import build_unet

    unet = resolved("privimage", "cifar10", 10.0, preset="smoke").params.unet
    model = build_unet(32, 3, 10, unet.base_channels, unet.channel_mult, unet.layers_per_block, unet.attention_resolutions)
    assert unet.attention_resolutions == (8,) and any(isinstance(m, Attention) for m in model.modules())


@pytest.mark.parametrize("preset", ["smoke", "cpu", "small", "paper"])
@pytest.mark.parametrize("method", ["dp-merf", "dp-kernel", "dp-ntk", "dp-gan", "gs-wgan"])
def test_each_preset_s_generator_and_discriminator_fit_28_32_and_64_px(method, preset):
    for dataset, native in SIDES.items():
        params = resolved(method, dataset, 10.0, preset=preset, sets=PUBLIC.get(dataset, ())).params
        for side in (native, 16):
            assert side % 2 ** len(params.channels) == 0  # the generator's first feature map is whole
            assert side >= 2 ** len(getattr(params, "d_channels", ()))  # the discriminator leaves something


@pytest.mark.parametrize(
    "method, dataset, sets, complaint",
    [
        ("privimage", "mnist", ["data.resolution=32"],
         "setting 'params.unet.attention_resolutions' has 7, which is no level of the UNet at 32 px (its levels: 32, 16, 8): "
         "attend at levels it has, e.g. --set params.unet.attention_resolutions=8"),
        ("dpdm", "cifar10", ["params.unet.attention_resolutions=7"],
         "setting 'params.unet.attention_resolutions' has 7, which is no level of the UNet at 32 px (its levels: 32, 16, 8)"),
        ("pdp-diffusion", "mnist", ["params.unet.channel_mult=1,2,2,2"],
         "setting 'params.unet.channel_mult' gives 4 UNet levels, which halve a 28 px image unevenly: use at most 3, "
         "e.g. --set params.unet.channel_mult=1,2,2"),
        ("dp-merf", "mnist", ["params.channels=16,8,8"],
         "setting 'params.channels' gives the generator 3 upsampling blocks, which need a resolution divisible by 8, got 28 px"),
        ("dp-gan", "mnist", ["params.d_channels=8,8,8,8,8"],
         "setting 'params.d_channels' gives the discriminator 5 stride-2 blocks, which leave nothing of a 16 px image"),
    ],
)
def test_a_network_that_does_not_fit_the_run_s_side_is_refused_in_one_line(method, dataset, sets, complaint):
    with pytest.raises(PrivbenchError) as refused:
        resolved(method, dataset, 10.0, preset="smoke" if method != "dp-gan" else "cpu", sets=sets)
    message = str(refused.value)
    assert complaint in message and len(message.splitlines()) == 1


def test_the_cli_refuses_attention_at_a_missing_level_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["run", "--method", "dpdm", "--dataset", "mnist", "--preset", "smoke", "--eps", "10",
            "--set", "data.resolution=32", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "'params.unet.attention_resolutions' has 7" in err and len(err.splitlines()) == 1
    assert not out.exists()  # no database, no run directory
