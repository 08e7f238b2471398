"""The device mesh: ("dp", "tp"), or ("dp_replicate", "dp_shard", "tp") for hybrid sharding.

Tensor parallelism is the innermost (fastest-varying) dimension, so that a tp group is
the GPUs of one node. Every check here runs before any collective, on every rank
alike, so a bad shape ends all ranks with the same message instead of a hang."""

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def init_distributed() -> None:
    """Join torchrun's process group: NCCL on GPUs, gloo on CPU."""
    if dist.is_initialized():
        return
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend="nccl" if device_type() == "cuda" else "gloo")


def mesh_shape(world_size: int, tp: int, dp_replicate: int = 1) -> dict:
    """Mesh dimension name -> size, checked."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world_size} (nodes x processes per node)")
    dp = world_size // tp
    if dp_replicate < 1 or dp % dp_replicate:
        raise ValueError(f"--dp-replicate {dp_replicate} must divide the data-parallel size {dp} (= world {world_size} / tp {tp})")
    if dp_replicate > 1:
        return {"dp_replicate": dp_replicate, "dp_shard": dp // dp_replicate, "tp": tp}
    return {"dp": dp, "tp": tp}


def build_mesh(tp: int, dp_replicate: int = 1, world_size: Optional[int] = None) -> DeviceMesh:
    world_size = world_size or dist.get_world_size()
    shape = mesh_shape(world_size, tp, dp_replicate)
    return init_device_mesh(device_type(), tuple(shape.values()), mesh_dim_names=tuple(shape))
