"""A process group that sends nothing, so that the planner can build the real model on
the meta device for thousands of ranks in one process."""

import torch.distributed as dist


def init_fake_world(world_size: int) -> None:
    """A process group of `world_size` ranks that sends nothing; this process is rank 0."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("init_fake_world: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
