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
    ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, CUDA_NCCL_BYTES_PER_GROUP, DEFAULTS, MEMORY_ROWS, StepConfig, main, parse_args, plan)

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
        (["--model", "3.1-8b", "--nodes", "3", "--gpus-per-node", "8", "--dp-replicate", "2"], "--dp-replicate 2 must divide"),
        (["--model", "3.1-8b", "--strategy", "zero3"], "unknown --strategy 'zero3'"),
        (["--model", "llama-9000"], "unknown --model 'llama-9000'"),
        (["--model", "3.2-3b", "--nodes", "2", "--gpus-per-node", "8", "--tp", "16"], "must divide n_heads 24"),
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
    assert {"--nodes", "--json", "--seq-len", "--sequence-parallel", "--gpu-memory", "--micro-batch"} <= entries.keys()
    for flag, entry in entries.items():
        assert flag == "-h" or "(default" in entry or "(required" in entry, entry


# ---------------------------------------------------------------- defaults


def test_defaults_are_train_py_defaults():
    """Planning with no flags plans what `train.py` with no flags runs, in bf16, train.py's
    default on CUDA."""
    import train

    opts = train.parse_args([])
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
    allocated = sum(p[key] for key, _ in MEMORY_ROWS if key not in OUTSIDE and not key.endswith(("allocated_bytes", "total_bytes")))
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


def _measure_memory_terms(args, cfg):
    from parallel.mesh import build_mesh

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
