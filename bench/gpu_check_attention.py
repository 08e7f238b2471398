"""The parts of bench/gpu_check.py that check the attention and parallel code paths
against plain computations: tp / sp / cp collectives on a 1-rank mesh, and flex attention
with packed documents against dense SDPA. The shared helpers and the train.py parts are in
gpu_check_parts.py; the runner, the budgets and the table are in gpu_check.py. Every part
takes (opts, ctx) and returns a dict of results; a non-empty "failures" list in it marks
the part failed (its numbers are still reported)."""

import contextlib
import time
import warnings

import torch
import torch.nn.functional as F

from gpu_check_parts import difference, exact_fp32, init_one_rank, model_args, one_line, synchronize, worst

# ---- tolerances (explicit, per comparison)
# the collectives on one rank move the same bytes: exactly equal
COLLECTIVE_ATOL = 0.0
# the tp layers against F.linear on the same weights: the same matmuls, fp32 without TF32
LAYER_ATOL = 1e-6
# flex attention against dense SDPA on one mask, fp32 without TF32: only the summation
# order differs (~1e-7 relative). A wrong mask moves whole rows (~1e-2 relative, 1e-3 for
# one key pair too many in the tiny batch), so fp32 is where a masking error shows.
FLEX_FP32_RTOL = 1e-4
# bf16 (what train.py runs) against the fp32 reference: bf16 rounding of q, k, v, the
# probabilities and the output, ~4e-3 relative; catches gross errors only
FLEX_BF16_RTOL = 2e-2
FLEX_BLOCK = 128  # flex attention's default block size: the tested ids cross its boundaries


# ---------------------------------------------------------------- collectives on a 1-rank mesh


def check_collectives(opts, ctx) -> dict:
    """tp, sp and cp collectives on a 1-rank mesh, forward and backward, against the plain
    computation. At size 1 the public helpers (RegionInput, RowParallelLinear's exit,
    gather_for_cp) return their input before any collective, so the collectives are
    reached through the autograd functions those helpers apply at size > 1."""
    from torch.distributed.device_mesh import init_device_mesh

    from parallel import compat, context, layers

    device = opts.device
    init_one_rank(device)
    mesh = init_device_mesh(device, (1,), mesh_dim_names=("tp",))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 16, generator=gen).to(device)  # (batch, seq, features): seq is dim 1
    upstream = torch.randn(2, 8, 16, generator=gen).to(device)
    results, failures = {}, []

    def record(name, got, want, atol):
        diff = (got.detach() - want.detach()).abs().max().item()
        results[name] = diff
        if not diff <= atol:
            failures.append(f"{name}: max abs diff {diff:.3g} > {atol}")

    def forward_backward(name, fn, plain, atol=COLLECTIVE_ATOL):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = fn(a), plain(b)
        (ya * upstream).sum().backward()
        (yb * upstream).sum().backward()
        record(f"{name} forward", ya, yb, atol)
        record(f"{name} backward", a.grad, b.grad, atol)

    with exact_fp32():
        # parallel/compat.py: the functional collectives (no autograd of their own)
        record("compat.all_reduce_sum", compat.all_reduce_sum(x, mesh), x, COLLECTIVE_ATOL)
        record("compat.all_gather_along", compat.all_gather_along(x, 1, mesh), x, COLLECTIVE_ATOL)
        record("compat.reduce_scatter_along", compat.reduce_scatter_along(x, 1, mesh), x, COLLECTIVE_ATOL)

        def chained(t):
            return compat.reduce_scatter_along(compat.all_gather_along(compat.all_reduce_sum(t, mesh) * 2, 1, mesh), 1, mesh)

        # functional so that compile traces them: the same chain compiled
        record(f"compat compiled ({opts.compile_backend})", torch.compile(chained, backend=opts.compile_backend)(x),
               2 * x, COLLECTIVE_ATOL)

        # the autograd functions of tp (all-reduce), sp (all-gather / reduce-scatter along
        # the sequence) and cp (all-gather K and V along the sequence)
        forward_backward("tp copy to region", lambda t: layers._CopyToRegion.apply(t, mesh), lambda t: t)
        forward_backward("tp reduce from region", lambda t: layers._ReduceFromRegion.apply(t, mesh), lambda t: t)
        forward_backward("sp gather sequence", lambda t: layers._GatherSequence.apply(t, mesh), lambda t: t)
        forward_backward("sp scatter sequence", lambda t: layers._ScatterSequence.apply(t, mesh), lambda t: t)
        forward_backward("cp all-gather sequence",
                         lambda t: context.restore_order(context._AllGatherSequence.apply(t, 1, mesh), 1), lambda t: t)
        forward_backward("cp gather_for_cp(split_for_cp)",
                         lambda t: context.gather_for_cp(context.split_for_cp(t, mesh), mesh), lambda t: t)

        # the public layers, sequence parallel: RegionInput -> column -> row, against F.linear
        with torch.device(device):
            enter = layers.RegionInput(mesh, sequence_parallel=True)
            column = layers.ColumnParallelLinear(16, 32, mesh)
            row = layers.RowParallelLinear(32, 16, mesh, sequence_parallel=True)
        w1, w2 = torch.randn(32, 16, generator=gen).to(device), torch.randn(16, 32, generator=gen).to(device)
        with torch.no_grad():
            layers.local_tensor(column.weight).copy_(w1)
            layers.local_tensor(row.weight).copy_(w2)
        p1, p2 = w1.clone().requires_grad_(), w2.clone().requires_grad_()
        forward_backward("sp RegionInput-column-row", lambda t: row(column(enter(t))),
                         lambda t: F.linear(F.linear(t, p1), p2), atol=LAYER_ATOL)
        record("sp column weight grad", column.weight.grad.to_local(), p1.grad, LAYER_ATOL)
        record("sp row weight grad", row.weight.grad.to_local(), p2.grad, LAYER_ATOL)
    return {"backend": "nccl" if device == "cuda" else "gloo", "checks": len(results),
            "max_abs_diff": worst(results.values()), "diffs": results, "failures": failures}


# ---------------------------------------------------------------- flex attention against dense SDPA


def packed_document_ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    """(batch, seq) ids numbered 0, 1, ... along each row. Row 0 opens with documents of 1
    and 127 tokens, the second ending on the first block boundary, then a 1-token document
    on it; the other rows are cut at random places; the last row is one document (plain
    causal)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for r in range(batch):
        starts = set() if r == batch - 1 and batch > 1 else set(torch.randint(1, seq, (6,), generator=gen).tolist())
        if r == 0:
            starts |= {1, FLEX_BLOCK, FLEX_BLOCK + 1}
        is_start = torch.zeros(seq, dtype=torch.int64)
        is_start[sorted(s for s in starts if s < seq)] = 1
        rows.append(is_start.cumsum(0))
    return torch.stack(rows)


def dense_sdpa(q, k, v, allowed):
    """The reference: SDPA's math kernel (not a fused one, whose own rounding would be
    compared) over kv heads expanded by hand (no enable_gqa) with a dense (batch, seq,
    seq) boolean mask."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[1] // k.shape[1]
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                              attn_mask=allowed[:, None])


def attention_run(fn, q, k, v, weight, dtype, backward: bool) -> tuple:
    """(output, loss, grads of q, k, v or None), all fp32, of fn on q, k, v cast to dtype;
    the loss is a fixed random projection of the output, so every gradient matters."""
    inputs = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]
    out = fn(*inputs)
    loss = (out.float() * weight).sum()
    if backward:
        loss.backward()
    grads = [t.grad.float() for t in inputs] if backward else None
    return out.float().detach(), loss.detach(), grads


def check_flex(opts, ctx) -> dict:
    """Flex attention with packed documents, built by llama.masks (train.py's mask code),
    eager and compiled, fp32 and bf16, forward and backward, against dense SDPA with the
    same mask in fp32 without TF32, on the same inputs."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention

    from llama.masks import document_mask, masked_attention

    device, args = opts.device, model_args(opts)
    # train.py's shapes, so that its process can take the compiled kernel from inductor's
    # on-disk cache; at least two blocks, so that block boundaries are crossed
    batch, seq = opts.micro_batch, max(opts.seq_len, 2 * FLEX_BLOCK)
    ids = packed_document_ids(batch, seq).to(device)
    allowed = (ids[:, :, None] == ids[:, None, :]) & torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    flex_mask = document_mask(ids, "flex")
    failures = []
    masks_equal = {
        "llama.masks dense": bool(torch.equal(document_mask(ids, "sdpa").dense[:, 0], allowed)),
        "llama.masks block mask_mod": bool(torch.equal(
            create_mask(flex_mask.block.mask_mod, batch, 1, seq, seq, device=device)[:, 0], allowed)),
    }
    failures += [f"{name} differs from the reference mask" for name, same in masks_equal.items() if not same]

    gen = torch.Generator().manual_seed(1)
    # (batch, heads, seq, head_dim) views of (batch, seq, heads, head_dim), as the model
    # hands them over: a compiled kernel is specialised to its inputs' strides
    q, k, v = (torch.randn(batch, seq, heads, args.head_dim, generator=gen).to(device).transpose(1, 2)
               for heads in (args.n_heads, args.n_kv_heads, args.n_kv_heads))
    weight = torch.randn(q.shape, generator=gen).to(device)

    def eager(q_, k_, v_):
        with warnings.catch_warnings():  # "flex_attention called without torch.compile()": on purpose
            warnings.simplefilter("ignore")
            return flex_attention(q_, k_, v_, block_mask=flex_mask.block, enable_gqa=True)

    if device == "cuda":
        # llama.masks compiles flex attention once, on CUDA only: the object train.py's model calls
        def compiled(q_, k_, v_):
            return masked_attention(q_, k_, v_, flex_mask, enable_gqa=True)
        compiled_with = "llama.masks (torch.compile, inductor): train.py's"
    else:
        # llama.masks runs flex eagerly on CPU; compile it here, with --compile-backend
        # (inductor's CPU flex kernel compiles for ~80 s on 2 cores, cold; aot_eager traces
        # the same graph through dynamo and AOT autograd without generating code)
        compiled_flex = torch.compile(flex_attention, dynamic=False, backend=opts.compile_backend)

        def compiled(q_, k_, v_):
            return compiled_flex(q_, k_, v_, block_mask=flex_mask.block, enable_gqa=True)
        compiled_with = f"torch.compile(flex_attention, backend={opts.compile_backend!r})"

    with exact_fp32():
        ref_out, ref_loss, ref_grads = attention_run(lambda *t: dense_sdpa(*t, allowed), q, k, v, weight,
                                                     torch.float32, True)
    loss_scale = (weight.abs() * ref_out.abs()).sum()  # |loss difference| <= this x the output's
    runs, backward_skipped = {}, None
    for mode, fn in (("eager", eager), ("compiled", compiled)):
        for dtype, rtol in ((torch.float32, FLEX_FP32_RTOL), (torch.bfloat16, FLEX_BF16_RTOL)):
            name = f"{mode} {str(dtype).removeprefix('torch.')}"
            start = time.perf_counter()
            # fp32 without TF32, like the reference; bf16 under train.py's settings, so that
            # its compiled kernel is the one train.py's process looks up in the cache
            with exact_fp32() if dtype == torch.float32 else contextlib.nullcontext():
                try:
                    out, loss, grads = attention_run(fn, q, k, v, weight, dtype, backward_skipped is None)
                except NotImplementedError as err:
                    if device != "cpu" or "backward" not in str(err):
                        raise
                    # torch says so itself: FlexAttention has no CPU backward
                    backward_skipped = f"skipped on CPU: torch {torch.__version__}: {one_line(err)}"
                    out, loss, grads = attention_run(fn, q, k, v, weight, dtype, False)
            synchronize(device)
            run = {"out": difference(out, ref_out), "loss_rel": (abs(loss - ref_loss) / loss_scale).item(),
                   "rtol": rtol, "seconds": round(time.perf_counter() - start, 2)}
            if grads is not None:
                for grad_name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
                    run[grad_name] = difference(got, want)
            run["worst_rel"] = worst([run["loss_rel"]] + [run[key]["rel"] for key in ("out", "dq", "dk", "dv") if key in run])
            if not run["worst_rel"] <= rtol:
                failures.append(f"{name}: relative error {run['worst_rel']:.3g} > {rtol}")
            runs[name] = run
    return {"batch": batch, "seq": seq, "heads": args.n_heads, "kv_heads": args.n_kv_heads,
            "documents": (ids[:, -1] + 1).tolist(), "masks_equal": masks_equal, "compiled_with": compiled_with,
            "backward": backward_skipped or "ran", "runs": runs,
            "worst_fp32_rel": worst([r["worst_rel"] for n, r in runs.items() if "float32" in n]),
            "worst_bf16_rel": worst([r["worst_rel"] for n, r in runs.items() if "bfloat16" in n]),
            "failures": failures}
