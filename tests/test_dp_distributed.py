"""Data-parallel training: two gloo processes on CPU train like one process (DP-SGD and public
pre-training), add noise once, and take every step the ledger accounts."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from privbench.privacy import PrivacyConfig
from privbench.context import RunContext
from privbench.dp import Mechanism, PrivacyLedger, release_gaussian
from privbench.diffusion.edm import train_plain
from privbench.dp.distributed import ShardedPoissonSampler, World, current_world, per_rank
from privbench.dp.sgd import train_dp_sgd
from privbench.errors import PrivbenchError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 1))


def data(n):
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 4, generator=g), torch.randn(n, generator=g)]


def mse(model, x, y):
    return (model(x).squeeze(1) - y) ** 2


def zero_loss(model, x):
    return 0 * model(x).sum(1)  # zero gradient: the update is the noise alone


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def scenarios(tmp):
    """Each scenario: (name, function of a run context returning what to compare)."""
    ctx = RunContext(tmp, tmp, torch.device("cpu"), seed=3, progress=False)

    def clipped_full_batch():
        # q = 1: both ranks together see every member, as one process does; no noise; clipping binds.
        ledger = PrivacyLedger(math.inf, 1e-5)
        result = train_dp_sgd(mlp(), mse, data(16), ledger, ctx, logical_batch=16, physical_batch=3, steps=3,
                              clip_norm=0.05, lr=0.5, optimizer="sgd")
        return flat(result.model)

    def clipped_full_batch_bookkeeping():
        ledger = PrivacyLedger(math.inf, 1e-5)
        result = train_dp_sgd(mlp(), mse, data(16), ledger, ctx, logical_batch=16, physical_batch=3, steps=3,
                              clip_norm=0.05, lr=0.5, optimizer="sgd", grad_sample_mode="bookkeeping")
        return flat(result.model)

    def pure_noise():
        torch.manual_seed(0)
        model = nn.Linear(200, 200, bias=False)
        before = flat(model)
        ledger = PrivacyLedger(3.0, 1e-5, accountant="rdp")
        result = train_dp_sgd(model, zero_loss, [torch.randn(64, 200)], ledger, ctx, logical_batch=64,
                              physical_batch=64, steps=1, clip_norm=0.5, lr=1.0, optimizer="sgd")
        return flat(result.model) - before, result.mechanism.noise_std

    def sparse_batches():
        # q = 1/8 over 8 members: most local batches are empty; every rank must still step each time.
        ledger = PrivacyLedger(8.0, 1e-5, accountant="rdp")
        result = train_dp_sgd(mlp(), mse, data(8), ledger, ctx, logical_batch=1, physical_batch=2, steps=12,
                              lr=0.1, optimizer="sgd")
        return result.steps, result.mechanism.steps, result.mechanism.noise_multiplier, flat(result.model)

    def pretraining():
        # Non-private: each rank takes its half of the same global batch of 8 under DDP.
        rows = []

        def counted_mse(model, x, y):
            rows.append(len(x))
            return mse(model, x, y)

        model, ema = train_plain(mlp(), counted_mse, data(16), steps=4, batch_size=8, lr=0.05,
                                 generator=torch.Generator().manual_seed(2), ema_decay=0.5)
        return flat(model), flat(ema), rows

    def os_release():
        # Noise from the OS: each rank draws its own, and every rank must receive rank 0's release.
        os_ctx = RunContext(tmp, tmp, torch.device("cpu"), seed=3, progress=False, privacy=PrivacyConfig("os"))
        mechanism = Mechanism("counts", "gaussian", 1.0)
        return release_gaussian(PrivacyLedger(10.0, 1e-5, "rdp"), mechanism, torch.zeros(50),
                                os_ctx.mechanism_generator("counts"))

    def uneven_pretraining_batch():
        try:
            train_plain(mlp(), mse, data(16), steps=1, batch_size=7, lr=0.05)
        except PrivbenchError as error:
            return str(error)
        return "trained"

    return {"clipped_full_batch": clipped_full_batch, "clipped_full_batch_bookkeeping": clipped_full_batch_bookkeeping,
            "pure_noise": pure_noise, "sparse_batches": sparse_batches, "os_release": os_release,
            "pretraining": pretraining, "uneven_pretraining_batch": uneven_pretraining_batch,
            "diffusion_draws": lambda: per_rank("draws")}


def _worker(rank, size, init_file, tmp, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=size)
    try:
        torch.set_num_threads(1)
        assert current_world() == World(rank, size, rank)
        results[rank] = {name: run() for name, run in scenarios(tmp).items()}
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """The scenarios in one process and in two gloo processes (spawned once for all tests)."""
    tmp = tmp_path_factory.mktemp("ddp")
    single = {name: run() for name, run in scenarios(tmp).items()}
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(2, str(tmp / "init"), tmp, results), nprocs=2, join=True)
        ranks = [results[0], results[1]]
    return single, ranks


def test_two_processes_train_like_one(outcomes):
    single, ranks = outcomes
    for rank in ranks:
        for mode in ("clipped_full_batch", "clipped_full_batch_bookkeeping"):  # Opacus' per-sample and book-keeping
            torch.testing.assert_close(rank[mode], single[mode], rtol=0, atol=1e-6)
    torch.testing.assert_close(single["clipped_full_batch_bookkeeping"], single["clipped_full_batch"], rtol=0, atol=1e-6)


def test_noise_is_added_once(outcomes):
    single, ranks = outcomes
    (update0, noise_std), (update1, _) = ranks[0]["pure_noise"], ranks[1]["pure_noise"]
    torch.testing.assert_close(update0, update1, rtol=0, atol=0)  # the replicas stay identical
    assert noise_std == single["pure_noise"][1]
    # One draw of N(0, (sigma C)^2) over the logical batch of 64; noise on both ranks would be sqrt(2) more.
    assert update0.std().item() == pytest.approx(noise_std / 64, rel=0.03)


def test_every_rank_takes_every_accounted_step(outcomes):
    single, ranks = outcomes
    for rank in ranks:
        taken, accounted, sigma, params = rank["sparse_batches"]
        assert taken == accounted == 12
        assert sigma == single["sparse_batches"][2]  # the ledger's mechanism does not depend on the world
    torch.testing.assert_close(ranks[0]["sparse_batches"][3], ranks[1]["sparse_batches"][3], rtol=0, atol=0)


def test_pretraining_splits_each_batch_and_trains_like_one(outcomes):
    single, ranks = outcomes
    for rank in ranks:
        for got, want in zip(rank["pretraining"][:2], single["pretraining"][:2]):  # the model and its EMA
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert rank["pretraining"][2] == [4] * 4  # each rank computes half of every batch
    assert single["pretraining"][2] == [8] * 4
    assert single["uneven_pretraining_batch"] == "trained"
    assert all("multiple of 2" in rank["uneven_pretraining_batch"] for rank in ranks)


def test_diffusion_noise_streams_differ_between_ranks_only(outcomes):
    single, ranks = outcomes
    assert single["diffusion_draws"] == "draws"  # one process keeps its draws
    assert ranks[0]["diffusion_draws"] != ranks[1]["diffusion_draws"]


def test_a_release_with_noise_from_the_os_is_made_once_by_rank_0(outcomes):
    single, ranks = outcomes
    assert torch.equal(ranks[0]["os_release"], ranks[1]["os_release"])
    assert not torch.equal(ranks[0]["os_release"], single["os_release"])  # fresh noise, not the seed's


def test_shards_partition_members_and_sample_at_rate_q():
    n, q, steps = 50, 0.2, 4000
    ranks = [World(r, 2, r) for r in range(2)]
    samplers = [ShardedPoissonSampler(n, q, steps, w, torch.Generator().manual_seed(5),
                                      torch.Generator().manual_seed(10 + w.rank)) for w in ranks]
    shards = [set(s.shard.tolist()) for s in samplers]
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(n))
    counts = torch.zeros(n)
    batches = [b for s in samplers for b in s]
    assert len(batches) == 2 * steps and any(len(b) == 0 for b in ShardedPoissonSampler(
        n, 0.01, 50, ranks[0], torch.Generator().manual_seed(5), torch.Generator()))
    for b in batches:
        counts[b] += 1
    # Every member is included independently with probability q (binomial std over 4000 steps: 0.0063).
    assert counts.div(steps).sub(q).abs().max().item() < 0.03


def test_privbench_run_under_torchrun_records_one_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m privbench.cli run` on CPU (gloo): one run, written by rank 0."""
    import os
    import shutil
    import subprocess
    import sys

    from privbench.store import Store

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    tiny = ["params.unet.base_channels=8", "params.dp.logical_batch=32", "params.dp.physical_batch=32",
            "params.dp.epochs=0.06", "params.sampler.steps=2", "params.sampler.batch_size=16", "eval.samples=40",
            "eval.fid_samples=8", "eval.fid_reference=8", "eval.ca_epochs=1", "eval.ca_classifiers=[cnn]"]
    tiny += ["params.pretrain.steps=2", "params.pretrain.batch_size=8"]
    command = [torchrun, "--nproc_per_node", "2", "-m", "privbench.cli", "run", "--method", "pdp-diffusion", "--eps", "10",
               "--device", "cpu", "--no-audit", "--quiet", "--out", str(tmp_path)]
    done = subprocess.run(command + [a for s in tiny for a in ("--set", s)], capture_output=True, text=True,
                          env=os.environ | {"OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| pdp-diffusion") == 1  # rank 0 alone prints the leaderboard
    runs = Store(tmp_path).runs()
    assert len(runs) == 1 and runs.iloc[0]["device"] == "cpu x2"
    assert 9.9 <= runs.iloc[0]["epsilon"] <= 10.0
    log = next((tmp_path / "runs").glob("*/log.txt")).read_text()
    assert "3 steps, clip 1, 2 process(es)" in log and "in 2 process(es), cached" in log
