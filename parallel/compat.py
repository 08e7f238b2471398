"""What differs between the torch versions this project admits, resolved once.

Tested range: torch 2.11 (the floor in pyproject.toml, what many clusters run) to 2.14.1
(the newest pip installs here); CI runs the compat subset on both ends and the whole
suite on 2.13. Everything else in the project calls these names and never asks for a
version itself.

- Functional collectives: `all_gather_single` / `reduce_scatter_single` arrived with the
  rename of pytorch#186125 (2026-06). torch 2.11 has only `all_gather_tensor` /
  `reduce_scatter_tensor`, which later versions keep as deprecated aliases. The ops
  underneath (`_c10d_functional.*`) are the same, so the choice is made once, here.
- Pipeline evaluation: before torch 2.13 a stage decides once, at its first run, whether
  the activations it receives require grad. A schedule's first run being `eval` (train.py
  evaluates at step 0) left them without, and the first training step then failed in the
  backward send ("has gradients None"). `pipeline_eval` gives them back their grad.

This module is on the ground floor: it imports nothing of ours.
"""

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


def all_gather_along(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Concatenate every rank's x along `dim`, in rank order."""
    return funcol.wait_tensor(_all_gather_along(x.contiguous(), dim, mesh))


def reduce_scatter_along(x: torch.Tensor, dim: int, mesh: DeviceMesh) -> torch.Tensor:
    """Sum x over the ranks and keep this rank's slice of `dim` (1/size of it)."""
    return funcol.wait_tensor(_reduce_scatter_along(x.contiguous(), "sum", dim, mesh))


def pipeline_eval(schedule, stages: list, *args, **kwargs) -> None:
    """`schedule.eval(*args, **kwargs)`, after which the stages' receive buffers still take
    gradients in the training steps that follow, on every torch we admit."""
    schedule.eval(*args, **kwargs)
    if torch_at_least("2.13"):  # a stage sets requires_grad on what it receives at each run
        return
    for stage in stages:
        for infos in stage.args_recv_info.values():
            for info in infos:
                buffer = getattr(info, "buffer", None)  # root inputs of stage 0 have none
                if isinstance(buffer, torch.Tensor) and buffer.is_floating_point():
                    buffer.requires_grad_(True)
