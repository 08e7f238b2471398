"""The planner's memory terms: FSDP's gradient buffers, what the caching allocator does not
count, attention's workspace, whether a plan fits and the largest micro-batch that does,
and the model-state terms against the tensors a real 2x2 run holds."""

import json
from dataclasses import replace

import pytest
import torch

from llama import ModelArgs
from parallel.plan.cli import MEMORY_ROWS, main
from parallel.plan.config import StepConfig
from parallel.plan.memory import ALLOCATOR_SLACK, CUDA_CONTEXT_BYTES, CUDA_NCCL_BYTES_PER_GROUP
from parallel.plan.planner import plan
from tests.test_plan import ARGS, BLOCK, D, EMBED, FP32, HEAD

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


def test_a_checkpointed_block_keeps_its_input_and_at_tp_2_its_two_reductions_outputs():
    """Two more checkpointed blocks add two blocks' kept tensors: at tp 1 the input alone
    (b B s h); at tp 2 also the outputs of the attention's and the MLP's reduction
    (parallel/fsdp.py keep_reductions), each the input's size: b B s/2 h with sequence
    parallelism, b B s h without."""
    cfg = replace(FP32, activation_checkpointing="full", grad_accum=1)
    b, B, s = 4, cfg.batch, cfg.seq_len

    def added(tp, sp):
        acts = [plan(replace(ARGS, n_layers=n), 4, tp=tp, cfg=replace(cfg, sequence_parallel=sp),
                     strategies=["full"])["full"]["activation_bytes"] for n in (2, 4)]
        return acts[1] - acts[0]

    assert added(1, False) == 2 * b * B * s * D
    assert added(2, True) == 2 * 3 * b * B * (s // 2) * D
    assert added(2, False) == 2 * 3 * b * B * s * D


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




# ---------------------------------------------------------------- against a real run's tensors

STATE_ARGS = ModelArgs(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=64)
STATE_CFG = StepConfig(seq_len=16, batch=1, sequence_parallel=True, mixed_precision="fp32", activation_checkpointing="none")


def storage_bytes(tensors) -> int:
    """Bytes of the storages under `tensors` (a DTensor's: its local shard's), each counted
    once: FSDP2 keeps a group's sharded gradients as views of one reduce-scatter output."""
    storages = {}
    for tensor in tensors:
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        storage = local.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _model_state_bytes(args, cfg) -> dict:
    """The storages this rank's parameters, gradients (after one backward) and AdamW m and
    v (after one step) hold, and AdamW's per-tensor step counters. With cfg.lora_rank, the
    trainable parameters are the adapters; the frozen base's storages are counted apart."""
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh
    from parallel.train_utils import token_loss

    mixed_precision = None if cfg.mixed_precision == "fp32" else cfg.mixed_precision
    model = build_parallel_model(args, build_mesh(tp=2, device="cpu"), strategy="full",
                                 sequence_parallel=cfg.sequence_parallel, mixed_precision=mixed_precision, lora=cfg.lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    held = {"param_bytes": storage_bytes(trainable), "frozen_bytes": storage_bytes(frozen)}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (cfg.batch, cfg.seq_len + 1), generator=gen)
    token_loss(model(tokens[:, :-1]), tokens[:, 1:], cfg.batch * cfg.seq_len).backward()
    held["grad_bytes"] = storage_bytes(p.grad for p in trainable)
    held["frozen gradients"] = sum(p.grad is not None for p in frozen)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    opt.step()
    held["optimizer_bytes"] = storage_bytes(s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    held["step counters"] = storage_bytes(s["step"] for s in opt.state.values())
    held["parameter tensors"] = len(trainable)
    return held


def _model_states_of_runs(args, cfgs) -> list:
    return [_model_state_bytes(args, cfg) for cfg in cfgs]


# One launch of 4 gloo ranks for every run the tests below compare with the planner
LORA_CFG = replace(STATE_CFG, lora_rank=4)
LORA_BF16_CFG = replace(LORA_CFG, mixed_precision="bf16")
REAL_RUNS = (STATE_CFG, LORA_CFG, LORA_BF16_CFG)


@pytest.fixture(scope="module")
def real_2x2_states() -> dict:
    """cfg -> rank 0's model-state storages in a real 2x2 run of STATE_ARGS."""
    from parallel.spawn import run_on_ranks

    held = run_on_ranks(_model_states_of_runs, 4, STATE_ARGS, REAL_RUNS)[0]
    return dict(zip(REAL_RUNS, held))


def test_parameter_gradient_and_optimizer_terms_are_the_tensors_of_a_2x2_run(real_2x2_states):
    """4 gloo ranks, full, 2x2, fp32: rank 0's parameter shards, its sharded gradients after
    a backward and its AdamW m and v after a step hold exactly the planner's bytes, counted
    as tensor storages (FSDP pads nothing here); AdamW's one fp32 step counter per
    parameter tensor, which the planner leaves out, is 4 bytes each."""
    held = real_2x2_states[STATE_CFG]
    planned = plan(STATE_ARGS, 4, tp=2, cfg=STATE_CFG, strategies=["full"])["full"]
    print(held)
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes"):
        assert held[key] == planned[key], (key, held[key], planned[key])
    assert held["step counters"] == 4 * held["parameter tensors"]


@pytest.mark.parametrize("cfg", [LORA_CFG, LORA_BF16_CFG], ids=["fp32", "bf16"])
def test_lora_adapter_and_frozen_base_terms_are_the_tensors_of_a_2x2_lora_run(real_2x2_states, cfg):
    """The same 2x2 run with r 4 adapters on all seven projections: the adapters' fp32
    shards, their gradients and their AdamW m and v hold the planner's adapter bytes; the
    frozen base holds the planner's base bytes (fp32, or bf16 under bf16 mixed precision, as
    build_parallel_model stores it) and gets no gradient."""
    held = real_2x2_states[cfg]
    planned = plan(STATE_ARGS, 4, tp=2, cfg=cfg, strategies=["full"])["full"]
    print(held)
    assert "param_bytes" not in planned and "grad_bytes" not in planned
    assert held["frozen gradients"] == 0
    assert held["param_bytes"] == planned["adapter_param_bytes"]
    assert held["grad_bytes"] == planned["adapter_grad_bytes"]
    assert held["optimizer_bytes"] == planned["adapter_optimizer_bytes"]
    assert held["frozen_bytes"] == planned["base_param_bytes"]
    assert held["param_bytes"] == 4 * planned["trainable_params_per_rank"]
    full = real_2x2_states[STATE_CFG]
    assert held["param_bytes"] < full["param_bytes"] / 20  # r 4 on dim 512: ~3% of the model
