"""Memory, communication and step-time planner for training with FSDP2 over dp, tensor
parallelism over tp, pipeline parallelism over pp and context parallelism over cp.

    python -m parallel.plan --model 3.1-405b --nodes 16 --gpus-per-node 8 [--json]
    python -m parallel.plan --model 3.1-405b --nodes 1024 --tp 8 --pp 16 --pp-microbatches 32 \\
        --seq-len 8192 --micro-batch 1 --activation-checkpointing full --gpu-memory 79.1
    python -m parallel.plan --model 3.1-405b --tp 8 --lora-rank 16 --base-dtype nf4 --gpu-memory 79.1

The command line: its flags, the table (or JSON) it prints and the lines under it. The
first paragraph above is its --help description; parallel/plan/__init__.py says what the
plan holds.
"""

import argparse
import json
import sys
from dataclasses import replace

from llama.config import PRESETS

from ..fsdp import STRATEGIES, get_strategy
from ..pipeline import PipelineConfig, add_pipeline_arguments
from .config import BASE_DTYPES, COMPUTE_EFFICIENCY, DEFAULTS, PEAK_TFLOPS, Hardware, StepConfig
from .layout import Layout, check_layout, pipeline_bubble
from .memory import format_gib
from .planner import choose_tp, default_dp_replicate, plan


DIM_ORDER = ["pp", "tp", "cp", "dp", "dp x cp", "dp_shard", "dp_shard x cp", "dp_replicate", "world"]


def format_table(results: dict, header: str) -> str:
    names = list(results)
    first = next(iter(results.values()))
    rows = [("", names)]

    def row(label, values):
        rows.append((label, [str(v) for v in values]))

    row("mesh", ["x".join(str(v) for v in r["mesh"].values()) for r in results.values()])
    if "pp_rank" in first:
        row("pp rank with the most memory", [r["pp_rank"] for r in results.values()])
        row("  its layers, forwards in flight", [f"{r['layers_on_rank']}, {r['forwards_in_flight']}" for r in results.values()])
    row("params / rank", [f"{r['params_per_rank']:,}" for r in results.values()])
    if "trainable_params_per_rank" in first:
        row("  of them trainable (adapters)", [f"{r['trainable_params_per_rank']:,}" for r in results.values()])
    for key, label in MEMORY_ROWS:
        if key in first:
            row(label, [format_gib(r[key]) for r in results.values()])
    if all("fits" in r for r in results.values()):
        row(f"fits in {format_gib(first['gpu_memory_bytes'])} GiB",
            ["yes" if r["fits"] else "no" for r in results.values()])
        row("largest micro-batch that fits", [r["max_micro_batch"] for r in results.values()])
    dims = sorted({d for r in results.values() for d in r["comm"]}, key=DIM_ORDER.index)
    for dim in dims:
        ops = sorted({op for r in results.values() for op in r["comm"].get(dim, {})})
        for op in ops:
            cells = []
            for r in results.values():
                entry = r["comm"].get(dim, {}).get(op)
                cells.append("-" if entry is None else f"{entry['calls']} x, {format_gib(entry['wire_bytes'])}")
            row(f"{dim} {op} (calls, GiB sent)", cells)
    for key, label in ESTIMATE_ROWS:
        if key.endswith("_seconds") and key != "step_seconds" and not any(r["estimate"][key] for r in results.values()):
            continue  # a dimension this mesh does not have
        row(label, [ESTIMATE_FORMAT.get(key, "{:.2f}").format(r["estimate"][key]) for r in results.values()])
    width = max(len(label) for label, _ in rows)
    col = max(max(len(c) for c in cells) for _, cells in rows) + 2
    lines = [header]
    for label, cells in rows:
        lines.append(label.ljust(width) + "".join(c.rjust(col) for c in cells))
    return "\n".join(lines)


MEMORY_ROWS = [
    ("param_bytes", "params fp32 (GiB)"),
    ("grad_bytes", "grads fp32 (GiB)"),
    ("optimizer_bytes", "AdamW m+v fp32 (GiB)"),
    ("base_param_bytes", "frozen base params (GiB)"),
    ("nf4_scale_bytes", "NF4 block scales (GiB)"),
    ("adapter_param_bytes", "adapter params fp32 (GiB)"),
    ("adapter_grad_bytes", "adapter grads fp32 (GiB)"),
    ("adapter_optimizer_bytes", "adapter AdamW m+v fp32 (GiB)"),
    ("master_bytes", "extra fp32 master (GiB)"),
    ("gathered_param_bytes", "gathered params peak (GiB)"),
    ("unsharded_grad_bytes", "unsharded grads (GiB)"),
    ("reduce_scatter_bytes", "fp32 reduce-scatter buffer (GiB)"),
    ("activation_bytes", "activations (GiB)"),
    ("cp_kv_bytes", "cp all-gathered K/V (GiB)"),
    ("attention_workspace_bytes", "attention workspace (GiB)"),
    ("nf4_dequantized_bytes", "NF4 projection dequantised (GiB)"),
    ("allocated_bytes", "= allocated peak (GiB)"),
    ("allocator_slack_bytes", "allocator slack (GiB)"),
    ("cuda_context_bytes", "CUDA context (GiB)"),
    ("nccl_bytes", "NCCL buffers (GiB)"),
    ("total_bytes", "= total (GiB)"),
]

ESTIMATE_ROWS = [
    ("compute_seconds", "est. compute (s)"),
    ("tp_exposed_seconds", "est. tp exposed (s)"),
    ("cp_exposed_seconds", "est. cp exposed (s)"),
    ("bubble_seconds", "est. pipeline bubble (s)"),
    ("pp_exposed_seconds", "est. pp sends exposed (s)"),
    ("dp_exposed_seconds", "est. dp exposed (s)"),
    ("step_seconds", "= est. step time (s)"),
    ("tflops_per_gpu", "est. model TFLOP/s per GPU"),
    ("mfu", "est. MFU"),
    ("hfu", "est. HFU (FLOPs executed)"),
]
ESTIMATE_FORMAT = {"compute_seconds": "{:.3f}", "tp_exposed_seconds": "{:.3f}", "cp_exposed_seconds": "{:.3f}",
                   "bubble_seconds": "{:.3f}", "pp_exposed_seconds": "{:.3f}", "dp_exposed_seconds": "{:.3f}",
                   "step_seconds": "{:.3f}", "tflops_per_gpu": "{:.0f}", "mfu": "{:.1%}", "hfu": "{:.1%}"}


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    p = argparse.ArgumentParser(prog="python -m parallel.plan", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help=f"preset (required): {', '.join(PRESETS)}")
    p.add_argument("--nodes", type=int, default=1, help="machines (default: %(default)s)")
    p.add_argument("--gpus-per-node", type=int, default=8,
        help="processes per machine; groups within one use NVLink in the estimate (default: %(default)s)")
    p.add_argument("--tp", type=int, default=None,
        help="tensor-parallel size (default: as train.py, the smallest that fits --gpu-memory, 79.1 if not given)")
    p.add_argument("--pp", type=int, default=1,
        help="pipeline-parallel stages, the outermost mesh dimension, as train.py --pp (default: %(default)s)")
    p.add_argument("--cp", type=int, default=1,
        help="context-parallel size, between dp and tp, as train.py --cp (default: %(default)s)")
    p.add_argument("--dp-replicate", type=int, default=None,
        help="HSDP replica groups (default: 2 when dp is even, else 1)")
    p.add_argument("--seq-len", type=int, default=d["seq_len"], help="tokens per sequence (default: %(default)s, as train.py)")
    p.add_argument("--micro-batch", "--batch", dest="batch", type=int, default=d["batch"],
        help="sequences per dp rank per micro-step, or per pipeline micro-batch (default: %(default)s, as train.py)")
    p.add_argument("--grad-accum", type=int, default=d["grad_accum"],
        help="micro-steps per optimizer step; with --pp, runs of the whole schedule (default: %(default)s)")
    add_pipeline_arguments(p)
    p.add_argument("--strategy", default=d["strategy"],
        help=f"the one --json reports at top level: {', '.join(STRATEGIES)} (default: %(default)s)")
    p.add_argument("--dtype", "--mixed-precision", dest="mixed_precision", default=d["mixed_precision"],
        choices=["bf16", "fp32"], help="compute dtype (default: %(default)s, train.py's on CUDA)")
    p.add_argument("--activation-checkpointing", default=d["activation_checkpointing"], choices=["none", "full", "selective"],
        help="blocks recomputed in backward (default: %(default)s)")
    p.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=d["sequence_parallel"],
        help="split activations along the sequence between blocks when tp > 1 (default: on, as train.py)")
    p.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=d["document_masking"],
        help="attention within documents: flex attention's block mask on CUDA (default: on, as train.py)")
    # train.py's LoRA flags, with train.py's help; alpha and rsLoRA change no byte or FLOP
    p.add_argument("--lora-rank", type=int, default=d["lora_rank"],
        help="rank r of the adapters; 0 trains every parameter (default: %(default)s, as train.py)")
    p.add_argument("--lora-targets", default=",".join(d["lora_targets"]),
        help="projections that get an adapter, Meta's names (default: %(default)s, as train.py)")
    p.add_argument("--lora-dropout", type=float, default=d["lora_dropout"],
        help="dropout on the adapters' input (default: %(default)s, as train.py)")
    p.add_argument("--base-dtype", choices=BASE_DTYPES, default=None,
        help="with --lora-rank, the frozen base's storage: nf4 (QLoRA: the seven projections' weights 4-bit "
             "NormalFloat, double-quantised scales) (default: the compute dtype, bf16 under --dtype bf16)")
    p.add_argument("--gpu-memory", type=float, default=None,
        help="GiB per GPU (an 80 GB H100 reports 79.1): say whether the plan fits, and the largest "
             "micro-batch that does (default: not asked)")
    p.add_argument("--peak-tflops", type=float, default=PEAK_TFLOPS,
        help="dense bf16 peak per GPU for the estimate and MFU (default: %(default)s, H100 SXM)")
    p.add_argument("--compute-efficiency", type=float, default=COMPUTE_EFFICIENCY,
        help="fraction of --peak-tflops the kernels are assumed to sustain (default: %(default)s, the best "
             "bf16 matmul measured on an H100 SXM)")
    p.add_argument("--json", action="store_true",
        help="print the plan as JSON instead of a table (default: table)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    opts = parse_args(argv)
    try:
        if opts.model not in PRESETS:
            raise ValueError(f"unknown --model {opts.model!r}; choose one of {', '.join(PRESETS)}")
        get_strategy(opts.strategy)
        if opts.gpu_memory is not None and opts.gpu_memory <= 0:
            raise ValueError(f"--gpu-memory {opts.gpu_memory} must be a positive number of GiB, e.g. 79.1 for an H100")
        if opts.peak_tflops <= 0 or not 0 < opts.compute_efficiency <= 1:
            raise ValueError(f"--peak-tflops {opts.peak_tflops} must be positive and --compute-efficiency "
                             f"{opts.compute_efficiency} in (0, 1]")
        world = opts.nodes * opts.gpus_per_node
        cfg = StepConfig(
            seq_len=opts.seq_len,
            batch=opts.batch,
            grad_accum=opts.grad_accum,
            sequence_parallel=opts.sequence_parallel,
            mixed_precision=opts.mixed_precision,
            activation_checkpointing=opts.activation_checkpointing,
            document_masking=opts.document_masking,
            lora_rank=opts.lora_rank,
            lora_targets=tuple(t.strip() for t in opts.lora_targets.split(",") if t.strip()),
            lora_dropout=opts.lora_dropout,
            base_dtype=opts.base_dtype,
        )
        layout = Layout(
            pp=opts.pp,
            cp=opts.cp,
            pipeline=PipelineConfig.from_options(opts),
            hardware=Hardware(opts.peak_tflops, opts.compute_efficiency, opts.gpus_per_node),
        )
        args = PRESETS[opts.model]
        tp, tp_reason = opts.tp, None
        if tp is None:
            tp, tp_reason = choose_tp(args, world, opts.gpus_per_node, opts.gpu_memory or 79.1, cfg, layout, opts.strategy,
                                      opts.dp_replicate or 1)
        cfg = replace(cfg, sequence_parallel=cfg.sequence_parallel and tp > 1)
        dp = check_layout(args, world, tp, cfg, layout)
        dp_replicate = opts.dp_replicate or default_dp_replicate(dp)
        results = plan(args, world, tp, dp_replicate, cfg, gpu_memory=opts.gpu_memory, layout=layout)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokens = opts.batch * opts.seq_len * dp * opts.grad_accum * layout.microbatches
    chosen = results[opts.strategy]
    four_d = layout.pp > 1 or layout.cp > 1
    if opts.json:
        report = {
            "model": opts.model,
            "world_size": world,
            "tp": tp,
            "dp": dp,
            "dp_replicate": dp_replicate,
            **({"pp": layout.pp, "cp": layout.cp} if four_d else {}),
            **({"pp_microbatches": layout.microbatches, "pp_schedule": opts.pp_schedule,
                "virtual_stages": layout.virtual_stages} if layout.pp > 1 else {}),
            "tokens_per_step": tokens,
            **{k: v for k, v in vars(cfg).items()},
            **chosen,
            "strategies": results,
        }
        print(json.dumps(report, indent=1))
        return 0
    if four_d:
        pipeline = ""
        if layout.pp > 1:
            interleaved = f", {layout.virtual_stages} virtual stages" if layout.virtual_stages > 1 else ""
            pipeline = (f", {layout.microbatches} pipeline micro-batches ({opts.pp_schedule}{interleaved}, "
                        f"bubble {pipeline_bubble(layout.pp, layout.microbatches, layout.virtual_stages):.1%})")
        header = (
            f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, mesh ("
            + ", ".join(name for name in chosen["mesh"]) + ") = (" + ", ".join(str(n) for n in chosen["mesh"].values())
            + f"); per rank, per step of {tokens:,} tokens (seq {opts.seq_len}, micro-batch {opts.batch}/dp rank"
            f"{pipeline}, grad_accum {opts.grad_accum}); "
        )
    else:
        header = (
            f"{opts.model} on {opts.nodes} x {opts.gpus_per_node} = {world} ranks, tp {tp}, dp {dp} "
            f"(hybrid: {dp_replicate} replicas x {dp // dp_replicate}); per rank, per step of {tokens:,} tokens "
            f"(seq {opts.seq_len}, micro-batch {opts.batch}/dp rank, grad_accum {opts.grad_accum}); "
        )
    header += (
        f"{cfg.mixed_precision}, sequence parallel {'on' if cfg.sequence_parallel else 'off'}, "
        f"activation checkpointing {cfg.activation_checkpointing}, "
        f"document masking {'on' if cfg.document_masking else 'off'}"
    )
    if cfg.lora_rank:
        base = cfg.base_dtype or cfg.mixed_precision
        header += (f"; LoRA r {cfg.lora_rank} on {','.join(cfg.lora_targets)}"
                   f"{f', dropout {cfg.lora_dropout:g}' if cfg.lora_dropout else ''}, frozen base {base}")
    print(format_table(results, header))
    if tp_reason:
        print(tp_reason)
    print(assumptions_line(layout.hardware))
    if "fits" in chosen:
        print(fits_line(opts.strategy, chosen))
    return 0


def assumptions_line(hw: Hardware) -> str:
    return (
        f"estimate: kernels at {hw.compute_efficiency:.0%} of {hw.peak_tflops:g} TFLOP/s; NVLink "
        f"{hw.nvlink_bytes_per_s / 1e9:g} GB/s sent per GPU within a node of {hw.gpus_per_node}, "
        f"{hw.network_bytes_per_s / 1e9:g} GB/s between nodes; tp and cp collectives exposed, FSDP's overlapped "
        "(see parallel.plan.step_estimate)"
    )


def fits_line(strategy: str, result: dict) -> str:
    verdict = "fits" if result["fits"] else "does not fit"
    need, have = format_gib(result["total_bytes"]), format_gib(result["gpu_memory_bytes"])
    largest = result["max_micro_batch"]
    most = f"the largest micro-batch that fits is {largest}" if largest else "not even micro-batch 1 fits"
    return f"{strategy}: {verdict} ({need} of {have} GiB); {most}"
