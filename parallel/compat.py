"""What differs between the torch versions this project admits, resolved once.

Tested range: torch 2.11 (the floor in pyproject.toml, what many clusters run) to 2.14.1
(the newest pip installs here); CI runs the compat subset on both ends and the whole
suite on 2.13. Everything else in the project calls these names and never asks for a
version itself.

- Functional collectives: `all_gather_single` / `reduce_scatter_single` arrived with the
  rename of pytorch#186125 (2026-06). torch 2.11 has only `all_gather_tensor` /
  `reduce_scatter_tensor`, which later versions keep as deprecated aliases. The ops
  underneath (`_c10d_functional.*`) are the same, so the choice is made once, here.

This module is on the ground floor: it imports nothing of ours.
"""

import math
from typing import Optional

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])
TORCH_FLOOR = "2.11"

_all_gather_along = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_along = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def torch_at_least(version: str) -> bool:
    return TORCH_VERSION >= version


def all_reduce_sum(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Sum x over the ranks of a 1-D mesh (functional, so compile traces it)."""
    return funcol.wait_tensor(funcol.all_reduce(x.contiguous(), "sum", mesh))


# The collectives themselves gather and scatter along dim 0: every rank's part one after
# another in memory. Along another dim, torch (2.11 to 2.14 alike) rearranges after the
# gather and before the scatter, a copy of the whole tensor, except where every dim before
# `dim` has size 1 (batch 1 along the sequence), where the layouts agree. torch's gather
# takes that view itself; its scatter copies anyway, so reduce_scatter_along views.


def all_gather_along(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, in rank order."""
    return funcol.wait_tensor(_all_gather_along(x.contiguous(), dim, mesh))


def reduce_scatter_along(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's slice of `dim` (1/size of it)."""
    x = x.contiguous()
    if dim == 0 or math.prod(x.shape[:dim]) != 1:
        return funcol.wait_tensor(_reduce_scatter_along(x, "sum", dim, mesh))
    local_shape = (*x.shape[:dim], x.shape[dim] // mesh.size(), *x.shape[dim + 1 :])
    return reduce_scatter_stacked(x.view(mesh.size(), *local_shape), mesh)


def all_gather_stacked(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """(size, *x.shape): every rank's x, in rank order along a new first dim (no copy)."""
    return funcol.wait_tensor(_all_gather_along(x.contiguous(), 0, mesh)).view(mesh.size(), *x.shape)


def reduce_scatter_stacked(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """x (size, ...): the sum over the ranks of x[rank], for this rank (no copy)."""
    return funcol.wait_tensor(_reduce_scatter_along(x.contiguous(), "sum", 0, mesh)).view(x.shape[1:])
