"""The LoRA projections of one input computed together (parallel/lora_layers.py, through
parallel.layers.shared_input_linears: wq, wk, wv; w1, w3): their outputs and the gradients
of x, A and B equal those of each layer's own y = x W^T + scale * dropout(x) A^T B^T
written out with plain autograd (1e-6 of the largest value, fp32), dropout draws one mask
per projection as separate layers do, and the fusion is what it claims, counted: x is
read by one adapter product for all three projections forward and one backward, and its
gradient takes every term without a separate addition. A frozen weight (the base, and a
frozen norm's) gets no gradient computed."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from llama.norm import rms_norm
from parallel.layers import ColumnParallelLinear, LoRA, shared_input_linears

IN, RANK, SCALE, REL_TOL = 48, 4, 2.0, 1e-6
MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default}


def projections(dropout: float = 0.0, frozen: bool = True) -> list:
    """wq, wk, wv-like layers: 40, 24 and 32 outputs, the last with replicated rows (kv
    heads shared by tp ranks: it uses rows 8..24 of its 32), adapters with B nonzero."""
    torch.manual_seed(0)
    layers = [ColumnParallelLinear(IN, 40), ColumnParallelLinear(IN, 24), ColumnParallelLinear(IN, 32, replicated_rows=(8, 24))]
    for layer in layers:
        layer.add_lora(LoRA(RANK, SCALE, dropout))
        with torch.no_grad():
            for param in (layer.weight, layer.lora_a, layer.lora_b):
                param.normal_()
        layer.weight.requires_grad_(not frozen)
    return layers


def written_out(layer, x: torch.Tensor) -> torch.Tensor:
    weight, b = layer.weight, layer.lora_b
    if layer.replicated_rows is not None:
        start, stop = layer.replicated_rows
        weight, b = weight[start:stop], b[start:stop]
    dropped = F.dropout(x, layer.lora.dropout, True) if layer.lora.dropout else x
    return x @ weight.T + SCALE * ((dropped @ layer.lora_a.T) @ b.T)


def run(layers, forward, x: torch.Tensor) -> list:
    """Outputs, then the gradients of x and of every A and B (and W where it trains), for a
    fixed upstream gradient; leaves the gradients cleared."""
    torch.manual_seed(3)  # the same dropout masks for both
    outputs = forward(x)
    grads_out = [torch.randn(y.shape, generator=torch.Generator().manual_seed(10 + i)) for i, y in enumerate(outputs)]
    torch.autograd.backward(outputs, grads_out)
    params = [p for layer in layers for p in (layer.weight, layer.lora_a, layer.lora_b) if p.requires_grad]
    result = [y.detach() for y in outputs] + [x.grad] + [p.grad for p in params]
    x.grad = None
    for p in params:
        p.grad = None
    return result


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    return got.shape == want.shape and (got - want).abs().max().item() <= REL_TOL * want.abs().max().item()


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("frozen", [True, False])
def test_projections_of_one_input_computed_together_equal_each_layer_written_out(dropout, frozen):
    layers = [layer.train() for layer in projections(dropout, frozen)]
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    fused = run(layers, lambda x: shared_input_linears(x, *layers), x)
    one_by_one = run(layers, lambda x: [written_out(layer, x) for layer in layers], x)
    assert len(fused) == len(one_by_one) == 3 + 1 + 3 * (2 if frozen else 3)
    for i, (got, want) in enumerate(zip(fused, one_by_one)):
        assert close(got, want), f"dropout {dropout}, frozen {frozen}: result {i}"
        assert want.abs().max().item() > 1.0, i  # not a comparison of zeros


def test_a_frozen_weight_gets_no_gradient():
    layers = projections()
    x = torch.randn(2, 5, IN, requires_grad=True)
    torch.autograd.backward(shared_input_linears(x, *layers), [torch.ones(2, 5, n) for n in (40, 24, 16)])
    assert all(layer.weight.grad is None for layer in layers)
    assert all(layer.lora_a.grad is not None and layer.lora_b.grad is not None for layer in layers)


class CountOps(TorchDispatchMode):
    """Counts matmuls that read a given storage, and the additions, dispatched inside."""

    def __init__(self, storage_ptr: int):
        super().__init__()
        self.storage_ptr = storage_ptr
        self.products_reading_x = self.additions = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS and any(isinstance(a, torch.Tensor) and a.untyped_storage().data_ptr() == self.storage_ptr
                                   for a in args):
            self.products_reading_x += 1
        if func in (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor):
            self.additions += 1
        return func(*args, **(kwargs or {}))


def test_three_adapted_projections_read_their_input_in_four_products_forward_and_one_backward():
    # forward: the three base products and one x A^T for all three adapters (not three);
    # backward: one x-reading product (every A's gradient at once), no weight gradient of
    # the frozen base, and x's gradient accumulated inside the products: no addition
    layers = projections()
    x = torch.randn(2, 5, IN, requires_grad=True)
    with CountOps(x.untyped_storage().data_ptr()) as forward:
        outputs = shared_input_linears(x, *layers)
    assert forward.products_reading_x == 4
    with CountOps(x.untyped_storage().data_ptr()) as backward:
        torch.autograd.backward(outputs, [torch.ones_like(y) for y in outputs])
    assert backward.products_reading_x == 1
    assert backward.additions == 0


def test_layers_without_an_adapter_in_the_group_run_as_they_are():
    layers = projections()
    plain = ColumnParallelLinear(IN, 8)
    with torch.no_grad():
        plain.weight.normal_()
    x = torch.randn(2, 5, IN)
    got = shared_input_linears(x, layers[0], plain, layers[1])
    want = [written_out(layers[0], x), x @ plain.weight.T, written_out(layers[1], x)]
    assert all(close(g.detach(), w.detach()) for g, w in zip(got, want))


class SumCount(TorchDispatchMode):
    """Counts the sums over tokens down to one value per feature: a norm weight's gradient."""

    def __init__(self):
        super().__init__()
        self.sums = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.sum.default, torch.ops.aten.sum.dim_IntList) and tuple(out.shape) == (IN,):
            self.sums += 1
        return out


@pytest.mark.parametrize("frozen", [True, False])
def test_a_frozen_norm_weight_gets_no_gradient_computed_and_the_input_gradient_is_unchanged(frozen):
    # the CPU RMSNorm's backward (llama/norm.py): the weight's gradient is a sum over tokens,
    # taken only for a weight that trains
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    weight = torch.randn(IN, generator=torch.Generator().manual_seed(2)).requires_grad_(not frozen)
    grad = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(3))
    y = rms_norm(x, weight, 1e-5)
    with SumCount() as counted:
        y.backward(grad)
    got, got_weight = x.grad, weight.grad
    x.grad = weight.grad = None
    F.rms_norm(x, (IN,), weight, 1e-5).backward(grad)
    assert close(got, x.grad)
    assert counted.sums == (0 if frozen else 1)
    assert (got_weight is None) if frozen else close(got_weight, weight.grad)


def test_torchs_flop_counter_counts_every_product_of_the_group():
    # the products accumulate in place; FlopCounterMode (bench_lora's FLOPs ratio) must see
    # them all: forward 2 T in out per base and 2 T rank (in + out) per adapter; backward
    # the bases' input gradients (no weight gradient: frozen) and twice the adapters'
    from torch.utils.flop_counter import FlopCounterMode

    layers = projections()
    tokens, outs = 10, (40, 24, 16)
    x = torch.randn(2, 5, IN, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        outputs = shared_input_linears(x, *layers)
        torch.autograd.backward(outputs, [torch.ones_like(y) for y in outputs])
    base = sum(2 * tokens * IN * n for n in outs)
    adapters = sum(2 * tokens * RANK * (IN + n) for n in outs)
    assert counter.get_total_flops() == 2 * base + 3 * adapters
