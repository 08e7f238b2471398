"""The device mesh: ("dp", "tp"), or ("dp_replicate", "dp_shard", "tp") for hybrid sharding.

Tensor parallelism is the innermost (fastest-varying) dimension, so that a tp group is
the GPUs of one node. A hybrid mesh also gets a flattened "dp" dimension (all data-
parallel ranks), so `dp_mesh(mesh)` always names the ranks that see different data.

Every check here runs before any collective, on every rank alike, so a bad shape ends
all ranks with the same message instead of a hang."""

import os
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(device_type_: Optional[str] = None) -> torch.device:
    """This rank's device: the current CUDA device (set from LOCAL_RANK), or the CPU."""
    kind = device_type_ or device_type()
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def init_distributed() -> None:
    """Join torchrun's process group: NCCL on GPUs, gloo on CPU."""
    if dist.is_initialized():
        return
    if device_type() == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    backend = "nccl" if device_type() == "cuda" else "gloo"
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend)
        return
    # After a torchrun restart the agent's store still holds the dead workers' addresses
    # under the same keys; a fresh prefix per attempt keeps the new ranks off them.
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend=backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank, world_size=world_size
    )


def default_tp() -> int:
    """Tensor parallelism inside a node: the GPUs of one node (torchrun's LOCAL_WORLD_SIZE).
    On CPU there is no fast intra-node link to exploit, so every rank does data parallelism."""
    if device_type() == "cuda":
        return int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    return 1


def mesh_shape(world_size: int, tp: int, dp_replicate: int = 1, hybrid: Optional[bool] = None) -> dict:
    """Mesh dimension name -> size, checked. `hybrid` (default: dp_replicate > 1) asks for the
    3-D hybrid-sharding mesh even when dp_replicate is 1."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world_size} (nodes x processes per node)")
    dp = world_size // tp
    if dp_replicate < 1 or dp % dp_replicate:
        raise ValueError(
            f"--dp-replicate {dp_replicate} must divide the data-parallel size {dp} (= world {world_size} / tp {tp})"
        )
    if hybrid is None:
        hybrid = dp_replicate > 1
    if hybrid:
        return {"dp_replicate": dp_replicate, "dp_shard": dp // dp_replicate, "tp": tp}
    if dp_replicate > 1:
        raise ValueError(f"--dp-replicate {dp_replicate} needs the hybrid mesh; pass hybrid=True or leave it at 1")
    return {"dp": dp, "tp": tp}


def build_mesh(
    tp: Optional[int] = None,
    dp_replicate: int = 1,
    world_size: Optional[int] = None,
    hybrid: Optional[bool] = None,
    device: Optional[str] = None,
) -> DeviceMesh:
    """The mesh over all ranks of the (already initialised) default process group.
    tp=None: `default_tp()`; device: "cuda" or "cpu" (default: what this machine has)."""
    actual = dist.get_world_size()
    world_size = world_size or actual
    if world_size != actual:
        raise ValueError(f"world size {world_size} was asked for, but the process group has {actual} ranks")
    shape = mesh_shape(world_size, default_tp() if tp is None else tp, dp_replicate, hybrid)
    mesh = init_device_mesh(device or device_type(), tuple(shape.values()), mesh_dim_names=tuple(shape))
    if "dp_replicate" in shape:
        dp_mesh(mesh)  # create the flattened group now, on every rank together
    return mesh


def is_hybrid(mesh: DeviceMesh) -> bool:
    return "dp_replicate" in mesh.mesh_dim_names


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All data-parallel ranks as one 1-D mesh (flattened on a hybrid mesh; DeviceMesh
    caches the flattened mesh, so this creates its process group once)."""
    if is_hybrid(mesh):
        return mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh["dp"]


def tp_mesh(mesh: DeviceMesh) -> Optional[DeviceMesh]:
    """The mesh to build the model with: None without tensor parallelism, so that a tp=1 run
    has plain parameters and no size-1 collectives."""
    return mesh["tp"] if mesh["tp"].size() > 1 else None


def dp_size(mesh: DeviceMesh) -> int:
    return dp_mesh(mesh).size()


def dp_rank(mesh: DeviceMesh) -> int:
    return dp_mesh(mesh).get_local_rank()
