"""The planner: closed-form parameter and communication counts on small configs, the
405B plan from the command line in seconds, and one clear line for bad input. That its
numbers equal what a real 2x2 gloo run holds and sends is tested in test_fsdp.py."""

import ctypes
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from llama import PRESETS, ModelArgs
from parallel.plan import (
    ALLOCATOR_SLACK, COMPUTE_EFFICIENCY, CUDA_CONTEXT_BYTES, CUDA_NCCL_BYTES_PER_GROUP, DEFAULTS, MEMORY_ROWS, PEAK_TFLOPS,
    Layout, PipelineConfig, StepConfig, forwards_in_flight, init_fake_world, main, parse_args, pipeline_bubble,
    pipeline_ranks, plan, stage_layer_counts)

ARGS = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32, max_seq_len=64)
L, D, V = ARGS.n_layers, ARGS.dim, ARGS.vocab_size
KV = ARGS.n_kv_heads * ARGS.head_dim
BLOCK = D * (2 * D + 2 * KV) + 3 * D * ARGS.ffn_hidden_dim + 2 * D  # weights of one TransformerBlock
EMBED, HEAD = V * D, D + V * D  # tok_embeddings; norm + output
FP32 = StepConfig(seq_len=32, batch=2, grad_accum=3, sequence_parallel=False, mixed_precision="fp32",
                  activation_checkpointing="none")


def test_fsdp_only_closed_form():
    """dp 4, tp 1: every group gathered in forward, again in backward when resharded
    (blocks, embedding; not norm+output), reduce-scattered once; fp32 throughout."""
    plans = plan(ARGS, 4, tp=1, dp_replicate=2, cfg=FP32)
    total = L * BLOCK + EMBED + HEAD
    assert total == ARGS.num_params()
    full, grad_op, hybrid = plans["full"], plans["grad_op"], plans["hybrid"]
    assert full["params_per_rank"] == grad_op["params_per_rank"] == total // 4
    assert hybrid["params_per_rank"] == total // 2
    a = FP32.grad_accum
    assert full["comm"]["dp"]["all_gather"] == {"calls": a * (2 * L + 2 + 1), "bytes": a * 4 * (2 * L * BLOCK + 2 * EMBED + HEAD),
                                                "wire_bytes": a * 3 * (2 * L * BLOCK + 2 * EMBED + HEAD)}
    assert grad_op["comm"]["dp"]["all_gather"]["bytes"] == a * 4 * total
    assert full["comm"]["dp"]["reduce_scatter"]["bytes"] == grad_op["comm"]["dp"]["reduce_scatter"]["bytes"] == a * 4 * total
    assert hybrid["comm"]["dp_shard"]["reduce_scatter"]["bytes"] == a * 4 * total
    assert hybrid["comm"]["dp_replicate"]["all_reduce"] == {"calls": a * (L + 2), "bytes": a * 4 * total // 2,
                                                           "wire_bytes": a * 4 * total // 2}
    assert "tp" not in full["comm"]
    # memory: fp32 params, fp32 grads, AdamW m and v
    assert (full["param_bytes"], full["grad_bytes"], full["optimizer_bytes"]) == (total, total, 2 * total)
    assert full["gathered_param_bytes"] == 4 * (HEAD + 2 * max(BLOCK, EMBED))
    assert grad_op["gathered_param_bytes"] == 4 * total


def test_tensor_parallel_closed_form_with_sequence_parallelism_and_shared_kv_heads():
    """tp 4 > 2 kv heads, dp 1: wk/wv replicated on every rank; per micro-step 4 all-gathers
    and 4 reduce-scatters of the (batch, seq, dim) activation per block, one pair around
    embedding and head, the loss's statistics all-gather, one all-reduce per partial
    gradient (5 norms, 4 kv projections); FSDP on one rank moves nothing."""
    cfg = replace(FP32, sequence_parallel=True)
    p = plan(ARGS, 4, tp=4, cfg=cfg, strategies=["full"])["full"]
    kv_weights = L * 2 * KV * D
    norms = (2 * L + 1) * D
    assert p["params_per_rank"] == (ARGS.num_params() - kv_weights - norms) // 4 + kv_weights + norms
    a, act = cfg.grad_accum, cfg.batch * cfg.seq_len * D * 4
    stats = 4 * 2 * cfg.batch * cfg.seq_len * 4
    tp = p["comm"]["tp"]
    assert tp["all_gather"]["calls"] == a * (4 * L + 3)
    assert tp["all_gather"]["bytes"] == a * ((4 * L + 2) * act + stats)
    assert tp["reduce_scatter"] == {"calls": a * (4 * L + 2), "bytes": a * (4 * L + 2) * act,
                                    "wire_bytes": a * (4 * L + 2) * act * 3 // 4}
    partial_bytes = a * 4 * (norms + kv_weights)
    clip = 8  # the gradient norm's all-reduce: tp is the whole world here
    assert tp["all_reduce"]["bytes"] == partial_bytes + clip
    assert "all_gather" not in p["comm"].get("dp", {})


def test_activation_estimate_orders_checkpointing_modes_and_scales_with_batch():
    cfg = replace(FP32, sequence_parallel=True, grad_accum=1)
    args = replace(ARGS, n_layers=8)
    act = {mode: plan(args, 4, tp=2, cfg=replace(cfg, activation_checkpointing=mode), strategies=["full"])["full"]["activation_bytes"]
           for mode in ("none", "selective", "full")}
    assert act["none"] > act["selective"] > act["full"] > 0
    double = plan(args, 4, tp=2, cfg=replace(cfg, batch=2 * cfg.batch), strategies=["full"])["full"]["activation_bytes"]
    assert double == 2 * act["none"]


def test_405b_on_16_nodes_of_8_answers_in_seconds():
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "parallel.plan", "--model", "3.1-405b", "--nodes", "16", "--gpus-per-node", "8", "--json"],
        capture_output=True, text=True, check=True,
    )
    elapsed = time.monotonic() - start
    report = json.loads(out.stdout)
    args = PRESETS["3.1-405b"]
    norms = (2 * args.n_layers + 1) * args.dim  # replicated over tp, sharded over dp only
    assert isinstance(report["params_per_rank"], int)
    assert report["params_per_rank"] == (args.num_params() - norms) // 128 + norms // 16
    assert set(report["strategies"]) == {"full", "grad_op", "hybrid", "hybrid_zero2"}
    assert report["tp"] == 8 and report["dp"] == 16
    assert elapsed < 60, f"planner took {elapsed:.1f} s"


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--model", "3.1-8b", "--nodes", "2", "--gpus-per-node", "8", "--tp", "3"], "--tp 3 must divide the world size 16"),
        (["--model", "3.1-8b", "--nodes", "3", "--tp", "8", "--dp-replicate", "2"], "--dp-replicate 2 must divide"),
        (["--model", "3.1-8b", "--strategy", "zero3"], "unknown --strategy 'zero3'"),
        (["--model", "llama-9000"], "unknown --model 'llama-9000'"),
        (["--model", "3.2-3b", "--nodes", "2", "--gpus-per-node", "8", "--tp", "16"], "must divide n_heads 24"),
        (["--model", "3.1-8b", "--nodes", "3", "--tp", "8", "--pp", "2"], "--pp 2 x --cp 1 x --tp 8 = 16 must divide the world size 24"),
        (["--model", "3.1-8b", "--nodes", "2", "--cp", "2", "--seq-len", "6"], "--seq-len 6 must be a multiple of 2 x --cp = 4"),
        (["--model", "3.1-8b", "--nodes", "4", "--pp", "4", "--pp-microbatches", "2"], "--pp-microbatches 2 must be at least --pp 4"),
        (["--model", "3.1-8b", "--nodes", "4", "--pp", "4", "--pp-schedule", "interleaved"], "interleaved needs --virtual-stages 2"),
        (["--model", "3.1-8b", "--nodes", "2", "--pp-microbatches", "4"], "--pp-microbatches, --pp-schedule and --virtual-stages need --pp > 1"),
        (["--model", "3.2-1b", "--nodes", "2", "--pp", "2"], "ties its embedding and LM head"),
        (["--model", "3.1-8b", "--nodes", "8", "--pp", "8", "--pp-schedule", "interleaved", "--virtual-stages", "4"],
         "stages is more than 32 layers can fill"),
    ],
)
def test_bad_input_gets_one_line(capsys, argv, fragment):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and fragment in err, err


def test_help_gives_every_flag_a_line_with_its_default(capsys):
    import re

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", text)[1:]}
    assert {"--nodes", "--json", "--seq-len", "--sequence-parallel", "--gpu-memory", "--micro-batch", "--pp", "--cp",
            "--pp-microbatches", "--pp-schedule", "--virtual-stages", "--pp-fewer-end-layers", "--peak-tflops",
            "--compute-efficiency"} <= entries.keys()
    for flag, entry in entries.items():
        assert flag == "-h" or "(default" in entry or "(required" in entry, entry


def test_4d_flags_default_to_the_2d_plan_and_the_stated_hardware():
    """Without the new flags the planner plans today's 2-D mesh; the estimate's hardware is
    an H100 SXM (989 TFLOP/s) with kernels at 80% of it, unless told otherwise."""
    opts = parse_args(["--model", "3.1-8b"])
    assert (opts.pp, opts.cp, opts.pp_microbatches, opts.pp_schedule, opts.virtual_stages) == (1, 1, None, "1f1b", 1)
    assert opts.pp_fewer_end_layers is True
    assert (opts.peak_tflops, opts.compute_efficiency) == (PEAK_TFLOPS, COMPUTE_EFFICIENCY) == (989.0, 0.80)
    assert Layout().microbatches == 1 and Layout(pp=4).microbatches == 4


# ---------------------------------------------------------------- defaults


def test_defaults_are_train_py_defaults():
    """Planning with no flags plans what `train.py` with no flags runs, in bf16, train.py's
    default on CUDA."""
    from llama.training.flags import parse_args as train_py_flags

    opts = train_py_flags([])
    cfg = StepConfig()
    assert (cfg.seq_len, cfg.batch, cfg.grad_accum) == (opts.seq_len, opts.micro_batch, opts.grad_accum)
    assert cfg.sequence_parallel == opts.sequence_parallel
    assert cfg.activation_checkpointing == opts.activation_checkpointing
    assert cfg.document_masking == opts.document_masking
    assert DEFAULTS["strategy"] == opts.strategy
    assert cfg.mixed_precision == "bf16"
    planner = parse_args(["--model", "3.2-1b"])
    assert (planner.seq_len, planner.batch, planner.strategy, planner.sequence_parallel) == (
        opts.seq_len, opts.micro_batch, opts.strategy, opts.sequence_parallel)


# ---------------------------------------------------------------- memory terms


def test_fsdp_gradient_buffers_are_one_block_unsharded_plus_its_fp32_reduce_scatter_input():
    """bf16: the block computing holds its unsharded bf16 gradients while the previous
    block's fp32 reduce-scatter input is in flight; a tied embedding's gradient (the root
    group) stays unsharded until backward ends."""
    bf16 = replace(FP32, mixed_precision="bf16")
    p = plan(ARGS, 4, tp=1, cfg=bf16, strategies=["full"])["full"]
    assert BLOCK > max(EMBED, HEAD)
    assert (p["unsharded_grad_bytes"], p["reduce_scatter_bytes"]) == (2 * BLOCK, 4 * BLOCK)
    tied = plan(replace(ARGS, tie_word_embeddings=True), 4, tp=1, cfg=bf16, strategies=["full"])["full"]
    assert tied["unsharded_grad_bytes"] == 2 * (BLOCK + EMBED + D)  # root: embedding + final norm
    fp32 = plan(ARGS, 4, tp=1, cfg=FP32, strategies=["full"])["full"]
    assert (fp32["unsharded_grad_bytes"], fp32["reduce_scatter_bytes"]) == (4 * BLOCK, 4 * BLOCK)


def test_what_the_allocator_does_not_count_is_added_to_the_total():
    """2x2: three NCCL communicators (dp, tp, world), one CUDA context, slack on the peak."""
    p = plan(ARGS, 4, tp=2, cfg=FP32, strategies=["full"])["full"]
    allocated = sum(p.get(key, 0) for key, _ in MEMORY_ROWS
                    if key not in OUTSIDE and not key.endswith(("allocated_bytes", "total_bytes")))
    assert p["allocated_bytes"] == allocated
    assert p["nccl_bytes"] == 3 * CUDA_NCCL_BYTES_PER_GROUP
    assert p["cuda_context_bytes"] == CUDA_CONTEXT_BYTES
    assert p["allocator_slack_bytes"] == round(ALLOCATOR_SLACK * allocated)
    assert p["total_bytes"] == allocated + sum(p[key] for key in OUTSIDE)


OUTSIDE = ("allocator_slack_bytes", "cuda_context_bytes", "nccl_bytes")


def test_attention_workspace_is_linear_in_sequence_without_document_masks():
    """Fused kernels hold no s x s scores: doubling s doubles the workspace. A document
    block mask adds 4 int32 tensors of batch x ceil(s/128)^2."""
    cfg = replace(FP32, seq_len=512, document_masking=False)
    args = replace(ARGS, max_seq_len=1024)
    work = {s: plan(args, 4, tp=2, cfg=replace(cfg, seq_len=s), strategies=["full"])["full"]["attention_workspace_bytes"]
            for s in (512, 1024)}
    assert work[1024] == 2 * work[512]
    masked = plan(args, 4, tp=2, cfg=replace(cfg, document_masking=True), strategies=["full"])["full"]
    assert masked["attention_workspace_bytes"] - work[512] == 4 * 4 * cfg.batch * (512 // 128) ** 2


def test_gpu_memory_answers_fits_and_the_largest_micro_batch():
    """The largest micro-batch fits and one more does not; the line and the JSON say so."""
    cfg = replace(FP32, batch=1, grad_accum=1)
    one = plan(ARGS, 4, tp=2, cfg=cfg, strategies=["full"])["full"]
    gib = (one["total_bytes"] + 10.5 * one["activation_bytes"]) / 2**30  # room for ~11 more sequences
    p = plan(ARGS, 4, tp=2, cfg=cfg, strategies=["full"], gpu_memory=gib)["full"]
    largest = p["max_micro_batch"]
    assert p["fits"] and largest > 1
    at = {b: plan(ARGS, 4, tp=2, cfg=replace(cfg, batch=b), strategies=["full"])["full"]["total_bytes"] for b in (largest, largest + 1)}
    assert at[largest] <= p["gpu_memory_bytes"] < at[largest + 1]
    too_small = plan(ARGS, 4, tp=2, cfg=cfg, strategies=["full"], gpu_memory=one["total_bytes"] / 2**30 / 2)["full"]
    assert not too_small["fits"] and too_small["max_micro_batch"] == 0


def test_gpu_memory_on_the_command_line(capsys):
    argv = ["--model", "3.2-1b", "--nodes", "1", "--gpus-per-node", "1", "--seq-len", "2048"]
    assert main(argv + ["--gpu-memory", "79.1"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("full: fits (") and "the largest micro-batch that fits is" in last, last
    assert main(argv + ["--gpu-memory", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] is False and report["max_micro_batch"] == 0
    assert report["gpu_memory_bytes"] == 8 * 2**30
    assert main(argv + ["--gpu-memory", "0"]) == 2
    assert "--gpu-memory 0.0 must be a positive number" in capsys.readouterr().err


# ---------------------------------------------------------------- against a real run's memory

# big enough that each rank's params (~33 MB), grads and AdamW states dwarf allocator noise
RSS_ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=64)
RSS_CFG = StepConfig(seq_len=16, batch=1, sequence_parallel=True, mixed_precision="fp32", activation_checkpointing="none")
RSS_RTOL = 0.10


def resident_bytes() -> int:
    """This process's resident set, after handing freed heap pages back to the system (so
    that temporaries freed since the last reading do not count)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _train_step(args, mesh, cfg) -> dict:
    """Resident bytes before building, after materialising the model, after its first
    backward and first AdamW step, and after letting go of gradients, AdamW state, model."""
    from parallel.fsdp import build_parallel_model
    from parallel.train_utils import token_loss

    rss = {"before": resident_bytes()}
    model = build_parallel_model(args, mesh, strategy="full", sequence_parallel=cfg.sequence_parallel)
    rss["materialised"] = resident_bytes()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=gen)
    token_loss(model(tokens[:, :-1]), tokens[:, 1:], cfg.batch * cfg.seq_len).backward()
    rss["backward"] = resident_bytes()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    rss["step"] = resident_bytes()
    opt.zero_grad(set_to_none=True)
    rss["no grads"] = resident_bytes()
    opt.state.clear()
    rss["no optimizer state"] = resident_bytes()
    return rss


def _own_mappings_for_large_blocks() -> None:
    """Every block of 64 KiB or more gets a mapping of its own, returned whole when freed.
    glibc's default raises that threshold as large blocks are freed, after which state
    tensors land in the heap among small live blocks, and freeing them hands back only
    the pages that nothing else touches (12% short of the AdamW term, now and then)."""
    M_MMAP_THRESHOLD = -3
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 << 10)  # a fixed value also stops the raising


def _measure_memory_terms(args, cfg):
    from parallel.mesh import build_mesh

    _own_mappings_for_large_blocks()
    mesh = build_mesh(tp=2, device="cpu")
    # a throwaway step first: thread pools, gloo buffers and lazily loaded code would
    # otherwise land in the first readings
    _train_step(replace(args, n_layers=1, dim=64, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32), mesh, cfg)
    rss = _train_step(args, mesh, cfg)
    # The first forward and backward leave ~20 MB per rank that stays after the model is
    # gone (FSDP's and gloo's buffers), so the reading after backward holds more than the
    # gradients; what freeing the gradients and the AdamW state gives back is theirs alone.
    return {
        "param_bytes": rss["materialised"] - rss["before"],
        "grad_bytes": rss["step"] - rss["no grads"],
        "optimizer_bytes": rss["no grads"] - rss["no optimizer state"],
        "optimizer_bytes (first step's growth)": rss["step"] - rss["backward"],
    }


def test_parameter_gradient_and_optimizer_terms_match_resident_memory_of_a_2x2_run():
    """4 gloo ranks, full, 2x2, fp32: rank 0's resident set grows by the planner's parameter
    term when the model is materialised and by its AdamW term in the first optimizer step,
    and shrinks by its gradient and AdamW terms when those are let go; within 10%."""
    from parallel.spawn import run_on_ranks

    measured = run_on_ranks(_measure_memory_terms, 4, RSS_ARGS, RSS_CFG)[0]
    planned = plan(RSS_ARGS, 4, tp=2, cfg=RSS_CFG, strategies=["full"])["full"]
    for key, got in measured.items():
        key = key.split(" ")[0]
        print(f"{key}: measured {got:,} planned {planned[key]:,} ({100 * (got / planned[key] - 1):+.1f}%)")
    for key, got in measured.items():
        key = key.split(" ")[0]
        assert got == pytest.approx(planned[key], rel=RSS_RTOL), (key, got, planned[key])


# ---------------------------------------------------------------- 4-D: pipeline and context parallelism


def test_2d_plan_is_unchanged_by_pp_1_cp_1():
    """pp 1 and cp 1 plan exactly what the 2-D planner planned before pp and cp existed:
    the numbers of docs/2d-parallelism.md's 16-node 405B rows, byte for byte (the plan only
    gains its `estimate`)."""
    cfg = StepConfig(seq_len=8192, batch=1, sequence_parallel=True, activation_checkpointing="full")
    plans = plan(PRESETS["3.1-405b"], 128, 8, 2, cfg, layout=Layout(pp=1, cp=1))
    before = {  # (params/rank, gathered, unsharded grads, activations, attention, total), wire bytes per dim
        "full": ((3170956288, 2119335936, 796983296, 7190085632, 134807552, 73835099750),
                 {"dp": 380022220800, "tp": 326514098176, "world": 16}),
        "grad_op": ((3170956288, 101470601216, 796983296, 7190085632, 134807552, 188089054822),
                    {"dp": 285386065920, "tp": 326514098176, "world": 16}),
        "hybrid": ((6341912576, 2119335936, 796983296, 7190085632, 134807552, 132717566362),
                   {"dp_shard": 354687406080, "dp_replicate": 25367650304, "tp": 326514098176, "world": 16}),
        "hybrid_zero2": ((6341912576, 101470601216, 796983296, 7190085632, 134807552, 246971521434),
                         {"dp_shard": 266360328192, "dp_replicate": 25367650304, "tp": 326514098176, "world": 16}),
    }
    keys = ("params_per_rank", "gathered_param_bytes", "unsharded_grad_bytes", "activation_bytes",
            "attention_workspace_bytes", "total_bytes")
    for name, (memory, wire) in before.items():
        p = plans[name]
        assert tuple(p[key] for key in keys) == memory, name
        assert p["comm_wire_bytes"] == wire, name
        assert p["mesh"] == ({"dp": 16, "tp": 8} if name in ("full", "grad_op") else {"dp_replicate": 2, "dp_shard": 8, "tp": 8})
        assert "cp_kv_bytes" not in p and "pp_rank" not in p
        assert not any(dim.startswith(("pp", "cp")) or "x cp" in dim for dim in p["comm"])


def test_stage_split_gives_first_and_last_stage_one_layer_fewer():
    """Llama 3 405B on 16 stages: 7, 8 x 14, 7 = 126 layers; 32 virtual stages: 3, 4 x 30, 3.
    Where an even split would differ (8 layers on 4 stages: 2, 2, 2, 2) the ends lose one."""
    assert stage_layer_counts(126, 16) == [7] + [8] * 14 + [7]
    assert sum(stage_layer_counts(126, 16)) == 126
    assert stage_layer_counts(126, 32) == [3] + [4] * 30 + [3]
    assert stage_layer_counts(8, 4) == [1, 3, 3, 1]
    assert stage_layer_counts(8, 4, fewer_end_layers=False) == [2, 2, 2, 2]
    assert stage_layer_counts(126, 1) == [126]
    ranks = pipeline_ranks(126, Layout(pp=16, pipeline=PipelineConfig(microbatches=32)))
    assert [len(r.layers) for r in ranks] == [7] + [8] * 14 + [7]
    assert sorted(layer for r in ranks for layer in r.layers) == list(range(126))
    assert ranks[0].first and not ranks[0].last and ranks[-1].last and not ranks[-1].first
    interleaved = pipeline_ranks(126, Layout(pp=16, pipeline=PipelineConfig(32, "interleaved", 2)))
    assert interleaved[0].stages == (0, 16) and [len(r) for r in interleaved[0].stage_layers] == [3, 4]
    assert interleaved[-1].stages == (15, 31) and interleaved[-1].last and not interleaved[0].last


def _pipeline_makespan(orders: dict, n_stages: int, virtual_stages: int) -> tuple:
    """Run per-rank op orders [(F|B, stage, micro-batch)] with a forward taking 1 / v and a
    backward 2 / v per stage (one rank's share of a micro-batch: 3); a forward waits for the
    previous stage's, a backward for the next stage's (the last stage's for its forward).
    Returns (makespan, most forwards any rank held before their backward, per rank)."""
    done, free, pos = {}, dict.fromkeys(orders, 0.0), dict.fromkeys(orders, 0)
    held = {r: [] for r in orders}
    peak = {r: () for r in orders}
    while any(pos[r] < len(orders[r]) for r in orders):
        moved = False
        for r, ops in orders.items():
            while pos[r] < len(ops):
                kind, stage, mb = ops[pos[r]]
                if kind == "F":
                    deps = [("F", stage - 1, mb)] if stage > 0 else []
                else:
                    deps = [("B", stage + 1, mb)] if stage < n_stages - 1 else [("F", stage, mb)]
                if not all(d in done for d in deps):
                    break
                start = max([free[r]] + [done[d] for d in deps])
                free[r] = done[(kind, stage, mb)] = start + (1.0 if kind == "F" else 2.0) / virtual_stages
                if kind == "F":
                    held[r].append(stage)
                else:
                    held[r].remove(stage)
                if len(held[r]) > len(peak[r]):
                    peak[r] = tuple(held[r])
                pos[r] += 1
                moved = True
        assert moved, "the schedule deadlocks"
    return max(free.values()), peak


def _1f1b_order(rank: int, pp: int, m: int) -> list:
    """torch's Schedule1F1B._step_microbatches: min(m, pp - rank) forwards, then one
    backward and one forward at a time. (Its `pipeline_order`, for display, misnumbers the
    last stage's micro-batches in torch 2.13, so the test follows the code that runs.)"""
    warmup = min(m, pp - rank)
    ops = [("F", rank, j) for j in range(warmup)]
    for j in range(m):
        ops.append(("B", rank, j))
        if warmup + j < m:
            ops.append(("F", rank, warmup + j))
    return ops


def _interleaved_orders(pp: int, m: int, v: int) -> dict:
    """The per-rank orders torch.distributed.pipelining's ScheduleInterleaved1F1B runs,
    computed by torch on a fake world of pp ranks."""
    from torch import nn
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, ScheduleInterleaved1F1B

    init_fake_world(pp)
    try:
        stages = [PipelineStage(nn.Linear(2, 2), stage_index=k * pp, num_stages=pp * v, device=torch.device("cpu"))
                  for k in range(v)]
        schedule = ScheduleInterleaved1F1B(stages, n_microbatches=m)
        return {r: [(a.computation_type.value, a.stage_index, a.microbatch_index) for a in actions
                    if a is not None and a.computation_type.value in ("F", "B")]
                for r, actions in schedule.pipeline_order.items()}
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("pp, m, v", [(4, 4, 1), (4, 8, 1), (16, 32, 1), (4, 8, 2), (4, 12, 2), (2, 8, 4), (4, 6, 2)])
def test_pipeline_bubble_and_forwards_in_flight_match_the_schedules_torch_runs(pp, m, v):
    """Simulating torch's own op orders with equal stages: the idle fraction is
    (p-1)/(m+p-1) for 1F1B and (p-1)/(v m+p-1) interleaved, and each rank holds at most the
    forwards, of the stages, that `forwards_in_flight` says."""
    orders = {r: _1f1b_order(r, pp, m) for r in range(pp)} if v == 1 else _interleaved_orders(pp, m, v)
    makespan, peak = _pipeline_makespan(orders, pp * v, v)
    work = 3.0 * m  # per rank: m micro-batches of v pieces of 1/v forward + 2/v backward
    assert 1 - work / makespan == pytest.approx(pipeline_bubble(pp, m, v), abs=1e-12)
    for r in range(pp):
        assert peak[r] == forwards_in_flight(r, pp, m, v), r


def test_interleaved_with_fewer_micro_batches_than_stages_idles_more_so_the_planner_refuses_it():
    """torch runs interleaved 1F1B with m < p, but then a rank waits between its virtual
    stages beyond the formula's bubble; the planner asks for m >= p."""
    makespan, _ = _pipeline_makespan(_interleaved_orders(4, 3, 2), 8, 2)
    assert 1 - 3.0 * 3 / makespan > pipeline_bubble(4, 3, 2) + 0.05
    assert main(["--model", "3.1-8b", "--nodes", "4", "--pp", "4", "--pp-microbatches", "3", "--pp-schedule", "interleaved",
                 "--virtual-stages", "2"]) == 2


def test_pipeline_bubble_values():
    assert pipeline_bubble(16, 32) == 15 / 47  # Llama 3 on 8,192 GPUs, 1F1B
    assert pipeline_bubble(16, 16) == 15 / 31  # on 16,384 GPUs: half the micro-batches per dp rank
    assert pipeline_bubble(16, 32, 2) == 15 / 79
    assert pipeline_bubble(1, 7) == 0.0


LLAMA3_405B = [  # the Llama 3 paper's 405B layouts: GPUs, pp, cp, seq, micro-batches per dp rank (16M tokens/step)
    (8192, 16, 1, 8192, 32),
    (16384, 16, 1, 8192, 16),
    (16384, 16, 16, 131072, 16),
]
H100 = 79.1  # GiB an 80 GB H100 offers


def _llama3(gpus, pp, cp, seq, m, activation_checkpointing="full"):
    cfg = StepConfig(seq_len=seq, batch=1, sequence_parallel=True, activation_checkpointing=activation_checkpointing)
    layout = Layout(pp=pp, cp=cp, pipeline=PipelineConfig(microbatches=m))
    return plan(PRESETS["3.1-405b"], gpus, 8, cfg=cfg, strategies=["grad_op"], gpu_memory=H100, layout=layout)["grad_op"]


def test_llama3_405b_layouts_fit_an_80gb_h100_and_smaller_ones_do_not():
    """TP 8 x PP 16 with DP 64 (8K), DP 128 (8K), CP 16 x DP 8 (128K), one sequence per
    micro-batch and full activation checkpointing: each fits in 79.1 GiB, with the bubble
    of its micro-batches. The same pipeline on 16 nodes (dp 1: nothing to shard the stage's
    optimizer state over) does not fit, nor does the first layout without checkpointing."""
    for gpus, pp, cp, seq, m in LLAMA3_405B:
        p = _llama3(gpus, pp, cp, seq, m)
        assert p["fits"] and p["total_bytes"] <= H100 * 2**30, (gpus, cp, p["total_bytes"] / 2**30)
        assert p["estimate"]["bubble"] == pipeline_bubble(pp, m)
        assert p["estimate"]["tokens_per_step"] == 2048 * 8192  # 16M tokens, as in the paper
        assert p["mesh"] == ({"pp": 16, "dp": gpus // (pp * cp * 8), "tp": 8} if cp == 1
                             else {"pp": 16, "dp": 8, "cp": 16, "tp": 8})
    assert not _llama3(128, 16, 1, 8192, 16)["fits"]
    assert not _llama3(8192, 16, 1, 8192, 32, activation_checkpointing="none")["fits"]


def test_llama3_8192_gpu_layout_holds_its_stage_in_closed_form():
    """TP 8 x PP 16 x DP 64, 32 micro-batches of one 8K sequence, full checkpointing: the
    binding rank is pp rank 1 (8 layers; 15 forwards in flight against rank 0's 16 of 7).
    Its 8 blocks' shards over tp 8 x dp 64 as fp32 params, grads and AdamW m, v; the stage
    gathered in bf16 and its gradients accumulated unsharded in fp32 (plus one block's bf16
    gradient and fp32 reduce-scatter input); 15 x 8 checkpointed block inputs (B s/tp h
    bf16) and one block rebuilt in full."""
    args = PRESETS["3.1-405b"]
    p = _llama3(8192, 16, 1, 8192, 32)
    h, f, s, q, kv = args.dim, args.ffn_hidden_dim // 8, 8192, 16 * args.head_dim, 1 * args.head_dim
    block = (block_params_of(args) - 2 * h) // (8 * 64) + 2 * h // 64  # one block's shard on a rank
    assert (p["pp_rank"], p["layers_on_rank"], p["forwards_in_flight"]) == (1, 8, 15)
    assert p["params_per_rank"] == 8 * block
    assert (p["param_bytes"], p["grad_bytes"], p["optimizer_bytes"]) == (32 * block, 32 * block, 64 * block)
    assert p["gathered_param_bytes"] == 2 * 8 * 64 * block
    assert (p["unsharded_grad_bytes"], p["reduce_scatter_bytes"]) == (4 * 8 * 64 * block + 2 * 64 * block, 4 * 64 * block)
    norm, region = 6 * (s // 8) * h, 2 * s * h
    full_block = 2 * norm + 2 * region + 2 * s * q + 4 * s * q + 4 * 16 * s + 8 * s * f + 2 * 2 * s * kv
    assert p["activation_bytes"] == 15 * 8 * 2 * (s // 8) * h + full_block


def block_params_of(args) -> int:
    kv = args.n_kv_heads * args.head_dim
    return args.dim * (2 * args.dim + 2 * kv) + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


TINY4 = replace(ARGS, n_layers=4, max_seq_len=64)
TINY_CFG = StepConfig(seq_len=32, batch=2, grad_accum=1, sequence_parallel=False, mixed_precision="fp32",
                      activation_checkpointing="none", document_masking=False)


def test_context_parallel_ranks_hold_seq_over_cp_and_gather_whole_keys_and_values():
    """cp 2 on a 2-rank world (tp 1, dp 1): per block the rank keeps its half of the
    sequence's activations and the whole sequence's K and V (2 x 4 x B x S x kv bytes),
    all-gathers K and V in forward and reduce-scatters their gradients in backward; FSDP
    shards over dp x cp = 2."""
    one = plan(TINY4, 1, 1, cfg=TINY_CFG, strategies=["full"])["full"]
    two = plan(TINY4, 2, 1, cfg=TINY_CFG, strategies=["full"], layout=Layout(cp=2))["full"]
    B, S, L = TINY_CFG.batch, TINY_CFG.seq_len, TINY4.n_layers
    kv = 4 * B * S * KV  # K (or V) of the whole sequence, fp32
    assert two["cp_kv_bytes"] == L * 2 * kv
    assert 2 * two["activation_bytes"] == one["activation_bytes"] - L * 2 * kv  # the rest is linear in the tokens
    assert two["mesh"] == {"dp": 1, "cp": 2, "tp": 1}
    dp2 = plan(TINY4, 2, 1, cfg=TINY_CFG, strategies=["full"])["full"]
    assert two["params_per_rank"] == dp2["params_per_rank"] < one["params_per_rank"]
    cp = two["comm"]["cp"]
    assert cp["all_gather"] == {"calls": 2 * L, "bytes": 2 * L * kv, "wire_bytes": L * kv}
    assert cp["reduce_scatter"] == {"calls": 2 * L, "bytes": 2 * L * kv, "wire_bytes": L * kv}
    assert "dp x cp" in two["comm"]  # FSDP's gathers and reduce-scatters run over dp x cp


def test_pipeline_ranks_hold_their_stage_and_send_activations_both_ways():
    """pp 2 x dp 2 (tp 1), 4 layers split 2 + 2 (no lighter ends), 4 micro-batches, fp32:
    stage 0 holds the embedding, stage 1 the head, each sharded over dp 2. The first stage
    holds 2 micro-batches in flight, the last 1, so the first is the plan's rank: it sends
    one (B, S, dim) activation per micro-batch; its whole stage stays gathered and its
    gradients unsharded until the step's end, where each FSDP group is reduced once; `full`
    gathers each group m + 1 times, `grad_op` once."""
    layout = Layout(pp=2, pipeline=PipelineConfig(microbatches=4, fewer_end_layers=False))
    plans = plan(TINY4, 4, 1, cfg=TINY_CFG, strategies=["full", "grad_op"], layout=layout)
    p = plans["full"]
    assert p["mesh"] == {"pp": 2, "dp": 2, "tp": 1}
    assert p["stage_layers"] == [2, 2]
    send = TINY_CFG.batch * TINY_CFG.seq_len * D * 4
    assert p["comm"]["pp"]["send"] == {"calls": 4, "bytes": 4 * send, "wire_bytes": 4 * send}
    first, last = 2 * BLOCK + EMBED, 2 * BLOCK + HEAD
    # the first stage's two micro-batches of activations outweigh the head's 64 more weights
    assert (p["pp_rank"], p["forwards_in_flight"], p["params_per_rank"]) == (0, 2, first // 2) and last > first
    assert p["gathered_param_bytes"] == p["unsharded_grad_bytes"] == 4 * first
    # 2 blocks + embedding, each gathered once: a pipeline stage stays gathered through the step
    assert p["comm"]["dp"]["all_gather"]["calls"] == 3
    assert plans["grad_op"]["comm"]["dp"]["all_gather"]["calls"] == 3
    assert p["comm"]["dp"]["reduce_scatter"] == {"calls": 3, "bytes": 4 * first, "wire_bytes": 2 * first}

    from types import SimpleNamespace
    from parallel.plan import pp_collectives

    three = Layout(pp=3, pipeline=PipelineConfig(microbatches=4, fewer_end_layers=False))
    sends = [len(pp_collectives(SimpleNamespace(args=TINY4), TINY_CFG, {"pp": 3, "dp": 1, "tp": 1}, rank, 3, 4))
             for rank in pipeline_ranks(TINY4.n_layers, three)]
    assert sends == [4, 8, 4]  # first: activations out; middle: both ways; last: gradients back


def test_step_estimate_is_flops_at_the_assumed_efficiency_plus_the_bubble():
    """One GPU: no collective, so the step is the executed FLOPs (6 per weight per token,
    causal attention's half of 12 L heads head_dim S, the LM head) at 80% of 989 TFLOP/s.
    A pipeline of p ranks on the same work: the busiest rank's time x (1 + (p-1)/m), plus
    2 (p-1) sends of (B, S, dim) fp32 over NVLink."""
    from parallel.plan import block_params

    cfg = TINY_CFG
    tokens = cfg.batch * cfg.seq_len
    executed = tokens * (TINY4.n_layers * (6 * block_params(TINY4) + 6 * TINY4.n_heads * TINY4.head_dim * cfg.seq_len)
                         + 6 * V * D)
    one = plan(TINY4, 1, 1, cfg=cfg, strategies=["full"])["full"]["estimate"]
    assert one["step_seconds"] == pytest.approx(executed / (989e12 * 0.80), rel=1e-12)
    assert one["mfu"] == pytest.approx(tokens * TINY4.training_flops_per_token(cfg.seq_len) / one["step_seconds"] / 989e12)
    assert one["bubble"] == 0 and one["dp_exposed_seconds"] == one["tp_exposed_seconds"] == 0

    m = 8
    layout = Layout(pp=4, pipeline=PipelineConfig(microbatches=m, fewer_end_layers=False))
    piped = plan(TINY4, 4, 1, cfg=cfg, strategies=["full"], layout=layout)["full"]["estimate"]
    last_stage = tokens * (6 * block_params(TINY4) + 6 * TINY4.n_heads * TINY4.head_dim * cfg.seq_len + 6 * V * D)
    busy = m * last_stage / (989e12 * 0.80)  # the last stage (a block + the head) is the slowest
    sends = 2 * 3 * tokens * D * 4 / 450e9
    assert piped["bubble"] == 3 / 11
    assert piped["step_seconds"] == pytest.approx(busy * (1 + 3 / m) + sends, rel=1e-12)
