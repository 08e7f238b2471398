"""The planner with LoRA and QLoRA (docs/lora.md, Planner): NF4's bytes in closed form, the
frozen base and the adapters as separate terms, what FSDP and tp move, the adapters'
activations and FLOPs, and the flags. That the adapter and base terms are the tensors of
a real 2x2 LoRA run: tests/test_plan_memory.py."""

import json
from dataclasses import replace

import pytest

from llama.lora import TARGETS
from parallel.plan.cli import main
from parallel.plan.config import StepConfig
from parallel.plan.estimate import rank_flops
from parallel.plan.layout import whole_model
from parallel.plan.lora import nf4_bytes, nf4_code_bytes, nf4_scale_bytes
from parallel.plan.planner import plan
from tests.test_plan import ARGS, BLOCK, D, EMBED, FP32, HEAD, KV, L, V

R = 4
BF16_LORA = replace(FP32, mixed_precision="bf16", grad_accum=1, lora_rank=R)
F = ARGS.ffn_hidden_dim
Q = ARGS.n_heads * ARGS.head_dim
# (out, in) of the seven projections of a block
PROJECTIONS = {"wq": (Q, D), "wk": (KV, D), "wv": (KV, D), "wo": (D, Q), "w1": (F, D), "w3": (F, D), "w2": (D, F)}
ADAPTERS = sum(R * (out + in_) for out, in_ in PROJECTIONS.values())  # per block, r (in + out) each


def test_nf4_bytes_per_weight_are_half_a_byte_an_int8_scale_per_64_and_a_factor_per_256_scales():
    """torchao's NF4Tensor: 0.5 + 1/64 + e/(64 x 256) bytes per weight, e the bytes of the
    dtype it quantises from (4: fp32, the QLoRA paper's; 2: bf16), plus the scales' mean and
    the 16 levels per tensor."""
    n = 4096 * 4096  # a multiple of 64 x 256, as torchao requires
    assert nf4_code_bytes(n) == n // 2
    for e in (4, 2):
        assert nf4_scale_bytes(n, e) == n // 64 + e * n // (64 * 256) + 17 * e
        assert nf4_bytes(n, e) == n * (0.5 + 1 / 64 + e / (64 * 256)) + 17 * e
    assert nf4_bytes(n, 4) / n == pytest.approx(0.515869, abs=1e-5)  # vs 2 bytes in bf16: 3.9x smaller
    # a small shape: 64 x 64 weights are 64 blocks, one factor for their 64 scales
    assert nf4_scale_bytes(64 * 64, 2) == 64 + 2 * (1 + 1 + 16)


def test_qlora_stores_the_seven_projections_as_nf4_and_norms_embedding_output_in_bf16():
    """One rank, bf16, r 4: the base is the projections' NF4 codes plus the bf16 norms,
    embedding and output; the scales are their own row; the adapters train in fp32."""
    cfg = replace(BF16_LORA, base_dtype="nf4")
    p = plan(ARGS, 1, tp=1, cfg=cfg, strategies=["full"])["full"]
    projections = [out * in_ for out, in_ in PROJECTIONS.values()] * L
    unquantized = L * 2 * D + D + EMBED + V * D  # norms, final norm, embedding, output
    assert p["base_param_bytes"] == sum(n // 2 for n in projections) + 2 * unquantized
    assert p["nf4_scale_bytes"] == sum(n // 64 + 2 * (-(-n // (64 * 256)) + 17) for n in projections)
    assert p["trainable_params_per_rank"] == L * ADAPTERS
    assert (p["adapter_param_bytes"], p["adapter_grad_bytes"], p["adapter_optimizer_bytes"]) == (
        4 * L * ADAPTERS, 4 * L * ADAPTERS, 8 * L * ADAPTERS)
    bf16 = plan(ARGS, 1, tp=1, cfg=BF16_LORA, strategies=["full"])["full"]
    assert bf16["base_param_bytes"] == 2 * (sum(projections) + unquantized)
    assert "nf4_scale_bytes" not in bf16 and "nf4_dequantized_bytes" not in bf16
    # the largest projection, w1, dequantised by torchao: int64 code halves + 3 bf16 copies
    assert p["nf4_dequantized_bytes"] == (8 + 3 * 2) * F * D


def test_fsdp_gathers_the_frozen_base_as_stored_no_nf4_and_reduces_only_the_adapters():
    """dp 2, tp 1, bf16: a block's all-gather moves its bf16 base (with NF4: only its bf16
    norms, as FSDP ignores the NF4 weights, each rank holding them whole) and its adapters
    cast to bf16; its reduce-scatter moves only the adapters' fp32 gradients; the
    embedding's and the head's groups, with nothing to train, reduce nothing."""
    lora = plan(ARGS, 2, tp=1, cfg=BF16_LORA, strategies=["grad_op"])["grad_op"]
    assert lora["comm"]["dp"]["all_gather"]["bytes"] == 2 * (L * (BLOCK + ADAPTERS) + EMBED + HEAD)
    assert lora["comm"]["dp"]["reduce_scatter"] == {"calls": L, "bytes": 4 * L * ADAPTERS, "wire_bytes": 2 * L * ADAPTERS}
    assert lora["unsharded_grad_bytes"] == 2 * ADAPTERS and lora["reduce_scatter_bytes"] == 4 * ADAPTERS
    nf4 = plan(ARGS, 2, tp=1, cfg=replace(BF16_LORA, base_dtype="nf4"), strategies=["grad_op"])["grad_op"]
    block = 2 * (2 * 2 * D // 2 + 2 * ADAPTERS // 2)  # bf16 norms, bf16 adapters; x 2 ranks; no NF4
    assert nf4["comm"]["dp"]["all_gather"]["bytes"] == L * block + 2 * (EMBED + HEAD)
    assert nf4["gathered_param_bytes"] == nf4["comm"]["dp"]["all_gather"]["bytes"]  # grad_op: all gathered
    # the NF4 base is not dp-sharded: each of the 2 ranks holds every projection whole at tp 1
    whole = sum(nf4_bytes(out * in_, 2) for out, in_ in PROJECTIONS.values())
    assert nf4["nf4_scale_bytes"] == L * sum(nf4_scale_bytes(out * in_, 2) for out, in_ in PROJECTIONS.values())
    assert nf4["nf4_scale_bytes"] + L * sum(out * in_ // 2 for out, in_ in PROJECTIONS.values()) == L * whole


def test_tp_adds_one_adapter_gradient_all_reduce_per_step_and_drops_the_frozen_norms_and_kv():
    """tp 4 > 2 kv heads, sequence parallel, grad_accum 3: full training all-reduces 5 norm
    gradients per micro-step and 4 shared kv gradients per micro-step; with LoRA those are
    frozen, and the replicated factors' shares (A of the column layers and of the
    replicated-kv B, B of the row layers) are summed in one fp32 all-reduce per step."""
    cfg = replace(FP32, sequence_parallel=True)
    full = plan(ARGS, 4, tp=4, cfg=cfg, strategies=["full"])["full"]["comm"]["tp"]["all_reduce"]
    lora = plan(ARGS, 4, tp=4, cfg=replace(cfg, lora_rank=R), strategies=["full"])["full"]["comm"]["tp"]["all_reduce"]
    assert full["calls"] == cfg.grad_accum * (2 * L + 1 + 2 * L) + 1  # norms, kv, and the grad norm's (world = tp)
    assert lora["calls"] == 1 + 1
    shares = R * D * 5 + KV * R * 2 + D * R * 2  # A of wq wk wv w1 w3; B of wk wv (replicated rows); B of wo w2
    assert lora["bytes"] == 4 * L * shares + 8


def test_lora_activations_add_x_a_per_adapted_projection_and_with_dropout_its_inputs():
    """Per block, b B s r for each adapter's x A^T; dropout adds each adapter's dropped input
    and its bool mask, (b + 1) B s in."""
    cfg = replace(FP32, mixed_precision="bf16", sequence_parallel=False)
    b, B, s = 2, cfg.batch, cfg.seq_len

    def acts(**lora):
        return plan(ARGS, 1, tp=1, cfg=replace(cfg, **lora), strategies=["full"])["full"]["activation_bytes"]

    base = acts()
    assert acts(lora_rank=R) - base == L * 7 * b * B * s * R
    assert acts(lora_rank=R, lora_targets=("wq", "w2")) - base == L * 2 * b * B * s * R
    dropout = acts(lora_rank=R, lora_dropout=0.1) - acts(lora_rank=R)
    assert dropout == L * (b + 1) * B * s * sum(in_ for _, in_ in PROJECTIONS.values())


def test_the_frozen_base_backward_computes_input_gradients_only():
    """6 FLOPs per weight per token in full training; with LoRA 4 (forward, input
    gradients), and 6 per adapter parameter; attention alike in both."""
    cfg = replace(FP32, grad_accum=1)
    tokens = cfg.batch * cfg.seq_len
    full = rank_flops(ARGS, cfg, 1, 1, whole_model(L))
    lora = rank_flops(ARGS, replace(cfg, lora_rank=R), 1, 1, whole_model(L))
    assert full - lora == tokens * (2 * (L * BLOCK + V * D) - 6 * L * ADAPTERS)


def test_lora_flags_on_the_command_line_as_train_py_reads_them(capsys):
    from llama.training.flags import build_parser, parse_args as train_py_flags
    from parallel.plan.cli import parse_args

    opts = train_py_flags(["--lora-rank", "16", "--lora-targets", "wq,wv", "--lora-dropout", "0.05"])
    assert StepConfig.from_options(opts) == replace(StepConfig(), lora_rank=16, lora_targets=("wq", "wv"),
                                                    lora_dropout=0.05)
    planner, train = parse_args(["--model", "3.2-1b"]), build_parser().parse_args([])
    for flag in ("lora_rank", "lora_targets", "lora_dropout"):
        assert getattr(planner, flag) == getattr(train, flag), flag
    assert StepConfig().lora_targets == TARGETS
    argv = ["--model", "3.2-1b", "--gpus-per-node", "1", "--seq-len", "1024", "--micro-batch", "1"]
    assert main(argv + ["--lora-rank", "16", "--base-dtype", "nf4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lora_rank"] == 16 and report["base_dtype"] == "nf4" and report["nf4_scale_bytes"] > 0
    assert main(argv + ["--lora-rank", "16"]) == 0
    out = capsys.readouterr().out
    assert "LoRA r 16 on wq,wk,wv,wo,w1,w2,w3, frozen base bf16" in out and "adapter AdamW m+v fp32" in out
    assert main(argv + ["--base-dtype", "nf4"]) == 2
    assert "--base-dtype nf4 stores a frozen base: it needs --lora-rank R" in capsys.readouterr().err
    assert main(argv + ["--lora-rank", "16", "--lora-targets", "wq,wx"]) == 2
    assert "--lora-targets wq,wx: the model has no projection wx" in capsys.readouterr().err
