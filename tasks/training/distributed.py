"""The process group of a data-parallel training run (`tasks.training.train_launch` starts one under torchrun).

``torchrun`` (``python -m torch.distributed.run``) starts one training process per device and tells each its
``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in the environment; `Distributed.from_env` joins that group (NCCL
on CUDA, gloo on the CPU) and gives each process its device. Without those variables training runs as one
process, with no process group at all.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# Long enough for rank 0 to validate and checkpoint while the others wait at the barrier.
TIMEOUT = timedelta(minutes=60)


@dataclass(frozen=True)
class Distributed:
    """This process's place in the run: ``rank`` of ``world_size`` processes, and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """The process that writes (logs, checkpoints, ``final/``) and validates."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, device: torch.device) -> Distributed:
        """Joins the group torchrun described in the environment (one process when it did not).

        Args:
            device: The run's device (`tasks.training.train.resolve_device`); a CUDA run takes ``cuda:LOCAL_RANK``.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls(device=device)
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
        return cls(rank=rank, world_size=world_size, device=device)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the processes (itself for one process); ``tensor`` is left unchanged."""
        if not self.active:
            return tensor
        out = tensor.to(self.device if self.device.type == "cuda" else "cpu").clone()
        dist.all_reduce(out)
        return out.to(tensor.device)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()
