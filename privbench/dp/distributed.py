"""Data-parallel training over several processes (`torchrun`): DP-SGD with exactly the privacy of one process.

The members are dealt once into W disjoint shards by a seeded permutation every rank draws alike. At
each logical step every rank Poisson-samples its own shard at the same rate q, so each member is
still included independently with probability q: the union of the local batches is the Poisson
batch of one process, and the ledger's subsampled Gaussian mechanism (sigma, q, steps) is unchanged.
Each rank clips and sums its examples' gradients; rank 0 alone adds N(0, sigma^2 C^2) (Opacus'
DistributedDPOptimizer); the sums are all-reduced and divided by the expected logical batch. Noise is
added once per step, not W times.

Opacus' own DistributedUniformWithReplacementSampler skips a rank's empty local batch. That rank
would then take fewer noisy steps than the ledger accounts and leave the others waiting in the
all-reduce, so the sampler here yields every step, empty or not.

Non-private public pre-training is data-parallel too (`replicate`, used by
privbench.diffusion.edm.train_plain): every rank draws the same global batch and trains on its share
under DDP. Random draws that must be independent between ranks (Poisson inclusion, per-example
diffusion noise) come from streams named per rank (`per_rank`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

from privbench.errors import PrivbenchError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the data-parallel processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 writes run directories, caches' results and the database; the others only train."""
        return self.rank == 0


def current_world() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group torchrun describes in the environment (WORLD_SIZE, RANK, MASTER_ADDR...).

    Without torchrun (WORLD_SIZE unset or 1) nothing happens. CUDA ranks use NCCL, each on the GPU of
    its LOCAL_RANK; CPU ranks use gloo. Returns the world and the device this rank computes on.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    if not dist.is_initialized():
        missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
        if missing:
            raise PrivbenchError(f"WORLD_SIZE={size} but {', '.join(missing)} unset: launch with torchrun --nproc_per_node N")
        # Ranks other than 0 wait at a barrier while rank 0 samples and evaluates, which can take
        # hours at the paper preset: the default 10-30 minute collective timeout would kill them.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=24))
    world = current_world()
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return world, device


def per_rank(stream: str) -> str:
    """The name of a random stream whose draws must differ between ranks (Poisson inclusion, the
    per-example diffusion noise): `stream` itself in one process, so single-process runs keep their draws."""
    world = current_world()
    return stream if world.size == 1 else f"{stream}-rank{world.rank}"


def replicate(model: nn.Module) -> nn.Module:
    """`model` under DistributedDataParallel when there are several ranks, else `model` itself.

    For non-private training (public pre-training): DDP gives every replica rank 0's weights and
    averages the gradients over ranks during the backward, so with equal local batches a step equals
    one process's step on their union. DP-SGD does not use it: Opacus clips per example before any
    averaging (train_dp_sgd).
    """
    if current_world().size == 1:
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def from_rank0(value: T) -> T:
    """Rank 0's `value` (any picklable object), on every rank: ranks that read shared state (the
    database, a cache) at different moments must still take the same branch around a collective."""
    if current_world().size == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def broadcast_parameters(model: nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers, so that all replicas start identical."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)


class ShardedPoissonSampler(Sampler[list[int]]):
    """Each of `steps` local batches: every index of this rank's shard, independently with rate q.

    `shard_generator` must be seeded alike on every rank (the shards must partition the members);
    `generator` must differ between ranks (independent inclusion decisions).
    """

    def __init__(self, n: int, sample_rate: float, steps: int, world: World,
                 shard_generator: torch.Generator, generator: torch.Generator):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate}")
        self.shard = torch.randperm(n, generator=shard_generator)[world.rank :: world.size]
        self.sample_rate, self.steps, self.generator = sample_rate, steps, generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            mask = torch.rand(len(self.shard), generator=self.generator) < self.sample_rate
            yield self.shard[mask].tolist()
