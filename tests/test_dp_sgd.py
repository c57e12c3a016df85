"""DP-SGD engine: clipping, noise, accounting, multiplicity, per-sample gradients, EMA."""


import pytest
import torch
from diffusers import UNet2DModel
from opacus import GradSampleModule
from torch import nn
from torch.func import functional_call, grad, vmap

from privbench.context import RunContext
from privbench.dp import DPSGDPhase, Mechanism, PrivacyLedger
from privbench.dp.sgd import GRAD_SAMPLE_MODES, check_grad_samples, per_sample_gradients, train_dp_sgd
from privbench.errors import PrivbenchError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

NO_PRIVACY = float("inf")


@pytest.fixture
def ctx(tmp_path):
    return RunContext(tmp_path, tmp_path, torch.device("cpu"), seed=7, progress=False)


@pytest.fixture
def device_ctx(tmp_path, device):
    """A context on the `device` fixture's device (tests/conftest.py): the engine moves model and members there."""
    return RunContext(tmp_path, tmp_path, device, seed=7, progress=False)


def mlp(seed=0, d=4):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 6), nn.Tanh(), nn.Linear(6, 1))


def data(n=32, d=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g), torch.randn(n, generator=g)]


def mse(model, x, y):
    return (model(x).squeeze(1) - y) ** 2


def train(model, tensors, ctx, eps=NO_PRIVACY, **kw):
    ledger = PrivacyLedger(eps, 1e-5, accountant=kw.pop("accountant", "rdp"))
    opts = dict(logical_batch=len(tensors[0]), physical_batch=8, lr=0.1, optimizer="sgd")
    opts |= {} if "epochs" in kw else {"steps": 1}
    return train_dp_sgd(model, kw.pop("loss_fn", mse), tensors, ledger, ctx, **(opts | kw)), ledger


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()]).cpu()


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_clipping_bounds_each_example(device_ctx, mode):
    # One example with a huge gradient: the update is lr * clip / expected_batch, no more.
    ctx = device_ctx
    x, y = data(n=1)
    model = mlp()
    before = flat(model)
    result, _ = train(model, [100 * x, 100 + y], ctx, clip_norm=0.1, lr=0.5, grad_sample_mode=mode)
    step = (flat(result.model) - before).norm().item()
    assert step == pytest.approx(0.5 * 0.1, rel=1e-4)
    # Eight examples, q = 1: each clipped contribution adds at most lr * clip / 8.
    x, y = data(n=8)
    model = mlp()
    before = flat(model)
    result, _ = train(model, [100 * x, 100 + y], ctx, clip_norm=0.1, lr=0.5, grad_sample_mode=mode)
    assert (flat(result.model) - before).norm().item() <= 0.5 * 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_no_noise_no_clipping_is_plain_sgd(ctx, mode):
    tensors = data(n=12)
    model, reference = mlp(), mlp()
    result, _ = train(model, tensors, ctx, clip=False, grad_sample_mode=mode, physical_batch=5)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1)
    mse(reference, *tensors).mean().backward()
    opt.step()
    torch.testing.assert_close(flat(result.model), flat(reference), rtol=0, atol=1e-6)


def test_grad_sample_modes_agree_with_clipping_and_noise(ctx):
    # Clipping binds (clip 0.05) and noise is on: every mode must produce the same trajectory.
    # q = 1 throughout where subsampling is not under test: RDP calibrates it in milliseconds.
    tensors = data()
    runs = [
        train(mlp(), tensors, ctx, eps=4.0, grad_sample_mode=m, steps=4, clip_norm=0.05)[0]
        for m in GRAD_SAMPLE_MODES
    ]
    for other in runs[1:]:
        torch.testing.assert_close(flat(other.model), flat(runs[0].model), rtol=0, atol=1e-6)


def test_calibrated_noise_meets_target_and_is_the_noise_used(ctx):
    seen = []

    def loss_fn(model, x):
        seen.append(list(ledger.mechanisms))  # what the ledger held when members were first read
        return 0 * model(x).sum(1)  # zero gradient: the update is pure noise

    torch.manual_seed(0)
    model = nn.Linear(200, 200, bias=False)
    before = flat(model)
    ledger = PrivacyLedger(3.0, 1e-5, accountant="rdp")
    result = train_dp_sgd(
        model, loss_fn, [torch.randn(64, 200)], ledger, ctx,
        logical_batch=64, physical_batch=64, steps=1, clip_norm=0.5, lr=1.0, optimizer="sgd",
    )
    assert 0.99 * 3.0 <= ledger.spent() <= 3.0
    assert ledger.mechanisms == [result.mechanism] and seen[0] == [result.mechanism]
    assert result.optimizer.noise_multiplier is result.mechanism.noise_multiplier
    # The update's spread is sigma * clip / expected batch: the accounted noise, no more, no less.
    std = (flat(result.model) - before).std().item()
    assert std == pytest.approx(result.mechanism.noise_std / 64, rel=0.03)


def test_prior_query_forces_more_noise(ctx):
    tensors = data()
    empty, _ = train(mlp(), tensors, ctx, eps=2.0, steps=3)
    ledger = PrivacyLedger(2.0, 1e-5, accountant="rdp")
    ledger.record(Mechanism("query", "gaussian", 5.0))
    after_query = train_dp_sgd(
        mlp(), mse, tensors, ledger, ctx, logical_batch=32, physical_batch=8, steps=3, lr=0.1
    )
    assert after_query.mechanism.noise_multiplier > empty.mechanism.noise_multiplier
    assert ledger.spent() <= 2.0


def noisy_mse(noises, generator):
    """A diffusion-like loss: each row draws its own input noise; the draws are kept for checking."""

    def loss_fn(model, x, y):
        noise = torch.randn(x.shape, generator=generator)
        noises.append(noise)
        return (model(x + noise).squeeze(1) - y) ** 2

    return loss_fn


@pytest.mark.parametrize("mode", ["functorch", "hooks"])
def test_multiplicity_averages_draws_before_clipping(ctx, mode):
    k, (x, y) = 4, data(n=5)
    model, noises = mlp(), []
    engine = per_sample_gradients(model, noisy_mse(noises, torch.Generator().manual_seed(3)), [x, y], mode, k)
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(params, xi, yi, ni):
        return ((functional_call(model, params, (xi + ni)[None]).squeeze() - yi) ** 2)

    draws = noises[0].view(5, k, -1)  # row b * K + j is draw j of example b
    expected = [vmap(grad(single), in_dims=(None, 0, 0, 0))(params, x, y, draws[:, j]) for j in range(k)]
    for name, g in engine.items():
        mean = torch.stack([e[name] for e in expected]).mean(0)
        torch.testing.assert_close(g, mean, rtol=1e-5, atol=1e-7)


def test_multiplicity_costs_no_privacy(ctx):
    tensors = data()
    g = torch.Generator().manual_seed(0)
    one, l1 = train(mlp(), tensors, ctx, eps=2.0, steps=3, loss_fn=noisy_mse([], g))
    four, l4 = train(
        mlp(), tensors, ctx, eps=2.0, steps=3, loss_fn=noisy_mse([], g), multiplicity=4
    )
    assert one.mechanism == four.mechanism and l1.spent() == l4.spent()


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=10,
    )


def unet_loss(model, x, labels, t, noise):
    return ((model(x + noise, t, class_labels=labels).sample - noise) ** 2).flatten(1).mean(1)


def unet_batch(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, 1, 8, 8, generator=g), torch.arange(n), torch.rand(n, generator=g) * 100,
            torch.randn(n, 1, 8, 8, generator=g)]


def test_unet_per_sample_gradients_match_torch_func():
    model, batch = tiny_unet(), unet_batch()
    params = {n: p.detach() for n, p in model.named_parameters()}

    def single(params, *example):
        rows = [e[None] for e in example]
        return unet_loss(lambda *a, **kw: functional_call(model, params, a, kw), *rows).squeeze(0)

    reference = vmap(grad(single), in_dims=(None, 0, 0, 0, 0))(params, *batch)
    for mode in ("functorch", "hooks"):
        engine = per_sample_gradients(model, unet_loss, batch, mode)
        assert engine.keys() == reference.keys()
        for name, ref in reference.items():
            assert ref.abs().sum() > 0, name
            torch.testing.assert_close(engine[name], ref, rtol=1e-4, atol=1e-6, msg=f"{mode}: {name}")


def test_hooks_mode_trap_is_detected():
    # Opacus' hooks mode on its own: convolutions after attention get all-zero per-sample gradients.
    model, batch = tiny_unet(), unet_batch()
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    unet_loss(wrapped, *batch).sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    assert any(p.grad_sample.abs().sum() == 0 and p.grad.abs().sum() > 0 for p in params)
    with pytest.raises(PrivbenchError, match="functorch"):
        check_grad_samples(params)


def test_steps_taken_equal_steps_accounted(ctx):
    # q = 1/40: many logical batches are empty, yet each is a noisy, accounted step.
    tensors = data(n=40)
    result, ledger = train(mlp(), tensors, ctx, eps=2.0, logical_batch=1, epochs=1.0)
    assert result.steps == result.mechanism.steps == ledger.mechanisms[-1].steps == 40


@pytest.mark.parametrize("eps, logical", [(NO_PRIVACY, 16), (2.0, 32)])
def test_logical_batch_independent_of_physical_batch(ctx, eps, logical):
    # Poisson sampling (q = 1/2, no noise), or noise on (q = 1): noise is drawn once per logical step.
    tensors = data()
    runs = [
        train(mlp(), tensors, ctx, eps=eps, logical_batch=logical, physical_batch=pb, steps=3, clip_norm=0.1)[0]
        for pb in (4, 8, 32)
    ]
    for other in runs[1:]:
        torch.testing.assert_close(flat(other.model), flat(runs[0].model), rtol=0, atol=1e-6)


def test_ema_is_the_hand_computed_average(ctx):
    model = nn.Linear(1, 1, bias=False)
    nn.init.ones_(model.weight)
    x, y = torch.tensor([[1.0], [2.0]]), torch.zeros(2)
    # Loss (w x)^2, q = 1: w <- w - 0.1 * mean(2 w x^2) = w / 2, i.e. 1 -> 1/2 -> 1/4 -> 1/8.
    result, _ = train(model, [x, y], ctx, clip=False, steps=3, ema_decay=0.5)
    ema = 1.0
    for w in (0.5, 0.25, 0.125):
        ema = 0.5 * ema + 0.5 * w
    assert result.model.weight.item() == pytest.approx(0.125, rel=1e-6)
    assert result.ema.weight.item() == pytest.approx(ema, rel=1e-6)
    assert result.ema.weight.item() != result.model.weight.item()


def test_refuses_unsound_settings(ctx):
    tensors = data()
    with pytest.raises(PrivbenchError, match="ghost"):
        train(mlp(), tensors, ctx, eps=2.0, grad_sample_mode="ghost", multiplicity=2)
    with pytest.raises(PrivbenchError, match="eps = inf"):
        train(mlp(), tensors, ctx, eps=2.0, clip=False)
    with pytest.raises(PrivbenchError, match="BatchNorm"):
        train(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)), tensors, ctx)


def test_the_phase_gives_adam_its_betas_and_refuses_them_for_sgd(tmp_path):
    ctx = RunContext(tmp_path, tmp_path, torch.device("cpu"), 0, progress=False)
    data = [torch.randn(20, 5), torch.randn(20, 1)]
    with DPSGDPhase(nn.Linear(5, 1), data, PrivacyLedger(5.0, 1e-5), ctx, logical_batch=10, steps=1, lr=0.1,
                    betas=(0.0, 0.9)) as phase:
        assert phase.optimizer.original_optimizer.param_groups[0]["betas"] == (0.0, 0.9)
        for batch in phase.logical_batches():
            phase.step(lambda m, x, y: ((m(x) - y) ** 2).squeeze(1), batch)
    with pytest.raises(PrivbenchError, match="plain SGD has none"):
        DPSGDPhase(nn.Linear(5, 1), data, PrivacyLedger(5.0, 1e-5), ctx, logical_batch=10, steps=1, lr=0.1,
                   optimizer="sgd", betas=(0.0, 0.9))


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_frozen_lends_the_model_to_post_processing_without_touching_the_private_step(tmp_path, mode):
    torch.manual_seed(0)
    ctx = RunContext(tmp_path, tmp_path, torch.device("cpu"), 0, progress=False)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 1))
    data = [torch.randn(30, 5), torch.randn(30, 1)]
    with DPSGDPhase(model, data, PrivacyLedger(5.0, 1e-5), ctx, logical_batch=10, physical_batch=4, steps=3, lr=0.1,
                    grad_sample_mode=mode) as phase:
        for batch in phase.logical_batches():
            phase.step(lambda m, x, y: ((m(x) - y) ** 2).squeeze(1), batch)
            held = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
            x = torch.randn(7, 5, requires_grad=True)
            with phase.frozen() as frozen:
                frozen(x).sum().backward()  # e.g. a generator's loss through a discriminator
            assert x.grad is not None and x.grad.abs().sum() > 0
            assert all(torch.equal(w, p) and torch.equal(g, p.grad) for (w, g), p in zip(held, model.parameters()))
    assert phase.taken == 3 and all(p.requires_grad for p in model.parameters())
