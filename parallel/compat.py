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
- Checkpoint staging (`torch.distributed.checkpoint.staging`, experimental): every
  admitted torch has `DefaultStager(StagingOptions(...))` with the same signature, but
  only from 2.13 on (checked on 2.13.0 and 2.14.1) does one stager keep its host copies
  between saves. 2.11's drops its storage cache and its copy dispatch table after each
  stage, so a second stage with the same stager fails (KeyError: <class 'type'>). There
  `BlockingAsyncStager(cache_staged_state_dict=True)` keeps one copy instead, but it always
  pins it, which needs CUDA. 2.12 is taken for 2.11: the safe side.

This module is on the ground floor: it imports nothing of ours.
"""

import math
from typing import Optional

import torch
import torch.distributed._functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

TORCH_VERSION = torch.torch_version.TorchVersion(torch.__version__.split("+")[0])

_all_gather_along = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
_reduce_scatter_along = getattr(funcol, "reduce_scatter_single", None) or funcol.reduce_scatter_tensor


def torch_at_least(version: str) -> bool:
    return TORCH_VERSION >= version


_DEFAULT_STAGER_KEEPS_BUFFERS = torch_at_least("2.13")


def checkpoint_stager(pin_memory: bool):
    """One stager for every async save of a run: each save copies the shards into the same
    host buffers, allocated at the first save, pinned when `pin_memory` (CUDA), so that
    the device-to-host copy runs at full speed and no save allocates and pins gigabytes
    afresh. The copy blocks until it is done (training may then change the weights); the
    caller saves one checkpoint at a time, as the buffers hold one, and closes the stager
    after the last save."""
    from torch.distributed.checkpoint.staging import BlockingAsyncStager, DefaultStager, StagingOptions

    if _DEFAULT_STAGER_KEEPS_BUFFERS:
        return DefaultStager(StagingOptions(
            use_pinned_memory=pin_memory, use_shared_memory=False, use_async_staging=False,
            use_non_blocking_copy=pin_memory,  # needs an accelerator; one synchronize ends the copy
        ))
    # torch 2.11: one pinned copy; on CPU, where it cannot pin, a fresh copy per save
    return BlockingAsyncStager(cache_staged_state_dict=pin_memory)


def stager_reuses_buffers(pin_memory: bool) -> bool:
    """Whether `checkpoint_stager(pin_memory)` copies every save into the same buffers."""
    return _DEFAULT_STAGER_KEEPS_BUFFERS or pin_memory


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
