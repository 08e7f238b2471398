"""The planner in 4-D: pp 1 and cp 1 plan the 2-D mesh, pipeline stages and their layers,
the bubble and the forwards in flight against the schedules torch runs, Llama 3's 405B
layouts, context parallelism's keys and values, pipeline sends, and the step-time
estimate."""

from dataclasses import replace

import pytest
import torch

from llama import PRESETS
from parallel.pipeline import PipelineConfig, stage_layer_counts
from parallel.plan.cli import main
from parallel.plan.config import StepConfig
from parallel.plan.fake_world import init_fake_world
from parallel.plan.layout import Layout, forwards_in_flight, pipeline_bubble, pipeline_ranks
from parallel.plan.planner import plan
from tests.test_plan import ARGS, BLOCK, D, EMBED, HEAD, KV, V

# ---------------------------------------------------------------- 4-D: pipeline and context parallelism


def test_2d_plan_is_unchanged_by_pp_1_cp_1():
    """pp 1 and cp 1 plan exactly what the planner plans without a layout, and the 2-D
    mesh's model states follow in closed form from 405B's shapes. At tp 8, over an FSDP
    group of 16 (full, grad_op) or 8 (the hybrids' dp_shard, 2 replicas), every weight
    splits evenly, so FSDP pads nothing: a block's tp shard is its matrices over 8 plus its
    two norms whole; the embedding's and the LM head's, V h / 8; the head shares its group,
    never resharded, with the final norm. bf16 compute, fp32 states and reductions."""
    args = PRESETS["3.1-405b"]
    cfg = StepConfig(seq_len=8192, batch=1, sequence_parallel=True, activation_checkpointing="full")
    plans = plan(args, 128, 8, 2, cfg, layout=Layout(pp=1, cp=1))
    assert plans == plan(args, 128, 8, 2, cfg)

    tp, h, V, L = 8, args.dim, args.vocab_size, args.n_layers
    kv, f = args.n_kv_heads * args.head_dim, args.ffn_hidden_dim
    assert all(n % (tp * 16) == 0 for n in (h, kv, f, V))  # each tp shard's rows split over dp 16
    block = (h * (2 * h + 2 * kv) + 3 * h * f) // tp + 2 * h  # wq, wk, wv, wo, w1, w2, w3; two norms
    embedding, head = V * h // tp, h + V * h // tp  # tok_embeddings; norm + output
    model = L * block + embedding + head
    assert block > head > embedding  # the largest groups are blocks
    for name, p in plans.items():
        shard = 8 if name.startswith("hybrid") else 16
        resharded = name in ("full", "hybrid")
        assert p["params_per_rank"] == model // shard, name
        assert (p["param_bytes"], p["grad_bytes"], p["optimizer_bytes"]) == (4 * model // shard,) * 2 + (8 * model // shard,)
        # resharding: the head's group stays gathered, plus the block computing and the one
        # prefetched; without: the whole model, from forward to backward
        assert p["gathered_param_bytes"] == 2 * (head + 2 * block if resharded else model), name
        # one block's gradients unsharded in bf16 beside its fp32 reduce-scatter input
        assert (p["unsharded_grad_bytes"], p["reduce_scatter_bytes"]) == (2 * block, 4 * block), name
        assert p["mesh"] == ({"dp_replicate": 2, "dp_shard": 8, "tp": 8} if shard == 8 else {"dp": 16, "tp": 8})
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
    gradient and fp32 reduce-scatter input); 15 x 8 checkpointed blocks, each keeping its
    input and its two reduce-scatter outputs (B s/tp h bf16 each), and one block rebuilt in
    full."""
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
    assert p["activation_bytes"] == 15 * 8 * 3 * 2 * (s // 8) * h + full_block


def block_params_of(args) -> int:
    kv = args.n_kv_heads * args.head_dim
    return args.dim * (2 * args.dim + 2 * kv) + 3 * args.dim * args.ffn_hidden_dim + 2 * args.dim


TINY4 = replace(ARGS, n_layers=4, max_seq_len=64)
TINY_CFG = StepConfig(seq_len=32, batch=2, grad_accum=1, sequence_parallel=False, mixed_precision="fp32",
                      activation_checkpointing="none", document_masking=False)


def test_context_parallel_ranks_hold_seq_over_cp_and_gather_whole_keys_and_values():
    """cp 2 on a 2-rank world (tp 1, dp 1): per block the rank keeps its half of the
    sequence's activations and the whole sequence's K and V (2 x 4 x B x S x kv bytes),
    all-gathers K and V in forward and reduce-scatters their gradients in backward, both in
    one collective each way (llama/model.py gathers them concatenated); FSDP shards over
    dp x cp = 2."""
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
    assert cp["all_gather"] == {"calls": L, "bytes": 2 * L * kv, "wire_bytes": L * kv}
    assert cp["reduce_scatter"] == {"calls": L, "bytes": 2 * L * kv, "wire_bytes": L * kv}
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
    from parallel.plan.comm import pp_collectives

    three = Layout(pp=3, pipeline=PipelineConfig(microbatches=4, fewer_end_layers=False))
    sends = [len(pp_collectives(SimpleNamespace(args=TINY4), TINY_CFG, {"pp": 3, "dp": 1, "tp": 1}, rank, 3, 4))
             for rank in pipeline_ranks(TINY4.n_layers, three)]
    assert sends == [4, 8, 4]  # first: activations out; middle: both ways; last: gradients back


def test_step_estimate_is_flops_at_the_assumed_efficiency_plus_the_bubble():
    """One GPU: no collective, so the step is the executed FLOPs (6 per weight per token,
    causal attention's half of 12 L heads head_dim S, the LM head) at 80% of 989 TFLOP/s.
    A pipeline of p ranks on the same work: the busiest rank's time x (1 + (p-1)/m), plus
    2 (p-1) sends of (B, S, dim) fp32 over NVLink."""
    from parallel.plan.estimate import block_params

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
