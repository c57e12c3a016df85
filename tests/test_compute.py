"""Compute settings (privbench.compute): speed without changing what is computed or what is private."""

import math

import pandas as pd
import pytest
import torch

from privbench.compute import ComputeConfig, largest_fitting_batch
from privbench.config import parse_overrides, resolve
from privbench.context import RunContext
from privbench.diffusion import edm
from privbench.diffusion.pipeline import EDM
from privbench.dp import PrivacyLedger
from privbench.dp import sgd
from privbench.errors import PrivbenchError
from privbench.methods import METHODS
from privbench.nets.unet import build_unet

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
BF16 = ComputeConfig(precision="bf16")


def context(tmp_path, compute=ComputeConfig()):
    return RunContext(tmp_path, tmp_path, torch.device("cpu"), seed=5, progress=False, compute=compute)


def unet():
    torch.manual_seed(0)
    return build_unet(28, 1, 10, 8, (1, 2), 1, (14,))


def images(n=12):
    g = torch.Generator().manual_seed(2)
    return [torch.randn(n, 1, 28, 28, generator=g).clamp(-1, 1), torch.randint(10, (n,), generator=g)]


def fixed_loss(model, x, y):
    """EDM's loss at fixed noise levels and noises (one per row), so two trainings see the same draws."""
    g = torch.Generator().manual_seed(len(x))
    sigma = edm.sample_sigma(len(x), EDM, g)
    return edm.per_example_loss(model, x, y, sigma, torch.randn(x.shape, generator=g), EDM)


def train(ctx, mode="functorch", steps=2, **kw):
    ledger = PrivacyLedger(math.inf, 1e-5)
    result = sgd.train_dp_sgd(unet(), fixed_loss, images(), ledger, ctx, logical_batch=12,
                              physical_batch=kw.pop("physical_batch", 5), steps=steps, lr=1e-3,
                              grad_sample_mode=mode, clip_norm=0.01, **kw)
    return torch.cat([p.detach().flatten() for p in result.model.parameters()])


def test_default_compute_keeps_the_committed_run_identities():
    # The smoke leaderboard's DP-MERF eps-10 cell was computed before compute settings existed.
    cells = pd.read_csv("leaderboards/smoke/mnist.csv")
    committed = cells[(cells["method"] == "dp-merf") & (cells["target_epsilon"] == 10)]["config_hash"].iloc[0]
    config = resolve(METHODS.get("dp-merf"), "mnist", 10.0, 0, "smoke", "cpu", {})
    assert config.digest() == committed
    bf16 = resolve(METHODS.get("dp-merf"), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(["compute.precision=bf16"]))
    assert bf16.digest() != committed  # bf16 computes other numbers: another run


def test_unknown_precision_is_refused_up_front():
    with pytest.raises(PrivbenchError, match="setting 'compute.precision' must be one of: fp32, bf16, got fp16"):
        resolve(METHODS.get("dp-merf"), "mnist", 10.0, 0, "smoke", "cpu", parse_overrides(["compute.precision=fp16"]))


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_bf16_per_sample_gradients_are_float32_before_clipping(tmp_path, mode):
    wrapped, handles = sgd.wrap_for_dp(unet(), mode, 1.0)
    try:
        sgd.per_example_backward(wrapped, None, fixed_loss, images(4), 1, mode, BF16)
        dtypes = {p.grad_sample.dtype for p in wrapped.parameters()}
    finally:
        wrapped.to_standard_module()
        for h in handles:
            h.remove()
    assert dtypes == {torch.float32}


def test_bf16_training_follows_fp32_closely(tmp_path):
    fp32 = train(context(tmp_path))
    bf16 = train(context(tmp_path, BF16))
    assert not torch.equal(fp32, bf16)  # autocast did run
    # Clipping binds (clip 0.01) in both: bf16 moves the update by rounding only.
    initial = torch.cat([p.detach().flatten() for p in unet().parameters()])
    assert (bf16 - fp32).norm() <= 0.05 * (fp32 - initial).norm()


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_channels_last_computes_the_same_update(tmp_path, mode):
    plain = train(context(tmp_path), mode)
    nhwc = train(context(tmp_path, ComputeConfig(channels_last=True)), mode)
    torch.testing.assert_close(nhwc, plain, rtol=1e-4, atol=1e-5)  # float reordering only


def test_ghost_clipping_refuses_bf16(tmp_path):
    with pytest.raises(PrivbenchError, match="ghost clipping"):
        train(context(tmp_path, BF16), "ghost")


def test_physical_batch_null_trains_the_same_on_cpu(tmp_path):
    # On CPU "null" is min(logical batch, CPU_PHYSICAL_BATCH): here the whole logical batch at once.
    torch.testing.assert_close(train(context(tmp_path), physical_batch=None),
                               train(context(tmp_path), physical_batch=12), rtol=0, atol=1e-6)


def test_largest_fitting_batch_stops_below_out_of_memory():
    tried = []

    def try_batch(b):
        tried.append(b)
        if b > 100:
            raise torch.OutOfMemoryError("CUDA out of memory")

    assert largest_fitting_batch(try_batch, limit=4096) == 64 and tried == [8, 16, 32, 64, 128]
    assert largest_fitting_batch(lambda b: None, limit=40) == 40  # the limit itself is tried last
    with pytest.raises(PrivbenchError, match="does not fit"):
        largest_fitting_batch(try_batch, limit=4096, start=256)


def test_bf16_sampling_gives_images(tmp_path):
    from privbench.diffusion.pipeline import DiffusionSynthesizer, SamplerConfig

    class Task:
        classes, channels, resolution = tuple("0123456789"), 1, 28

    synthesizer = DiffusionSynthesizer(unet(), torch.full((10,), 0.1), Task, SamplerConfig(2, 1.0, 4), False, BF16)
    out = synthesizer.sample(6, generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (6, 28, 28, 1) and out.images.dtype.name == "uint8"
