import pytest
import torch

from parallel import spawn

# what most multi-rank tests import: the fork server imports it once, not every launch
spawn.preload([
    "torch.distributed.tensor", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.pipelining",
    "numpy", "llama.model", "llama.weights.loading", "llama.data.loader", "parallel.fsdp", "parallel.pipeline",
    "llama.training.step",
])


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
    yield
