"""Document masking: a packed row [A | B | C] with document ids computes exactly what A, B
and C compute alone, on one device, under tp, with sequence parallelism and in 2D.

Tolerances: fp32; 1e-5 absolute on logits, loss and gradients."""

import pytest
import torch

from llama import ModelArgs, Transformer
from llama.masks import document_mask, document_positions
from parallel.layers import reduce_partial_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks

TOL = 1e-5
# the eager flex kernel is the CPU reference here; torch warns that it is not the fast one
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
# document lengths of each packed row; a one-token document and a long one included
ROWS = ([5, 7, 4], [1, 9, 6])
SEQ = 16


def packed_batch(seed: int = 0):
    """tokens, targets (some ignored) and document ids, (len(ROWS), SEQ) each."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (len(ROWS), SEQ), generator=gen)
    targets = torch.randint(0, ARGS.vocab_size, (len(ROWS), SEQ), generator=gen)
    targets[0, 2] = targets[1, 10] = -100
    document_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in ROWS])
    return tokens, targets, document_ids


def segments(rows=range(len(ROWS))):
    """(row, start, stop) of every document in the given rows."""
    for r in rows:
        start = 0
        for n in ROWS[r]:
            yield r, start, start + n
            start += n


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def documents_alone(rows=range(len(ROWS))) -> dict:
    """One device, each document run as its own sequence: logits per document, the summed
    loss, and the gradients of the summed loss."""
    tokens, targets, _ = packed_batch()
    model = Transformer(ARGS).init_weights(seed=3)
    logits, total = {}, 0.0
    for r, a, b in segments(rows):
        out = model(tokens[r : r + 1, a:b])
        logits[(r, a, b)] = out.detach()[0]
        loss = vocab_parallel_cross_entropy(out, targets[r : r + 1, a:b], reduction="sum")
        loss.backward()
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return {"logits": logits, "loss": total, "grads": grads}


def compare_packed(model, alone, rows, kernel="sdpa", backward=True) -> dict:
    """Max differences between `model` on the packed rows and the documents run alone."""
    tokens, targets, document_ids = packed_batch()
    model.attention_kernel = kernel
    rows = list(rows)
    with torch.set_grad_enabled(backward):
        logits = model(tokens[rows], document_ids=document_ids[rows])
    full = _full(logits.detach())
    logit_diff = max(
        (full[i, a:b] - alone["logits"][(r, a, b)]).abs().max().item()
        for i, r in enumerate(rows)
        for rr, a, b in segments([r])
    )
    out = {"logits": logit_diff}
    if backward:
        loss = vocab_parallel_cross_entropy(logits, targets[rows], reduction="sum")
        loss.backward()
        out["loss_share"] = loss.item()
    return out


def grad_diff(model, reference_grads: dict) -> tuple:
    diffs = {n: (_full(p.grad) - reference_grads[n]).abs().max().item() for n, p in model.named_parameters()}
    return max(diffs.values()), len(diffs) == len(reference_grads)


# ---------------------------------------------------------------- one device


def test_document_positions_restart_at_each_document():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [4, 5, 5, 5, 5, 5, 6, 6]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 1]]


def test_dense_mask_is_causal_inside_documents_only():
    mask = document_mask(torch.tensor([[0, 0, 1, 1, 1]]), "sdpa").dense[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1],
    ]


def test_packed_row_equals_documents_alone_on_one_device():
    alone = documents_alone()
    model = Transformer(ARGS).init_weights(seed=3)
    result = compare_packed(model, alone, range(len(ROWS)))
    assert result["logits"] <= TOL, f"packed logits differ from the documents alone by {result['logits']:.3g}"
    assert abs(result["loss_share"] - alone["loss"]) <= TOL * abs(alone["loss"])
    worst, complete = grad_diff(model, alone["grads"])
    assert complete and worst <= TOL, f"a gradient differs by {worst:.3g}"


def test_flex_kernel_equals_the_dense_mask_on_cpu_forward():
    # flex attention has no CPU backward; its forward is checked here, its backward on GPU
    alone = documents_alone()
    model = Transformer(ARGS).init_weights(seed=3)
    result = compare_packed(model, alone, range(len(ROWS)), kernel="flex", backward=False)
    assert result["logits"] <= TOL, f"flex-kernel logits differ by {result['logits']:.3g}"


def test_one_document_per_row_equals_no_document_ids():
    tokens, _, _ = packed_batch()
    model = Transformer(ARGS).init_weights(seed=3)
    with torch.no_grad():
        plain = model(tokens)
        masked = model(tokens, document_ids=torch.full_like(tokens, 7))
    assert (plain - masked).abs().max().item() <= TOL


def test_attention_in_runs_of_queries_equals_one_call_over_the_whole_square(monkeypatch):
    """CPU attention in runs of queries, each scored against the keys up to its last query
    (llama/masks.py; runs of 128, here of 5 so that a 16-token row has four, the last of
    one query): plain causal logits and gradients equal one is_causal call, and packed rows
    still equal their documents alone, each run in one call; 1e-5."""
    import llama.masks as masks

    tokens, targets, _ = packed_batch()

    def causal_run():
        model = Transformer(ARGS).init_weights(seed=3)
        logits = model(tokens)
        vocab_parallel_cross_entropy(logits, targets, reduction="sum").backward()
        return logits.detach(), {n: p.grad for n, p in model.named_parameters()}

    monkeypatch.setattr(masks, "QUERY_RUN", 10**6)
    assert masks.causal_mask(SEQ, "cpu") is None
    one_call, alone = causal_run(), documents_alone()

    monkeypatch.setattr(masks, "QUERY_RUN", 5)
    assert masks.causal_mask(SEQ, "cpu").key_prefixes == ((5, 5), (5, 10), (5, 15), (1, 16))
    in_runs = causal_run()
    assert (in_runs[0] - one_call[0]).abs().max().item() <= TOL
    assert max((in_runs[1][n] - g).abs().max().item() for n, g in one_call[1].items()) <= TOL

    model = Transformer(ARGS).init_weights(seed=3)
    result = compare_packed(model, alone, range(len(ROWS)))
    assert result["logits"] <= TOL, f"packed logits in runs differ from the documents alone by {result['logits']:.3g}"
    worst, complete = grad_diff(model, alone["grads"])
    assert complete and worst <= TOL, f"a gradient differs by {worst:.3g}"


def test_block_masks_are_built_by_one_compiled_create_block_mask(monkeypatch):
    """On CUDA create_block_mask runs compiled: torch.compile wraps it once per process,
    not once per forward, and dynamo traces it once for the mask function's code however
    the captured ids change (a new closure every forward). On CPU the CUDA branch is taken
    by hand, with dynamo's eager backend (tracing without inductor); the block masks equal
    eager create_block_mask's."""
    import functools

    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask

    import llama.masks as masks

    compiles, real_compile = [], torch.compile

    def counting_compile(fn, **options):
        compiles.append(fn)
        return real_compile(fn, **{**options, "backend": "eager"})

    eager = functools.partial(create_block_mask, B=len(ROWS), H=None, Q_LEN=SEQ, KV_LEN=SEQ, device="cpu")
    monkeypatch.setattr(masks, "compiles_block_masks", lambda device: True)
    monkeypatch.setattr(masks, "_compiled_create_block_mask", None)
    monkeypatch.setattr(torch, "compile", counting_compile)
    torch._dynamo.reset()
    counters.clear()
    for lengths in (ROWS, ([8, 8], [3, 13])):
        ids = torch.tensor([[d for d, n in enumerate(row) for _ in range(n)] for row in lengths])
        block = document_mask(ids, "flex").block
        want = eager(lambda b, h, q, k: (ids[b, q] == ids[b, k]) & (q >= k))
        assert torch.equal(block.to_dense(), want.to_dense())
    assert compiles == [create_block_mask]
    assert counters["stats"]["unique_graphs"] == 1

    positions = torch.tensor([0, 1, 6, 7])  # cp rank 0 of 2 on 8 tokens: chunks 0 and 3
    block = masks.context_parallel_mask(positions, 8, kernel="flex").block
    want = create_block_mask(lambda b, h, q, k: positions[q] >= k, None, None, 4, 8, device="cpu")
    assert torch.equal(block.to_dense(), want.to_dense())
    assert compiles == [create_block_mask]


def test_bad_document_ids_get_one_clear_line():
    tokens, _, ids = packed_batch()
    model = Transformer(ARGS).init_weights(seed=3)
    cases = [
        (ids[:, :-1], "shaped like tokens"),
        (ids.float(), "integer tensor"),
    ]  # not the values (non-decreasing rows): reading them would sync the device every forward;
    # the datasets number documents along each row by construction
    for bad, fragment in cases:
        with pytest.raises(ValueError, match=fragment):
            model(tokens, document_ids=bad)
    with pytest.raises(ValueError, match="KV-cache"):
        model(tokens[:1], 0, model.new_kv_cache(1, SEQ), document_ids=ids[:1])


# ---------------------------------------------------------------- tp, sequence parallel, 2D


def _parallel_worker(alone_all: dict, alone_by_row: dict) -> dict:
    import torch.distributed as dist

    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh, dp_rank

    mesh = build_mesh(2)  # ("dp", "tp") = 2 x 2 on 4 ranks
    out = {}
    for sp in (False, True):
        with torch.device("meta"):
            model = Transformer(ARGS, mesh["tp"], sequence_parallel=sp)
        model.init_weights(seed=3)
        result = compare_packed(model, alone_all, range(len(ROWS)))
        reduce_partial_gradients(model)
        result["loss"] = abs(result.pop("loss_share") - alone_all["loss"])
        result["grad"], result["complete"] = grad_diff(model, alone_all["grads"])
        if not sp:
            result["flex_logits"] = compare_packed(model, alone_all, range(len(ROWS)), "flex", backward=False)["logits"]
        out[f"tp2 sp={sp}"] = result

    # 2D: each dp rank trains on its own packed row; FSDP sums the gradients over dp
    model = build_parallel_model(ARGS, mesh, sequence_parallel=True, seed=3)
    row = dp_rank(mesh)
    result = compare_packed(model, alone_by_row[row], [row])
    share = torch.tensor([result.pop("loss_share")], dtype=torch.float64)
    dist.all_reduce(share, group=mesh["dp"].get_group())
    result["loss"] = abs(share.item() - alone_all["loss"])
    result["grad"], result["complete"] = grad_diff(model, alone_all["grads"])
    out["2x2 fsdp sp=True"] = result
    return out


def test_packed_rows_equal_documents_alone_at_tp2_with_sequence_parallel_and_in_2d():
    alone_all = documents_alone()
    alone_by_row = [documents_alone([r]) for r in range(len(ROWS))]
    for rank, results in enumerate(run_on_ranks(_parallel_worker, 4, alone_all, alone_by_row)):
        for case, r in results.items():
            where = f"rank {rank}, {case}"
            assert r["logits"] <= TOL, f"{where}: logits differ by {r['logits']:.3g}"
            assert r["loss"] <= TOL * abs(alone_all["loss"]), f"{where}: loss differs by {r['loss']:.3g}"
            assert r["complete"] and r["grad"] <= TOL, f"{where}: a gradient differs by {r['grad']:.3g}"
            if "flex_logits" in r:
                assert r["flex_logits"] <= TOL, f"{where}: flex-kernel logits differ by {r['flex_logits']:.3g}"
