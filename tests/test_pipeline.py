"""Pipeline parallelism (parallel/pipeline.py): the model cut into stages and run by
torch.distributed.pipelining's 1F1B and interleaved 1F1B schedules computes what one
device computes on the whole batch: the step's loss (normalised by the global token
count) and every parameter's gradient, alone (pp 2), with TP inside each stage
(pp 2 x tp 2), with FSDP over dp around it (pp 2 x dp 2 x tp 2), with packed documents,
and with context parallelism inside the stage (pp 2 x cp 2).

Tolerances: fp32; 1e-5 absolute on the loss and on every gradient element."""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from llama import ModelArgs, Transformer
from parallel.context import split_for_cp
from parallel.losses import vocab_parallel_cross_entropy
from parallel.mesh import batch_mesh, build_mesh, cp_mesh, dp_rank, dp_size
from parallel.pipeline import (
    PipelineConfig, TransformerStage, check_pipeline, rank_stages, stage_layer_counts, stage_layers)
from parallel.spawn import run_on_ranks
from tests.test_mesh import one_line_error

TOL = 1e-5
ARGS = ModelArgs(dim=64, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=16, max_seq_len=32)
SEQ, ROWS, SEED = 16, 8, 3  # the global batch: 8 rows of 16 tokens
DOCUMENTS = [5, 7, 4]  # document lengths of every row, when the run packs documents


def global_batch(with_documents: bool = False):
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ), generator=gen)
    targets = torch.randint(0, ARGS.vocab_size, (ROWS, SEQ), generator=gen)
    targets[0, 2] = targets[5, 13] = targets[7, 0] = -100
    ids = None
    if with_documents:
        ids = torch.tensor([d for d, n in enumerate(DOCUMENTS) for _ in range(n)]).expand(ROWS, SEQ).contiguous()
    return tokens, targets, ids


def one_device(with_documents: bool = False) -> dict:
    tokens, targets, ids = global_batch(with_documents)
    model = Transformer(ARGS).init_weights(seed=SEED)
    tokens_counted = int((targets != -100).sum())
    loss = vocab_parallel_cross_entropy(model(tokens, document_ids=ids), targets, reduction="sum") / tokens_counted
    loss.backward()
    return {"loss": loss.item(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}


def pipelined_step(tp: int, pp: int, cp: int, config: PipelineConfig, sp: bool, with_documents: bool) -> dict:
    """One forward and backward through this rank's stages; returns the step's loss and
    the whole gradients of this rank's parameters."""
    from parallel.pipeline import build_pipeline

    torch.manual_seed(0)
    mesh = build_mesh(tp, pp=pp, cp=cp, device="cpu")
    pipeline = build_pipeline(ARGS, mesh, config, seed=SEED, sequence_parallel=sp)
    tokens, targets, ids = global_batch(with_documents)
    tokens_counted = int((targets != -100).sum())
    rows = slice(dp_rank(mesh) * ROWS // dp_size(mesh), (dp_rank(mesh) + 1) * ROWS // dp_size(mesh))
    tokens, targets = tokens[rows], targets[rows]
    ids = None if ids is None else ids[rows]
    cp_ranks = cp_mesh(mesh)
    tokens, targets = split_for_cp(tokens, cp_ranks), split_for_cp(targets, cp_ranks)
    ids = None if ids is None else split_for_cp(ids, cp_ranks)
    share = pipeline.step(tokens, targets, ids, global_tokens=tokens_counted)
    dist.all_reduce(share, group=batch_mesh(mesh).get_group())
    grads = {}
    for part in pipeline.parts:
        for name, param in part.named_parameters():
            grad = param.grad
            # numpy: tensors would travel to the test process through shared memory that
            # vanishes when the rank exits
            grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).numpy()
    return {"loss": share.item(), "grads": grads, "stages": [sorted(dict(p.named_parameters())) for p in pipeline.parts]}


def check_equal_to_one_device(results: list, expected: dict, what: str) -> None:
    seen = {}
    for result in results:
        assert abs(result["loss"] - expected["loss"]) <= TOL, f"{what}: loss {result['loss']} vs {expected['loss']}"
        for name, grad in result["grads"].items():
            diff = (torch.from_numpy(grad) - expected["grads"][name]).abs().max().item()
            assert diff <= TOL, f"{what}: gradient of {name} differs by {diff:.2e}"
            seen[name] = True
    assert set(seen) == set(expected["grads"]), f"{what}: parameters no stage holds: {set(expected['grads']) - set(seen)}"


# ---------------------------------------------------------------- stages, one process


def test_stages_split_layers_evenly_with_one_fewer_on_the_ends():
    assert stage_layer_counts(126, 16) == [7] + [8] * 14 + [7]  # Llama 3 405B on 16 stages
    assert stage_layer_counts(6, 2) == [3, 3] and stage_layer_counts(6, 4) == [1, 2, 2, 1]
    assert stage_layer_counts(8, 4, fewer_end_layers=False) == [2, 2, 2, 2] and stage_layer_counts(8, 4) == [1, 3, 3, 1]
    assert [list(r) for r in stage_layers(6, 4)] == [[0], [1, 2], [3, 4], [5]]
    assert rank_stages(1, 4, virtual_stages=2) == [1, 5]  # interleaved: each micro-batch loops twice


def test_stage_keeps_the_whole_models_parameter_names():
    with torch.device("meta"):
        whole = {n for n, _ in Transformer(ARGS).named_parameters()}
        parts = [TransformerStage(ARGS, ids, i == 0, i == 2) for i, ids in enumerate(stage_layers(6, 3))]
    names = [{n for n, _ in part.named_parameters()} for part in parts]
    assert set().union(*names) == whole and sum(map(len, names)) == len(whole), "stages must partition the names"
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[2] and "layers.3.attention.wq.weight" in names[1]


def test_pipeline_flags_that_cannot_work_get_one_line_naming_the_flag():
    one_line_error(lambda: check_pipeline(ARGS, 2, PipelineConfig(microbatches=1)), "--pp-microbatches 1 must be at least --pp 2")
    one_line_error(lambda: check_pipeline(ARGS, 2, PipelineConfig(schedule="interleaved")), "--virtual-stages 2 or more")
    one_line_error(lambda: check_pipeline(ARGS, 2, PipelineConfig(schedule="zb")), "unknown --pp-schedule 'zb'")
    one_line_error(lambda: check_pipeline(ARGS, 4, PipelineConfig(virtual_stages=2, schedule="interleaved")),
                   "8 stages is more than 6 layers")
    one_line_error(lambda: check_pipeline(replace(ARGS, tie_word_embeddings=True), 2, PipelineConfig()), "ties its embedding")
    one_line_error(lambda: check_pipeline(ARGS, 1, PipelineConfig(microbatches=4)), "need --pp > 1")
    assert check_pipeline(ARGS, 2, PipelineConfig()) == 2 and check_pipeline(ARGS, 2, PipelineConfig(microbatches=4)) == 4


# ---------------------------------------------------------------- equality with one device

# (name, world, tp, pp, cp, config, sequence parallel, documents)
RUNS = [
    ("pp2-1f1b", 2, 1, 2, 1, PipelineConfig(microbatches=4), False, False),
    ("pp2-interleaved", 2, 1, 2, 1, PipelineConfig(microbatches=4, schedule="interleaved", virtual_stages=2), False, False),
    ("pp2-documents", 2, 1, 2, 1, PipelineConfig(microbatches=2), False, True),
    ("pp2xtp2-sp", 4, 2, 2, 1, PipelineConfig(microbatches=4), True, False),
    ("pp2xcp2-documents", 4, 1, 2, 2, PipelineConfig(microbatches=2), False, True),
    ("pp2xdp2xtp2-1f1b", 8, 2, 2, 1, PipelineConfig(microbatches=2), False, False),
    ("pp2xdp2xtp2-interleaved-sp", 8, 2, 2, 1,
     PipelineConfig(microbatches=2, schedule="interleaved", virtual_stages=2, fewer_end_layers=False), True, False),
]


def pipelined_steps(runs: list) -> dict:
    """Every run of one world size in the same processes: one launch per world size."""
    return {name: pipelined_step(tp, pp, cp, config, sp, docs) for name, _, tp, pp, cp, config, sp, docs in runs}


@pytest.fixture(scope="module")
def launched():
    results = {}

    def get(world: int) -> list:
        if world not in results:
            results[world] = run_on_ranks(pipelined_steps, world, [r for r in RUNS if r[1] == world])
        return results[world]

    return get


@pytest.mark.compat
@pytest.mark.parametrize("run", RUNS, ids=[r[0] for r in RUNS])
def test_pipeline_loss_and_gradients_match_one_device(run, launched):
    name, world, _, _, _, _, _, documents = run
    check_equal_to_one_device([rank[name] for rank in launched(world)], one_device(documents), name)
