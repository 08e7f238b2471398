"""The device mesh: ("pp", "dp", "cp", "tp"), with "dp" split into ("dp_replicate",
"dp_shard") for hybrid sharding. "pp" and "cp" exist only when larger than 1: a 2-D run
has the ("dp", "tp") mesh, its groups, names and checkpoints, and nothing else.

Tensor parallelism is the innermost (fastest-varying) dimension, so that a tp group is
the GPUs of one node; context parallelism next (its K/V all-gathers are the next
heaviest traffic), then data parallelism, and pipeline stages outermost (they exchange
one activation per micro-batch, the lightest traffic, so they may cross the slowest
links). A hybrid mesh also gets a flattened "dp" dimension (all data-parallel ranks),
so `dp_mesh(mesh)` always names the ranks that see different data.

Every check here runs before any collective, on every rank alike, so a bad shape ends
all ranks with the same message instead of a hang."""

import datetime
import os
import sys
import warnings
from typing import NoReturn, Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device(device_type_: Optional[str] = None) -> torch.device:
    """This rank's device: the current CUDA device (set by `init_distributed`), or the CPU."""
    kind = device_type_ or device_type()
    return torch.device("cuda", torch.cuda.current_device()) if kind == "cuda" else torch.device(kind)


def local_rank() -> int:
    """This process's index on its node: torchrun's LOCAL_RANK, else Slurm's SLURM_LOCALID
    (tasks started by srun without torchrun), else 0."""
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if os.environ.get(name):
            return int(os.environ[name])
    return 0


def cuda_device_for_rank() -> torch.device:
    """The GPU this process drives. Modulo the visible devices: when the launcher gives each
    task only its own GPU (Slurm's --gpus-per-task), every local rank sees one device, 0."""
    count = torch.cuda.device_count()
    if count == 0:
        raise RuntimeError("CUDA is available but no GPU is visible to this process; check CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", local_rank() % count)


def gpus_per_node() -> int:
    """Processes per node as torchrun counts them (LOCAL_WORLD_SIZE), else the visible GPUs."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return int(os.environ["LOCAL_WORLD_SIZE"])
    return torch.cuda.device_count()


def warn_if_tp_crosses_nodes(tp: int, per_node: int) -> bool:
    """Warn (and return True) when some tp group spans two nodes: its all-reduces, two per
    block forward and two backward, would then cross the network instead of NVLink."""
    if per_node < 1 or (tp <= per_node and per_node % tp == 0):
        return False
    warnings.warn(
        f"--tp {tp} puts tensor-parallel groups across nodes of {per_node} GPUs, so their all-reduces "
        f"cross the network; use a --tp that divides {per_node} and let FSDP span the nodes",
        stacklevel=2,
    )
    return True


def init_distributed(timeout: Optional[datetime.timedelta] = None) -> None:
    """Join torchrun's process group: NCCL on GPUs, gloo on CPU. timeout: how long a
    collective may wait before the job fails (default: torch's)."""
    if dist.is_initialized():
        return
    backend = "nccl" if device_type() == "cuda" else "gloo"
    options = {} if timeout is None else {"timeout": timeout}
    if device_type() == "cuda":
        device = cuda_device_for_rank()
        torch.cuda.set_device(device)
        # binds the NCCL communicators to this GPU now, instead of guessing it from the rank
        # at the first collective (and warning that the guess may hang)
        options["device_id"] = device
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend=backend, **options)
        return
    # After a torchrun restart the agent's store still holds the dead workers' addresses
    # under the same keys; a fresh prefix per attempt keeps the new ranks off them.
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(
        backend=backend,
        store=dist.PrefixStore(f"attempt_{attempt}", store),
        rank=rank,
        world_size=world_size,
        **options,
    )


def exit_without_teardown(code: int) -> NoReturn:
    """End a torchrun worker with `code` once its work is done, skipping the interpreter's
    teardown. A gloo worker thread may drop the last reference to a finished collective's
    tensors a moment after the main thread has moved on; if that happens while the
    interpreter is shutting down, the thread cannot take the GIL, glibc unwinds it, and the
    process aborts ("terminate called without an active exception", pytorch/pytorch#38228)
    after a run that succeeded. multiprocessing ends its children the same way. The caller
    closes its files and joins its threads first: nothing else runs after this."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def default_tp(world_size: Optional[int] = None) -> int:
    """Tensor parallelism inside a node: the GPUs of one node (torchrun's LOCAL_WORLD_SIZE).
    On CPU, 2 when it divides the world (default: the process group's size, else 1), so
    that the CPU demo runs both dimensions (4 processes: a 2x2 mesh); there is no fast
    intra-node link that a larger tp would exploit. This is build_mesh's default, which
    knows no model: on GPUs train.py takes the smallest tp whose plan fits the GPU's memory
    instead (parallel.plan.choose_tp), tp 1 for models up to 8B on 80 GB GPUs."""
    if device_type() == "cuda":
        return int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count()))
    if world_size is None:
        world_size = dist.get_world_size() if dist.is_initialized() else 1
    return 2 if world_size % 2 == 0 else 1


def mesh_shape(
    world_size: int, tp: int, dp_replicate: int = 1, hybrid: Optional[bool] = None, cp: int = 1, pp: int = 1
) -> dict:
    """Mesh dimension name -> size, outermost first, checked. `hybrid` (default:
    dp_replicate > 1) asks for the hybrid-sharding dims even when dp_replicate is 1."""
    if tp < 1 or world_size % tp:
        raise ValueError(f"--tp {tp} must divide the world size {world_size} (nodes x processes per node)")
    for flag, size in (("--cp", cp), ("--pp", pp)):
        if size < 1:
            raise ValueError(f"{flag} {size} must be 1 or more")
    if world_size % (tp * cp * pp):
        raise ValueError(
            f"--pp {pp} x --cp {cp} x --tp {tp} = {pp * cp * tp} must divide the world size {world_size}; "
            "the rest of the ranks are data-parallel"
        )
    dp = world_size // (tp * cp * pp)
    if dp_replicate < 1 or dp % dp_replicate:
        raise ValueError(
            f"--dp-replicate {dp_replicate} must divide the data-parallel size {dp} "
            f"(= world {world_size} / (pp {pp} x cp {cp} x tp {tp}))"
        )
    if hybrid is None:
        hybrid = dp_replicate > 1
    if not hybrid and dp_replicate > 1:
        raise ValueError(f"--dp-replicate {dp_replicate} needs the hybrid mesh; pass hybrid=True or leave it at 1")
    shape = {"pp": pp} if pp > 1 else {}
    shape.update({"dp_replicate": dp_replicate, "dp_shard": dp // dp_replicate} if hybrid else {"dp": dp})
    if cp > 1:
        shape["cp"] = cp
    shape["tp"] = tp
    return shape


def build_mesh(
    tp: Optional[int] = None,
    dp_replicate: int = 1,
    world_size: Optional[int] = None,
    hybrid: Optional[bool] = None,
    device: Optional[str] = None,
    cp: int = 1,
    pp: int = 1,
) -> DeviceMesh:
    """The mesh over all ranks of the (already initialised) default process group.
    tp=None: `default_tp(world_size / (cp * pp))`; device: "cuda" or "cpu" (default: what
    this machine has)."""
    actual = dist.get_world_size()
    world_size = world_size or actual
    if world_size != actual:
        raise ValueError(f"world size {world_size} was asked for, but the process group has {actual} ranks")
    if tp is None:
        tp = default_tp(world_size // (cp * pp) if cp * pp and world_size % (cp * pp) == 0 else world_size)
    shape = mesh_shape(world_size, tp, dp_replicate, hybrid, cp, pp)
    mesh = init_device_mesh(device or device_type(), tuple(shape.values()), mesh_dim_names=tuple(shape))
    # the flattened groups, created now on every rank together (DeviceMesh caches them)
    if "dp_replicate" in shape:
        dp_mesh(mesh)
    if "cp" in shape:
        dp_cp_mesh(mesh)
    batch_mesh(mesh)
    return mesh


def is_hybrid(mesh: DeviceMesh) -> bool:
    return "dp_replicate" in mesh.mesh_dim_names


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """All data-parallel ranks as one 1-D mesh (flattened on a hybrid mesh; DeviceMesh
    caches the flattened mesh, so this creates its process group once)."""
    if is_hybrid(mesh):
        return mesh["dp_replicate", "dp_shard"]._flatten("dp")
    return mesh["dp"]


def dp_cp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks FSDP shards parameters over: dp, and cp, whose ranks hold the same
    parameters and see different tokens (so their gradients are summed like dp's)."""
    if "cp" not in mesh.mesh_dim_names:
        return dp_mesh(mesh)
    names = ("dp_replicate", "dp_shard", "cp") if is_hybrid(mesh) else ("dp", "cp")
    return mesh[names]._flatten("dp_cp")


def batch_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Every rank of one tp group's kind: pp, dp and cp flattened. Each holds a different
    part of the step's loss (its batch rows, its part of the sequence, or, on pp ranks
    that are not the last stage, nothing), so their shares sum to the step's loss."""
    if "pp" not in mesh.mesh_dim_names and "cp" not in mesh.mesh_dim_names:
        return dp_mesh(mesh)
    return mesh[tuple(n for n in mesh.mesh_dim_names if n != "tp")]._flatten("batch")


def cp_mesh(mesh: DeviceMesh) -> Optional[DeviceMesh]:
    """The context-parallel ranks of this rank, or None without context parallelism."""
    return mesh["cp"] if "cp" in mesh.mesh_dim_names else None


def pp_mesh(mesh: DeviceMesh) -> Optional[DeviceMesh]:
    """The pipeline stages' ranks of this rank, or None without pipeline parallelism."""
    return mesh["pp"] if "pp" in mesh.mesh_dim_names else None


def tp_mesh(mesh: DeviceMesh) -> Optional[DeviceMesh]:
    """The mesh to build the model with: None without tensor parallelism, so that a tp=1 run
    has plain parameters and no size-1 collectives."""
    return mesh["tp"] if mesh["tp"].size() > 1 else None


def dp_size(mesh: DeviceMesh) -> int:
    return dp_mesh(mesh).size()


def dp_rank(mesh: DeviceMesh) -> int:
    return dp_mesh(mesh).get_local_rank()
