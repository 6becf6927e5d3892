"""torch.distributed process groups as torchrun sets them up, for every stage that shards work:
training (DDP, FSDP2), archive generation and evaluation. Below every subpackage in the data flow."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str, *, always: bool = False) -> Dist:
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: join the process group (NCCL on CUDA, gloo on CPU).
    A single process joins one only with `always` (FSDP2 needs a group even of one)."""
    if "WORLD_SIZE" not in os.environ or (int(os.environ["WORLD_SIZE"]) == 1 and not always):
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(d: Dist) -> None:
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()
