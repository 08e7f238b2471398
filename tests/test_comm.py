"""Collective counts over one forward + backward, measured with CommDebugMode.

Megatron's minimum per transformer block is 2 all-reduces forward and 2 backward;
with sequence parallelism each becomes a reduce-scatter / all-gather pair. Outside
the blocks: the embedding's exit (1 forward; with sequence parallelism its
all-gather backward too), the LM head's entry (1 backward, plus
1 all-gather forward with sequence parallelism), the loss (1 small all-gather of
per-token statistics), and, with sequence parallelism, one all-reduce that sums all
norm-weight gradients at once."""

import pytest
import torch

from llama import ModelArgs, Transformer
from parallel.layers import reduce_partial_gradients, vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks
from tests.test_model import batch, tp_mesh

ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)


def _count_collectives(n_layers: int, sequence_parallel: bool) -> dict:
    from torch.distributed.tensor.debug import CommDebugMode

    args = ModelArgs(**{**ARGS.to_dict(), "n_layers": n_layers})
    with torch.device("meta"):
        model = Transformer(args, tp_mesh(), sequence_parallel=sequence_parallel)
    model.init_weights(seed=0)
    tokens, targets = batch(args)
    with CommDebugMode() as comm:
        loss = vocab_parallel_cross_entropy(model(tokens), targets)
        loss.backward()
        reduce_partial_gradients(model)
    counts = {}
    for op, n in comm.get_comm_counts().items():
        name = str(op).split(".")[-1]
        counts[name] = counts.get(name, 0) + n
    return counts


def _counts_for_one_and_two_layers():
    return {(layers, sp): _count_collectives(layers, sp) for layers in (1, 2) for sp in (False, True)}


@pytest.mark.compat
def test_collectives_per_step_are_the_megatron_minimum_at_tp2():
    counts = run_on_ranks(_counts_for_one_and_two_layers, 2)[0]
    one, two = counts[(1, False)], counts[(2, False)]
    # embedding 1 + block 2 fwd + 2 bwd + LM head entry 1 bwd; loss: 1 all-gather
    assert one == {"all_reduce": 6, "all_gather_into_tensor": 1}
    assert two == {"all_reduce": 10, "all_gather_into_tensor": 1}
    per_block = {k: two[k] - one.get(k, 0) for k in two}
    assert per_block == {"all_reduce": 4, "all_gather_into_tensor": 0}

    one, two = counts[(1, True)], counts[(2, True)]
    # embedding exit 1 RS forward, 1 AG backward; block 2 AG + 2 RS forward, 2 RS + 2 AG
    # backward; head entry 1 AG forward, 1 RS backward; loss 1 AG; norm gradients 1 AR
    assert one == {"reduce_scatter_tensor": 6, "all_gather_into_tensor": 7, "all_reduce": 1}
    assert two == {"reduce_scatter_tensor": 10, "all_gather_into_tensor": 11, "all_reduce": 1}
    per_block = {k: two[k] - one.get(k, 0) for k in two}
    assert per_block == {"reduce_scatter_tensor": 4, "all_gather_into_tensor": 4, "all_reduce": 0}
