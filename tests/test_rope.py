"""RoPE in real arithmetic: the same rotation as Meta's complex form, per-token tables for
per-document positions, and a transformer block that torch.compile traces in one graph."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from llama.config import PRESETS
from llama.model import TransformerBlock
from llama.rope import apply_rope, rope_table, rotation_tables

ARGS = dataclasses.replace(PRESETS["debug"], max_seq_len=64)  # head_dim 32, llama3 scaling on
TOL = 1e-6


def complex_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The formula this module used before: one complex multiply per pair (the oracle)."""
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    rotation = torch.complex(cos, sin)[:, None, :]
    return torch.view_as_real(pairs * rotation).flatten(-2).type_as(x)


def rotated_with_grad(rope, x, cos, sin, grad_out):
    x = x.detach().requires_grad_()
    out = rope(x, cos, sin)
    out.backward(grad_out)
    return out.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_real_rope_equals_the_complex_formula_forward_and_backward(dtype):
    torch.manual_seed(0)
    cos, sin = rope_table(ARGS, 48)
    x = torch.randn(3, 48, 4, ARGS.head_dim).to(dtype)
    grad_out = torch.randn(x.shape).to(dtype)
    out, grad = rotated_with_grad(apply_rope, x, cos, sin, grad_out)
    want, want_grad = rotated_with_grad(complex_rope, x, cos, sin, grad_out)
    assert out.dtype == dtype and grad.dtype == dtype
    # bf16: both compute in fp32 and round once; a last-bit difference may round apart
    rtol = 0 if dtype == torch.float32 else 2**-8
    torch.testing.assert_close(out, want, rtol=rtol, atol=TOL)
    torch.testing.assert_close(grad, want_grad, rtol=rtol, atol=TOL)


def test_real_rope_equals_meta_reference_apply_rotary_emb():
    from llama_models.llama3 import model  # Meta's reference, in the test extra

    torch.manual_seed(1)
    seq = 40
    # Meta's scaling hard-codes factor 8, low 1, high 4, context 8192
    args = dataclasses.replace(ARGS, rope_original_context=8192)
    cos, sin = rope_table(args, seq)
    freqs_cis = model.precompute_freqs_cis(args.head_dim, seq, args.rope_theta, use_scaled=True)
    xq, xk = torch.randn(2, seq, 4, args.head_dim), torch.randn(2, seq, 2, args.head_dim)
    want_q, want_k = model.apply_rotary_emb(xq, xk, freqs_cis)
    torch.testing.assert_close(apply_rope(xq, cos, sin), want_q, rtol=0, atol=TOL)
    torch.testing.assert_close(apply_rope(xk, cos, sin), want_k, rtol=0, atol=TOL)


def test_per_token_tables_rotate_each_sequence_by_its_own_positions():
    # positions restart per document: gathering rows of the table gives (batch, seq, head_dim / 2)
    torch.manual_seed(2)
    cos, sin = rope_table(ARGS, 32)
    positions = torch.tensor([list(range(10)) + list(range(6)), list(range(16))])
    x = torch.randn(2, 16, 3, ARGS.head_dim)
    out = apply_rope(x, cos[positions], sin[positions])
    for b in range(2):
        want = complex_rope(x[b : b + 1], cos[positions[b]], sin[positions[b]])
        torch.testing.assert_close(out[b : b + 1], want, rtol=0, atol=TOL)


def test_rotation_preserves_pair_norms_and_leaves_position_zero_alone():
    torch.manual_seed(3)
    cos, sin = rope_table(ARGS, 8)
    x = torch.randn(1, 8, 2, ARGS.head_dim)
    out = apply_rope(x, cos, sin)
    torch.testing.assert_close(out[:, 0], x[:, 0], rtol=0, atol=0)
    pair_norm = lambda t: t.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(x), rtol=1e-6, atol=1e-6)


class Dtypes(TorchDispatchMode):
    """The dtypes of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        outputs = out if isinstance(out, (tuple, list)) else [out]
        self.seen |= {t.dtype for t in outputs if isinstance(t, torch.Tensor)}
        return out


def test_no_complex_tensor_is_made_forward_or_backward():
    # inductor cannot fuse complex ops (dynamo traces them without a graph break, so the
    # graph-break count alone does not catch them)
    cos, sin = rope_table(ARGS, 16)
    x = torch.randn(2, 16, 4, ARGS.head_dim, requires_grad=True)
    with Dtypes() as dtypes:
        apply_rope(x, cos, sin).sum().backward()
    assert not any(dtype.is_complex for dtype in dtypes.seen), dtypes.seen


def test_compiled_rope_matches_eager_in_one_graph_forward_and_backward():
    torch.manual_seed(4)
    cos, sin = rope_table(ARGS, 16)
    x, grad_out = torch.randn(2, 16, 4, ARGS.head_dim), torch.randn(2, 16, 4, ARGS.head_dim)
    compiled = torch.compile(apply_rope, backend="aot_eager", fullgraph=True)
    out, grad = rotated_with_grad(compiled, x, cos, sin, grad_out)
    want, want_grad = rotated_with_grad(apply_rope, x, cos, sin, grad_out)
    torch.testing.assert_close(out, want, rtol=0, atol=TOL)
    torch.testing.assert_close(grad, want_grad, rtol=0, atol=TOL)


def explain_a_block(cos, sin, *rest):
    """torch._dynamo.explain of one randomly initialised block on a (2, 16) batch."""
    torch._dynamo.reset()
    torch.manual_seed(5)
    block = TransformerBlock(0, ARGS)
    for param in block.parameters():
        torch.nn.init.normal_(param, std=0.02)
    return torch._dynamo.explain(block)(torch.randn(2, 16, ARGS.dim), rotation_tables(cos, sin), *rest)


@pytest.mark.parametrize("per_token", [False, True], ids=["shared-positions", "per-document-positions"])
def test_a_transformer_block_compiles_without_graph_breaks(per_token):
    cos, sin = rope_table(ARGS, 16)
    if per_token:
        positions = torch.tensor([list(range(9)) + list(range(7))] * 2)
        cos, sin = cos[positions], sin[positions]
    explained = explain_a_block(cos, sin)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_a_block_attending_in_runs_of_queries_compiles_without_graph_breaks(monkeypatch):
    """The CPU attention path (llama/masks.py causal_mask: runs of queries over key
    prefixes, here runs of 5 in 16 tokens) traces into one graph too."""
    import llama.masks as masks

    monkeypatch.setattr(masks, "QUERY_RUN", 5)
    mask = masks.causal_mask(16, "cpu")
    assert len(mask.key_prefixes) == 4
    explained = explain_a_block(*rope_table(ARGS, 16), 0, None, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


# ---------------------------------------------------------------- once per forward


def _count_rotation_tables(monkeypatch) -> list:
    import llama.model

    calls = []

    def counted(cos, sin):
        calls.append(tuple(cos.shape))
        return rotation_tables(cos, sin)

    monkeypatch.setattr(llama.model, "rotation_tables", counted)
    return calls


def _complex_rope_logits(model, tokens) -> torch.Tensor:
    """The model's logits with every layer rotating q and k by the complex formula itself,
    from its own table rows: what the model computed before the tables were shared."""
    import llama.model

    cos, sin = rope_table(model.args, tokens.shape[1])

    def complex_per_layer(xq, xk, freqs_cis):
        return complex_rope(xq, cos, sin), complex_rope(xk, cos, sin)

    original = llama.model.apply_rotary_emb
    llama.model.apply_rotary_emb = complex_per_layer
    try:
        return model(tokens)
    finally:
        llama.model.apply_rotary_emb = original


def test_rope_tables_are_built_once_per_forward_whatever_the_depth(monkeypatch):
    """Transformer.forward builds the rotation tables of its positions once and every layer
    reads them (as Meta slices freqs_cis once): one build per forward for 4 layers, with
    shared positions, per-document positions and a KV-cache step; the logits equal those
    of rotating q and k by the complex formula in each layer."""
    from llama import Transformer

    calls = _count_rotation_tables(monkeypatch)
    args = dataclasses.replace(ARGS, n_layers=4)
    model = Transformer(args).init_weights(seed=0)
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens)
        assert calls == [(12, args.head_dim // 2)]
        want = _complex_rope_logits(model, tokens)
        torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)

        calls.clear()
        document_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
        model(tokens, document_ids=document_ids)
        assert calls == [(2, 12, args.head_dim // 2)]

        calls.clear()
        cache = model.new_kv_cache(2, 16)
        model(tokens, 0, cache)
        model(tokens[:, :1], 12, cache)
        assert calls == [(12, args.head_dim // 2), (1, args.head_dim // 2)]
