"""torch.distributed set-up: one process (plain), or torchrun with DDP / FSDP2 (``fully_shard``).

gloo on CPU, NCCL on CUDA. Nothing home-made: the wrappers are torch's own.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = (device == "cuda") or (device is None and torch.cuda.is_available())
    dev = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev)


def wrap_model(model: nn.Module, mode: str, env: DistEnv) -> nn.Module:
    """``none`` | ``ddp`` | ``fsdp`` (FSDP2: each decoder layer, the vision tower, then the root)."""
    if mode == "none" or not env.enabled:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # shard the modules whose forward is called: CA blocks and decoder layers; SigLIP's embeddings
        # and encoder layers (we call them directly to read the pre-post_layernorm hidden states)
        layers = getattr(getattr(model, "language_model", None), "layers", None)
        for layer in layers or []:
            if getattr(layer, "cross_attn", None) is not None:
                fully_shard(layer.cross_attn)
            fully_shard(layer)
        tower = getattr(model, "vision_tower", None) or getattr(model, "tower", None)
        if tower is not None:
            fully_shard(tower.embeddings)
            for layer in tower.encoder.layers:
                fully_shard(layer)
        fully_shard(model)
        return model
    raise ValueError(f"distributed must be none, ddp or fsdp, got {mode!r}")


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(value: float | int, env: DistEnv) -> float:
    if not env.enabled:
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def cleanup(env: DistEnv) -> None:
    if env.enabled and dist.is_initialized():
        dist.destroy_process_group()
