"""Scale-out on torch.distributed: W processes (torchrun) compute what one process computes.

A `Group` is this process's place in the run (rank, world size, device) plus the few collectives
the core needs. It is passed explicitly to `train_experts`, `Distiller` and `evaluate_set`; the
default `SINGLE` is one process with no process group, so nothing changes without torchrun.

How the work splits (each module says why its split gives the one-process result):
* experts: round-robin (rank r trains the r-th, (r + W)-th, ... missing expert); an expert's
  seeds come from its index, so its file is the same bytes for any W;
* distillation: every unrolled step's mini-batch is cut into W contiguous parts and the gradient
  is summed across ranks (datm/matching.py); every rank holds the whole state;
* evaluation: model k trains on rank k % W; the accuracies are gathered in model order.

The only global state is what `init_from_env` sets for the process: torch.distributed's default
process group (ended by `Group.close`), the intra-op thread count and the current CUDA device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")

# A collective waits at most this long for the other ranks: a rank that died (or hangs) makes
# the others fail instead of waiting forever. It must also cover the longest honest wait: at the
# end of the experts a rank may wait for another's last expert, and during distillation with
# selection the ranks wait for the slowest evaluation model.
DEFAULT_TIMEOUT_S = 1800.0


class DistributedError(UserError):
    """Ranks that disagree (e.g. resumed from different checkpoints); the message is for a user."""


@dataclass(frozen=True)
class Group:
    """This process's rank among `world` processes, and the collectives the core uses.

    With world == 1 every collective is the identity and no process group needs to exist.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0          # rank among the processes of this machine
    local_world: int = 1         # processes on this machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes shared files and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> Sequence[T]:
        return shard(items, self.rank, self.world)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks IN PLACE and return it; the identity for one process.

        The sum's bits are the same on every rank (ring all-reduce copies each reduced chunk),
        so state updated from it stays bit-identical across ranks.
        """
        if self.world > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[world, *shape]: every rank's `tensor`, in rank order, on every rank.

        A sum of one value and zeros is exact, so the values arrive bit for bit (gloo has no
        all_gather_into_tensor on every build; all_reduce exists everywhere).
        """
        out = torch.zeros((self.world, *tensor.shape), dtype=tensor.dtype, device=self.device)
        out[self.rank] = tensor.to(self.device)
        return self.all_reduce_sum(out)

    def gather_floats(self, mine: Mapping[int, float], n: int) -> list[float]:
        """Values 0..n-1, each computed by exactly one rank (`mine`), on every rank in order."""
        t = torch.zeros(n, dtype=torch.float64, device=self.device)
        for i, value in mine.items():
            t[i] = value
        return self.all_reduce_sum(t).tolist()

    def check_same(self, what: str, values: torch.Tensor) -> None:
        """Raise DistributedError unless every rank holds the same `values` (NaN equals NaN).

        Cheap insurance that the ranks compute one run: a rank resumed from another checkpoint,
        or drifted, would otherwise silently mix two runs in every all-reduce.
        """
        if self.world == 1:
            return
        values = values.detach().to(torch.float64).flatten()
        every = self.all_gather(values)
        same = (every == values) | (every.isnan() & values.isnan())
        if not bool(same.all()):
            raise DistributedError(
                f"the {self.world} ranks disagree on {what} (rank {self.rank}: "
                f"{values.tolist()}, all: {every.tolist()}): every machine must start from the "
                "same artifacts (experts, checkpoint)")

    def barrier(self) -> None:
        """Wait for every rank (an all-reduce, so it obeys the timeout on NCCL and gloo alike)."""
        self.all_reduce_sum(torch.zeros(1, device=self.device))

    def close(self) -> None:
        """End the process group, if this process made one."""
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


SINGLE = Group()  # one process, no process group: the default everywhere


def shard(items: Sequence[T], rank: int, world: int) -> Sequence[T]:
    """Items rank, rank + W, rank + 2W, ...: round-robin, for units of work named by an index."""
    return items[rank::world]


def shard_range(n: int, rank: int, world: int) -> slice:
    """Rank's contiguous part of n items; parts differ in size by at most one, may be empty."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def launched(env: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun (or anything that sets its variables) started this process."""
    return "RANK" in env and "WORLD_SIZE" in env


def cores() -> int:
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_from_env(device: torch.device | str = "cpu", backend: str | None = None,
                  timeout_s: float = DEFAULT_TIMEOUT_S, threads: int = 0,
                  env: Mapping[str, str] = os.environ) -> Group:
    """This process's Group, from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT); without them one process (rank 0 of 1, no
    process group) on `device`. `env` is read for the ranks (tests pass their own); the process
    group itself reads MASTER_ADDR / MASTER_PORT (or torchrun's store) from os.environ.

    * device: a CUDA device becomes cuda:LOCAL_RANK (one GPU per process); the backend is then
      NCCL, else gloo, unless `backend` says otherwise.
    * timeout_s: how long a collective waits for the other ranks (see DEFAULT_TIMEOUT_S).
      gloo fails a collective when it passes (or at once when a peer's connection closes); NCCL's
      watchdog aborts the process.
    * threads: intra-op threads of this process; 0 means OMP_NUM_THREADS if set, else this
      machine's cores shared among its processes. Note torchrun itself sets OMP_NUM_THREADS=1
      when it starts several processes per machine and the variable is unset.
    """
    device = torch.device(device)
    if not launched(env):
        if threads:
            torch.set_num_threads(threads)
        return Group(device=device)
    rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", "1"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if threads or "OMP_NUM_THREADS" not in env:
        torch.set_num_threads(threads or max(1, cores() // local_world))
    group = Group(rank, world, local_rank, local_world, device)
    if world > 1:
        dist.init_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"),
                                init_method="env://", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return group
