"""The control plane: small host-side messages between ranks (flags, paths, errors).

They travel on a gloo group: under NCCL a flag would otherwise need a device tensor and a
host-device sync, and a wait of hours (one rank tokenizing a corpus) would trip NCCL's
collective timeout. Under gloo the default group serves."""

import datetime
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

_control = None


def control_group():
    """A gloo group over every rank. The first call must come from every rank at the same
    point in the program, as it may create the group (a collective)."""
    global _control
    if _control is None:
        _control = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _control


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (any picklable object)."""
    return broadcast_from(0, value)


def broadcast_from(src: int, value: Any) -> Any:
    """Rank `src`'s `value` on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=src, group=control_group())
    return box[0]


def max_over_ranks(values: Sequence[float]) -> list:
    """Each value's largest over every rank (float64): one small all-reduce."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=control_group())
    return t.tolist()


def rank0_first(work: Callable[[], Any], timeout: datetime.timedelta) -> Any:
    """Rank 0 runs `work` while the others wait up to `timeout` (not the process group's
    collective timeout: tokenizing a corpus can take hours); every rank gets its result
    (picklable). A ValueError on rank 0 is raised on every rank, so that each exits with
    the same one-line error."""
    waiting = dist.new_group(backend="gloo", timeout=timeout)  # a gloo group's timeout bounds its every wait
    result = error = None
    if dist.get_rank() == 0:
        try:
            result = work()
        except ValueError as err:
            error = err
    box = [(result, error)]
    dist.broadcast_object_list(box, src=0, group=waiting)
    dist.destroy_process_group(waiting)
    result, error = box[0]
    if error is not None:
        raise error
    return result
