"""The planner: closed-form parameter and communication counts on small configs, the
405B plan from the command line in seconds, one clear line for bad input, and train.py's
defaults. Its memory terms: test_plan_memory.py; pipeline and context parallelism:
test_plan_4d.py. That its numbers equal what a real 2x2 gloo run holds and sends is
tested in test_fsdp.py."""

import json
import subprocess
import sys
import time
from dataclasses import replace

import pytest

from llama import PRESETS, ModelArgs
from parallel.plan.cli import main, parse_args
from parallel.plan.config import COMPUTE_EFFICIENCY, DEFAULTS, PEAK_TFLOPS, StepConfig
from parallel.plan.layout import Layout
from parallel.plan.planner import plan

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

