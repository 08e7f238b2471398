"""The LoRA update of a parallel linear layer (parallel/layers.py) on one device: its output
and the gradients of its input, A and B are those of y = x W^T + scale * dropout(x) A^T B^T
written out with plain matmuls, for a column-parallel layer (also with replicated rows,
the kv heads shared by tp ranks), a row-parallel one, and with dropout. The layers add the
low-rank product into x W^T with one addmm (alpha = scale); this pins that it is the same
function, forward and backward. fp32, 1e-5."""

import pytest
import torch
import torch.nn.functional as F

from parallel.layers import ColumnParallelLinear, LoRA, RowParallelLinear

IN, OUT, RANK, SCALE, TOL = 48, 40, 4, 2.0, 1e-5


def adapted(kind: str, dropout: float):
    torch.manual_seed(0)
    if kind == "row":
        layer = RowParallelLinear(IN, OUT)
    else:
        layer = ColumnParallelLinear(IN, OUT, replicated_rows=(8, 24) if kind == "column, replicated rows" else None)
    layer.add_lora(LoRA(RANK, SCALE, dropout))
    with torch.no_grad():
        for param in (layer.weight, layer.lora_a, layer.lora_b):
            param.normal_()  # B nonzero: it starts at zero in a model
    return layer


def written_out(layer, x: torch.Tensor, dropout: float) -> torch.Tensor:
    weight, b = layer.weight, layer.lora_b
    if getattr(layer, "replicated_rows", None) is not None:
        start, stop = layer.replicated_rows
        weight, b = weight[start:stop], b[start:stop]
    dropped = F.dropout(x, dropout, True) if dropout else x
    return x @ weight.T + SCALE * ((dropped @ layer.lora_a.T) @ b.T)


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("kind", ["column", "column, replicated rows", "row"])
def test_the_adapted_layer_and_its_gradients_equal_the_written_out_update(kind, dropout):
    layer = adapted(kind, dropout).train()
    x = torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_out = torch.randn(2, 5, 16 if kind == "column, replicated rows" else OUT,
                           generator=torch.Generator().manual_seed(2))

    results = []
    for forward in (layer, lambda x: written_out(layer, x, dropout)):
        torch.manual_seed(3)  # the same dropout mask for both
        y = forward(x)
        y.backward(grad_out)
        results.append([y.detach(), x.grad, layer.lora_a.grad, layer.lora_b.grad])
        x.grad = layer.lora_a.grad = layer.lora_b.grad = layer.weight.grad = None

    for name, got, want in zip(("y", "x.grad", "lora_a.grad", "lora_b.grad"), *results):
        assert got.shape == want.shape, name
        assert (got - want).abs().max().item() < TOL, f"{kind}, dropout {dropout}: {name}"
        assert want.abs().max().item() > 1.0, name  # not a comparison of zeros
