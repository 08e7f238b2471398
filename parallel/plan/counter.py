"""The record of one collective (`Collective`), their totals per mesh dimension
(`summarize`), and `CommCounter`, which records every collective a real run issues, so
that tests can hold the planner's closed-form counts to what actually happens."""

from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.utils._python_dispatch import TorchDispatchMode

from ..mesh import dp_mesh, is_hybrid


@dataclass(frozen=True)
class Collective:
    dim: str  # mesh dimension, or "world"
    op: str  # all_gather | reduce_scatter | all_reduce | send (pipeline point-to-point)
    bytes: int  # payload: gathered output / scattered input / reduced tensor / sent tensor
    group_size: int

    @property
    def wire_bytes(self) -> float:
        """Bytes one rank sends on a ring (a point-to-point send: the tensor)."""
        if self.op == "send":
            return self.bytes
        share = (self.group_size - 1) / self.group_size
        return self.bytes * share * (2 if self.op == "all_reduce" else 1)


def summarize(collectives) -> dict:
    """{dim: {op: {"calls", "bytes", "wire_bytes"}}}"""
    out: dict = defaultdict(lambda: defaultdict(lambda: {"calls": 0, "bytes": 0, "wire_bytes": 0}))
    for c in collectives:
        entry = out[c.dim][c.op]
        entry["calls"] += 1
        entry["bytes"] += c.bytes
        entry["wire_bytes"] += round(c.wire_bytes)
    return {dim: dict(ops) for dim, ops in out.items()}


def group_labels(mesh: DeviceMesh) -> dict:
    """process-group name -> mesh dimension name; a group no dimension owns is "world"."""
    labels = {dist.group.WORLD.group_name: "world"}
    for name in mesh.mesh_dim_names:
        labels[mesh[name].get_group().group_name] = name
    if is_hybrid(mesh):
        labels[dp_mesh(mesh).get_group().group_name] = "dp"
    return labels


def _group_name(group) -> str:
    if isinstance(group, str):
        return group
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    return group.group_name


def _nbytes(tensors) -> int:
    if isinstance(tensors, torch.Tensor):
        return tensors.numel() * tensors.element_size()
    return sum(_nbytes(t) for t in tensors)


class CommCounter(TorchDispatchMode):
    """Records every collective issued inside the `with` block, from the tensor-parallel
    layers (functional collectives), from DTensor redistributions and from FSDP (c10d ops)."""

    def __init__(self, mesh: DeviceMesh):
        super().__init__()
        self.labels = group_labels(mesh)
        # DTensor caches sharding specs by value, so a process that built several meshes
        # may run a collective on an equal earlier mesh's group: fall back to its ranks
        self.by_ranks = {}
        for name, label in self.labels.items():
            self.by_ranks.setdefault(self._ranks(name), label)
        self.collectives: list = []

    @staticmethod
    def _ranks(group_name: str) -> tuple:
        return tuple(dist.get_process_group_ranks(dist.distributed_c10d._resolve_process_group(group_name)))

    def _record(self, op: str, nbytes: int, group) -> None:
        name = _group_name(group)
        ranks = self._ranks(name)
        label = self.labels.get(name) or self.by_ranks.get(ranks, name)
        self.collectives.append(Collective(label, op, nbytes, len(ranks)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        ns, name = func._schema.name.split("::")
        if ns == "_c10d_functional":
            if name == "all_reduce":
                self._record("all_reduce", _nbytes(args[0]), args[2])
            elif name == "all_gather_into_tensor":
                self._record("all_gather", _nbytes(args[0]) * args[1], args[2])
            elif name == "reduce_scatter_tensor":
                self._record("reduce_scatter", _nbytes(args[0]), args[3])
            elif name not in ("wait_tensor", "_wrap_tensor_autograd"):
                raise NotImplementedError(f"CommCounter: unhandled collective {func}")
        elif ns == "c10d":
            if name == "_allgather_base_":
                self._record("all_gather", _nbytes(args[0]), args[2])
            elif name == "_reduce_scatter_base_":
                self._record("reduce_scatter", _nbytes(args[1]), args[2])
            elif name == "allreduce_":
                self._record("all_reduce", _nbytes(args[0]), args[1])
            elif name not in ("monitored_barrier_", "barrier"):
                raise NotImplementedError(f"CommCounter: unhandled collective {func}")
        return func(*args, **kwargs)

    def summary(self) -> dict:
        return summarize(self.collectives)
