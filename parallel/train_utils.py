"""Mesh-independent training arithmetic: the loss normalised by the global token count,
and gradient clipping over DTensor gradients sharded on any (pp, dp, cp, tp) mesh.

With these, a step's loss, gradient norm and update are those of one device holding
the whole global batch, whatever the mesh and the number of micro-steps."""

import math
from typing import Iterable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from .losses import vocab_parallel_cross_entropy
from .mesh import batch_mesh, dp_mesh, local_device


def global_token_count(
    targets: Union[torch.Tensor, Sequence[torch.Tensor]], mesh: Optional[DeviceMesh] = None, ignore_index: int = -100
) -> int:
    """Target tokens in the whole optimizer step: every micro-batch of every dp rank.
    `targets`: this rank's micro-batches (all of them, before the first forward). One
    all-reduce over dp; tp ranks share a batch, so they are not counted again."""
    if isinstance(targets, torch.Tensor):
        targets = [targets]
    count = sum(int((t != ignore_index).sum()) for t in targets)
    return int(sum_over_dp(count, mesh))  # float64 holds token counts exactly


def token_loss(logits, targets: torch.Tensor, global_tokens: int, ignore_index: int = -100) -> torch.Tensor:
    """This micro-batch's share of the step's mean token loss: its summed token losses over
    the global token count. Backward on every share (FSDP sums gradients over dp) gives
    the gradient of the mean over the global batch; the shares add up to that mean."""
    loss = vocab_parallel_cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return loss / max(global_tokens, 1)


def sum_over_dp(value: float, mesh: Optional[DeviceMesh] = None) -> float:
    """Add up a per-rank number over dp ranks, e.g. the `token_loss` shares, whose sum
    is the step's mean loss (for logging; one small all-reduce)."""
    return _sum_over(value, None if mesh is None else dp_mesh(mesh))


def sum_over_batch(value, mesh: Optional[DeviceMesh] = None):
    """Add up a per-rank number (or a list of them, in one collective) over every rank that
    holds a different part of the step's loss: dp ranks (rows), cp ranks (parts of each
    sequence) and pp ranks (only the last stage has a loss; the others add 0). tp ranks hold
    the same value and are not added."""
    return _sum_over(value, None if mesh is None else batch_mesh(mesh))


def _sum_over(value, group: Optional[DeviceMesh]):
    if group is None or group.size() == 1:
        return value
    values = value if isinstance(value, list) else [value]
    total = torch.tensor(values, dtype=torch.float64, device=group.device_type)
    dist.all_reduce(total, group=group.get_group())
    return total.tolist() if isinstance(value, list) else float(total.item())


def _replicas(grad: DTensor) -> int:
    """How many ranks hold each element of this gradient (its Replicate mesh dims)."""
    return math.prod(grad.device_mesh.size(i) for i, p in enumerate(grad.placements) if p.is_replicate())


def _parameters_and_gradients(parameters) -> tuple:
    """(the parameters, the gradients among them), the gradients checked."""
    if isinstance(parameters, nn.Module):
        parameters = parameters.parameters()
    params = list(parameters)
    grads = []
    for param in params:
        grad = param.grad
        if grad is None:
            continue
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            raise ValueError(
                "a gradient is still a partial sum over tp ranks; call parallel.layers.reduce_partial_gradients(model) "
                "after backward (FSDP-wrapped models do this themselves)"
            )
        grads.append(grad)
    return params, grads


def _sums_over_world(params: list) -> bool:
    """Whether the norm adds up the ranks: DTensor parameters in a world of several ranks.
    Decided from the parameters, never from the gradients: a rank may hold none (a pipeline
    stage of frozen layers, LoRA adapters on some stages only, a step that reached no
    parameter of this rank), and it must still join the all-reduce the others wait in."""
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    return distributed and any(isinstance(p, DTensor) for p in params)


def _norm_of(grads: list, over_world: bool, device: torch.device) -> torch.Tensor:
    # Each rank sums the squares of its local shards, dividing replicated ones by their
    # replica count so that the sum over all ranks counts each element once; one
    # all-reduce over the world adds the ranks up. Pipeline stages hold disjoint
    # parameters, so the world sum also adds the stages (the norm over pp). Every rank
    # takes part in that all-reduce, with 0 when it holds no gradient.
    # Everything stays a tensor on the device: no step of this waits for the GPU.
    by_replicas: dict = {}
    for grad in grads:
        if isinstance(grad, DTensor):
            by_replicas.setdefault(_replicas(grad), []).append(grad.to_local())
        else:
            by_replicas.setdefault(1, []).append(grad)
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    for replicas, tensors in by_replicas.items():
        square_sum += torch.stack(torch._foreach_norm(tensors)).to(device, torch.float64).square().sum() / replicas
    if over_world:
        dist.all_reduce(square_sum)
    return square_sum.sqrt()


def _norm_device(params: list, grads: list, over_world: bool) -> torch.device:
    """Where the sum lives: where the collective can run (a GPU for NCCL, even with CPU
    offload), else beside the gradients."""
    mesh = next((p.device_mesh for p in params if isinstance(p, DTensor)), None)
    if over_world and mesh is not None:
        return local_device(mesh.device_type)
    return grads[0].device if grads else torch.device("cpu")


def _total_norm(parameters) -> tuple:
    params, grads = _parameters_and_gradients(parameters)
    over_world = _sums_over_world(params)
    return grads, _norm_of(grads, over_world, _norm_device(params, grads, over_world))


def grad_norm(parameters: Union[nn.Module, Iterable[torch.Tensor]]) -> float:
    """The L2 norm of all gradients, equal to what one device holding whole tensors computes."""
    return float(_total_norm(parameters)[1])


def clip_grad_norm_(
    parameters: Union[nn.Module, Iterable[torch.Tensor]], max_norm: Optional[float], eps: float = 1e-6
) -> torch.Tensor:
    """Scale all gradients so that their global L2 norm is at most `max_norm` (None or inf:
    do not clip); returns the norm before clipping as a 0-dim float64 tensor, as
    torch.nn.utils.clip_grad_norm_ does on one device. Nothing here waits for the GPU: read
    the norm (`float(norm)`) only on the steps that log it."""
    grads, total = _total_norm(parameters)
    if max_norm is None or math.isinf(max_norm) or not grads:
        return total
    # Multiply by min(1, max_norm / norm) every step, even when it is 1: deciding on the
    # host whether to clip would wait for the norm, stalling the GPU at every step.
    coef = (max_norm / (total + eps)).clamp(max=1.0).to(torch.float32)
    by_device: dict = {}
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        by_device.setdefault(local.device, []).append(local)
    with torch.no_grad():
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, coef.to(device))
    return total
