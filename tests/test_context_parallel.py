"""Context parallelism (parallel/context.py): the sequence split over cp ranks in load-
balanced chunks computes what one device computes on the whole sequence: the logits
(gathered back), the loss (normalised by the global token count) and every parameter
gradient (summed over cp ranks), alone, with tp inside each cp rank, and with packed
documents.

Tolerances: fp32; 1e-5 absolute on logits and gradients, relative on the loss."""

import pytest
import torch

from llama import ModelArgs, Transformer
from parallel.context import (
    check_cp_divides, key_prefixes_for_rank, positions_for_rank, rank_chunks, restore_order, split_for_rank)
from parallel.layers import reduce_partial_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks

TOL = 1e-5
ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
SEQ = 16
# document lengths per row: documents that cross chunk and rank boundaries, a one-token one
DOCUMENTS = ([5, 7, 4], [1, 9, 6])


def batch(seed: int = 0):
    """tokens, targets (some ignored) and document ids, (2, SEQ) each."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ARGS.vocab_size, (2, SEQ), generator=gen)
    targets = torch.randint(0, ARGS.vocab_size, (2, SEQ), generator=gen)
    targets[0, 2] = targets[1, 13] = -100
    document_ids = torch.tensor([[d for d, n in enumerate(lengths) for _ in range(n)] for lengths in DOCUMENTS])
    return tokens, targets, document_ids


def one_device(with_documents: bool) -> dict:
    torch.manual_seed(0)
    tokens, targets, document_ids = batch()
    model = Transformer(ARGS).init_weights(seed=3)
    logits = model(tokens, document_ids=document_ids if with_documents else None)
    loss = vocab_parallel_cross_entropy(logits, targets)
    loss.backward()
    return {
        "logits": logits.detach(),
        "loss": loss.item(),
        "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
    }


# ---------------------------------------------------------------- the split, one process


def test_rank_r_holds_chunks_r_and_its_mirror_and_gathering_restores_the_sequence():
    x = torch.arange(2 * SEQ).view(1, SEQ, 2)
    for cp in (1, 2, 4):
        chunk = SEQ // (2 * cp)
        parts = [split_for_rank(x, cp, r) for r in range(cp)]
        for r, part in enumerate(parts):
            first, second = rank_chunks(cp, r)
            assert (first, second) == (r, 2 * cp - 1 - r)
            expected = torch.cat([x[:, first * chunk : (first + 1) * chunk], x[:, second * chunk : (second + 1) * chunk]], 1)
            assert torch.equal(part, expected), f"cp {cp} rank {r} holds the wrong chunks"
            assert torch.equal(positions_for_rank(SEQ, cp, r), expected[0, :, 0] // 2)
        assert torch.equal(restore_order(torch.cat(parts, 1), cp), x), f"cp {cp}: split then gather is not the identity"
    with pytest.raises(ValueError, match="must be a multiple of 2 x --cp = 8"):
        check_cp_divides(12, 4)
    check_cp_divides(7, 1)  # cp 1 cuts nothing: any length


def test_causal_work_is_even_across_cp_ranks():
    # a query at position p reads p + 1 keys under the causal mask
    def causal_pairs(positions):
        return int((positions + 1).sum())

    for cp in (2, 4):
        work = [causal_pairs(positions_for_rank(SEQ, cp, r)) for r in range(cp)]
        assert len(set(work)) == 1, f"cp {cp}: unmasked query-key pairs per rank {work} are uneven"
        contiguous = [causal_pairs(p) for p in torch.arange(SEQ).chunk(cp)]
        assert len(set(contiguous)) > 1  # the measure does tell a naive split apart


def test_each_query_chunk_reads_only_the_keys_up_to_its_own_end():
    # the dense kernel scores chunk c's queries against the first c + 1 chunks of keys only
    for cp in (1, 2, 4):
        for r in range(cp):
            positions = positions_for_rank(SEQ, cp, r)
            prefixes = key_prefixes_for_rank(SEQ, cp, r)
            assert sum(rows for rows, _ in prefixes) == len(positions)
            start = 0
            for rows, keys in prefixes:
                assert positions[start : start + rows].max().item() + 1 == keys, f"cp {cp} rank {r}: {prefixes}"
                start += rows


# ---------------------------------------------------------------- cp ranks against one device


def _cp_worker(cp: int, tp: int, with_documents: bool, reference: dict, sequence_parallel_too: bool = False) -> dict:
    import warnings

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.context import gather_for_cp, split_for_cp

    # the eager flex kernel is the CPU reference here; torch warns that it is not the fast one
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    torch.manual_seed(0)
    names = ("cp", "tp") if tp > 1 else ("cp",)
    mesh = init_device_mesh("cpu", (cp, tp) if tp > 1 else (cp,), mesh_dim_names=names)
    cp_mesh, tp_mesh = mesh["cp"], (mesh["tp"] if tp > 1 else None)
    cp_group = cp_mesh.get_group()
    tokens, targets, document_ids = batch()
    assert torch.equal(gather_for_cp(split_for_cp(tokens, cp_mesh), cp_mesh), tokens)

    out = {}
    for sp in (False, True) if sequence_parallel_too else (False,):
        with torch.device("meta"):
            model = Transformer(ARGS, tp_mesh, sequence_parallel=sp, cp_mesh=cp_mesh)
        model.init_weights(seed=3)
        local_ids = split_for_cp(document_ids, cp_mesh) if with_documents else None
        logits = model(split_for_cp(tokens, cp_mesh), document_ids=local_ids)
        local_targets = split_for_cp(targets, cp_mesh)
        # the global mean: this rank's summed token losses over the whole sequence's count
        count = (local_targets != -100).sum().double()
        dist.all_reduce(count, group=cp_group)
        loss = vocab_parallel_cross_entropy(logits, local_targets, reduction="sum") / count
        loss.backward()
        reduce_partial_gradients(model)

        total = loss.detach().double().clone()
        dist.all_reduce(total, group=cp_group)
        full = logits.detach()
        full = full.full_tensor() if hasattr(full, "full_tensor") else full
        gathered = gather_for_cp(full, cp_mesh)
        grad_diffs = {}
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad.clone()
            dist.all_reduce(grad, group=cp_group)  # each cp rank saw part of the sequence
            grad_diffs[name] = (grad - reference["grads"][name]).abs().max().item()
        if not sp:  # the flex kernel's block mask from global positions; on CPU, forward only
            model.attention_kernel = "flex"
            with torch.no_grad():
                flex = model(split_for_cp(tokens, cp_mesh), document_ids=local_ids)
            flex = flex.full_tensor() if hasattr(flex, "full_tensor") else flex
            out["flex kernel, forward"] = {"logits": (gather_for_cp(flex, cp_mesh) - reference["logits"]).abs().max().item()}
        out[f"sp={sp}"] = {
            "logits": (gathered - reference["logits"]).abs().max().item(),
            "loss": abs(total.item() - reference["loss"]),
            "grad": max(grad_diffs.values()),
            "complete": set(grad_diffs) == set(reference["grads"]),
        }
    errors = []
    if tp == 1 and not with_documents:  # misuse gets one clear line, before any collective
        too_long = torch.zeros(1, ARGS.max_seq_len, dtype=torch.long)  # x cp ranks > max_seq_len
        for bad_call, fragment in [
            (lambda: model(tokens[:, :3]), "two equal chunks"),
            (lambda: model(split_for_cp(tokens, cp_mesh), last_only=True), "model built without a cp_mesh"),
            (lambda: model(too_long), "exceeds max_seq_len"),
        ]:
            try:
                bad_call()
                errors.append(f"no error ({fragment})")
            except ValueError as e:
                if fragment not in str(e):
                    errors.append(str(e))
    return {"cases": out, "errors": errors, "collectives": _count_cp_collectives(cp_mesh, with_documents)}


def _count_cp_collectives(cp_mesh, with_documents: bool) -> dict:
    """Collectives of one forward and backward at cp 2 without tp, per op, for 1 and 2 layers."""
    from torch.distributed.tensor.debug import CommDebugMode

    from parallel.context import split_for_cp

    tokens, targets, document_ids = (split_for_cp(t, cp_mesh) for t in batch())
    counts = {}
    for n_layers in (1, 2):
        with torch.device("meta"):
            model = Transformer(ModelArgs(**{**ARGS.to_dict(), "n_layers": n_layers}), cp_mesh=cp_mesh)
        model.init_weights(seed=3)
        with CommDebugMode() as comm:
            logits = model(tokens, document_ids=document_ids if with_documents else None)
            vocab_parallel_cross_entropy(logits, targets, reduction="sum").backward()
        counts[n_layers] = {str(op).split(".")[-1]: n for op, n in comm.get_comm_counts().items()}
    return counts


def check_against_one_device(cp: int, tp: int, with_documents: bool, sequence_parallel_too: bool = False) -> None:
    reference = one_device(with_documents)
    results = run_on_ranks(_cp_worker, cp * tp, cp, tp, with_documents, reference, sequence_parallel_too)
    for rank, result in enumerate(results):
        assert not result["errors"], f"rank {rank}: {result['errors']}"
        if tp == 1:
            # per block: one all-gather of K and V together forward, one reduce-scatter of
            # dK and dV backward; per forward with documents: one all-gather of the ids
            ids = int(with_documents)
            assert result["collectives"] == {
                1: {"all_gather_into_tensor": 1 + ids, "reduce_scatter_tensor": 1},
                2: {"all_gather_into_tensor": 2 + ids, "reduce_scatter_tensor": 2},
            }, f"rank {rank}: collectives per step {result['collectives']}"
        for case, r in result["cases"].items():
            where = f"cp {cp} x tp {tp}, documents={with_documents}, {case}, rank {rank}"
            print(f"{where}: " + ", ".join(f"{k} {v:.2e}" for k, v in r.items() if k != "complete"))
            assert r["logits"] <= TOL, f"{where}: logits differ from one device by {r['logits']:.3g}"
            if "grad" not in r:
                continue
            assert r["loss"] <= TOL * abs(reference["loss"]), f"{where}: loss differs by {r['loss']:.3g}"
            assert r["complete"] and r["grad"] <= TOL, f"{where}: a gradient differs by {r['grad']:.3g}"


@pytest.mark.compat
def test_cp2_equals_one_device_in_logits_loss_and_gradients():
    check_against_one_device(cp=2, tp=1, with_documents=False)


@pytest.mark.compat
def test_cp2_with_tp2_equals_one_device_with_and_without_sequence_parallelism():
    check_against_one_device(cp=2, tp=2, with_documents=False, sequence_parallel_too=True)


@pytest.mark.compat
def test_cp2_with_packed_documents_equals_one_device_with_the_same_documents():
    check_against_one_device(cp=2, tp=1, with_documents=True)
