"""Training-step efficiency of the plain loop on 4 CPU processes (gloo), 2x2 mesh.

    PYTHONPATH=. python bench/bench_step.py [--steps 6] [--sequence-parallel on,off] [--strategy full,grad_op]
                                            [--adamw default,fused] [--compile off,on] [--attention runs,square]
                                            [--top 30]

The 2x2 CPU config of DEVELOPERS.md: dim 512, 4 layers, 8 heads / 4 kv heads, vocab
8192, seq 512, micro-batch 4 per dp rank, fp32. One step = model, vocab-parallel loss,
backward, AdamW with its defaults (or fused, train.py's choice on CPU), with train.py's
host-memory setting (`keep_freed_host_memory`), eager or with each block compiled
(train.py --compile; the compilation runs in the warm-up steps), and causal attention in
runs of queries over key prefixes (the model's CPU path, llama/masks.py) or as one SDPA
is_causal call over the whole square. MFU = training FLOPs per token x tokens/s
/ the machine's fp32 matmul peak, measured in the same run: each round starts with a
0.5 s probe on every rank at once (train.py's `measure_peak_tflops`; the ranks' sum),
then runs every variant (sequence parallelism x FSDP strategy x AdamW x compile x attention) for
`--consecutive` steps in a row, so that drift of the machine's speed hits the peak and
all variants alike. Figures are medians over the rounds, with the range. Then one step of
the fastest variant runs under torch.profiler on rank 0, and its self CPU time is split
into categories. With 4 processes on 2 cores a rank's wall time includes time it waits
for a core. Target: MFU >= 75%."""

import argparse
import itertools
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

import llama.masks as masks
from llama import ModelArgs
from parallel.devices import measure_peak_tflops
from parallel.fsdp import build_parallel_model
from parallel.layers import sum_adapter_gradients
from parallel.losses import vocab_parallel_cross_entropy
from parallel.mesh import build_mesh, dp_rank, dp_size
from llama.training.build import keep_freed_host_memory

ARGS = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=512)

CATEGORIES = ("matmul", "attention", "collectives/wait", "optimizer", "other")
MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
COLLECTIVE = ("c10d", "gloo", "wait", "all_gather", "reduce_scatter", "all_reduce", "record_param_comms", "fsdp::")


def category(event, parents: set) -> str:
    if "Optimizer.step" in parents:
        return "optimizer"
    name = event.name
    if name in MATMUL:
        return "matmul"
    if "attention" in name:
        return "attention"
    if any(key in name for key in COLLECTIVE):
        return "collectives/wait"
    return "other"


def breakdown(prof) -> tuple[dict, dict]:
    """Self CPU time (ms) per category, and per op within "other" (where to look next)."""
    totals, others, ops = defaultdict(float), defaultdict(float), defaultdict(float)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        parents, parent = set(), event.cpu_parent
        while parent is not None:
            parents.add(parent.name.split("#")[0])
            parent = parent.cpu_parent
        cat = category(event, parents)
        totals[cat] += event.self_cpu_time_total / 1000
        ops[event.name] += event.self_cpu_time_total / 1000
        if cat == "other":
            others[event.name] += event.self_cpu_time_total / 1000
    return totals, others, ops


def random_batch(mesh, micro_batch: int, seq_len: int, vocab_size: int = ARGS.vocab_size) -> tuple:
    """Random tokens, different on each dp rank: inputs, targets and the global token count
    that a step's summed loss divides by."""
    gen = torch.Generator().manual_seed(dp_rank(mesh))
    tokens = torch.randint(0, vocab_size, (micro_batch, seq_len + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:], micro_batch * seq_len * dp_size(mesh)


def make_step(model, opt, inputs, targets, global_tokens: int, run: int = masks.QUERY_RUN):
    """One training step: model, vocab-parallel loss, backward, the LoRA factors' tp shares
    summed (as train_step does; nothing to sum without adapters), optimizer step. The step
    takes `before_update`: called with the gradients complete, before the optimizer step
    (where bench_lora.py counts what memory holds)."""

    def step(before_update=None):
        masks.QUERY_RUN = run
        logits = model(inputs)
        (vocab_parallel_cross_entropy(logits, targets, reduction="sum") / global_tokens).backward()
        sum_adapter_gradients(model)
        if before_update is not None:
            before_update()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved_rounds(steps: dict, rounds: int, consecutive: int) -> dict:
    """Time every step function of `steps` (name -> step) for `consecutive` steps in a row
    in each of `rounds` rounds. The machine's speed drifts (a shared VM): each round starts
    with a peak probe of 0.5 s on every rank at once, and every variant steps in each
    round. Medians over the rounds, with the range (min, max)."""
    peaks, times = [], defaultdict(list)
    for _ in range(rounds):
        probe = torch.tensor(measure_peak_tflops(torch.device("cpu"), seconds=0.5))
        dist.all_reduce(probe)
        peaks.append(probe.item())
        for variant, step in steps.items():
            dist.barrier()
            start = time.perf_counter()
            for _ in range(consecutive):
                step()
            dist.barrier()
            times[variant].append((time.perf_counter() - start) / consecutive)
    return {
        "medians": {variant: statistics.median(t) for variant, t in times.items()},
        "spread": {variant: (min(t), max(t)) for variant, t in times.items()},
        "peak": statistics.median(peaks),
        "peaks": (min(peaks), max(peaks)),
    }


def profile_step(step, summarize=breakdown, record_shapes: bool = False):
    """One step under torch.profiler on every rank; `summarize` of this rank's profile."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=record_shapes) as prof:
        dist.barrier()
        step()
        dist.barrier()
    return summarize(prof)


def print_profile(profile: tuple, top: int = 0) -> None:
    totals, others, ops = profile
    total = sum(totals.values())
    print(f"profile of one step, rank 0 (self CPU time, {total:.0f} ms):")
    for cat in CATEGORIES:
        print(f"  {cat:18s} {totals[cat]:7.1f} ms  {100 * totals[cat] / total:5.1f}%")
    print("  top of other: " + ", ".join(f"{n} {t:.1f}" for n, t in sorted(others.items(), key=lambda x: -x[1])[:8]))
    if top:
        print("  top ops: " + ", ".join(f"{n} {t:.1f}" for n, t in sorted(ops.items(), key=lambda x: -x[1])[:top]))


def _bench(opts) -> dict:
    keep_freed_host_memory()  # as train.py does on CPU
    mesh = build_mesh(2)
    variants = list(itertools.product(opts.sequence_parallel, opts.strategy, opts.adamw, opts.compile, opts.attention))
    query_run = {"runs": masks.QUERY_RUN, "square": 10**9}  # one run longer than the sequence: is_causal
    inputs, targets, global_tokens = random_batch(mesh, opts.micro_batch, opts.seq_len)

    steps = {}
    for sp, strategy, adamw, compiled, attention in variants:
        model = build_parallel_model(ARGS, mesh, strategy=strategy, sequence_parallel=sp == "on", compile=compiled == "on")
        opt = torch.optim.AdamW(model.parameters(), **({"fused": True} if adamw == "fused" else {}))
        step = make_step(model, opt, inputs, targets, global_tokens, query_run[attention])
        steps[(sp, strategy, adamw, compiled, attention)] = step
        step(), step()  # warm-up

    result = interleaved_rounds(steps, opts.steps, opts.consecutive)
    fastest = min(result["medians"], key=result["medians"].get)
    return dict(result, profile=profile_step(steps[fastest]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed rounds, each a peak probe and every variant's steps (default: %(default)s)")
    parser.add_argument("--consecutive", type=int, default=2, help="steps in a row per variant and round, as a training "
                        "loop runs them, without a barrier between (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per dp rank (default: %(default)s)")
    parser.add_argument("--sequence-parallel", default="on,off", help="on, off or both: on,off (default: %(default)s)")
    parser.add_argument("--strategy", default="full", help="FSDP strategies, comma-separated (default: %(default)s)")
    parser.add_argument("--adamw", default="default", help="default (the plain loop's), fused (train.py's on "
                        "CPU) or both: default,fused (default: %(default)s)")
    parser.add_argument("--compile", default="off", help="off, on (each block torch.compiled, as train.py --compile) "
                        "or both: off,on (default: %(default)s)")
    parser.add_argument("--attention", default="runs", help="runs (the model's CPU path), square (one is_causal "
                        "call) or both: runs,square (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    parser.add_argument("--top", type=int, default=0, help="also list the profile's N most costly ops")
    opts = parser.parse_args()
    opts.sequence_parallel = opts.sequence_parallel.split(",")
    opts.strategy = opts.strategy.split(",")
    opts.adamw = opts.adamw.split(",")
    opts.compile = opts.compile.split(",")
    opts.attention = opts.attention.split(",")

    from parallel.spawn import run_on_ranks

    result = run_on_ranks(_bench, 4, opts, threads=opts.threads)[0]
    tokens = opts.micro_batch * opts.seq_len * 2
    flops = ARGS.training_flops_per_token(opts.seq_len)
    peak = result["peak"]
    print(f"fp32 matmul peak (4 ranks, same run): {peak:.3f} TFLOP/s, median of {opts.steps} probes "
          f"({result['peaks'][0]:.3f}-{result['peaks'][1]:.3f})")
    for (sp, strategy, adamw, compiled, attention), seconds in result["medians"].items():
        mfu = flops * tokens / seconds / (peak * 1e12)
        low, high = result["spread"][(sp, strategy, adamw, compiled, attention)]
        print(f"sp {sp:3s} fsdp {strategy:8s} adamw {adamw:7s} compile {compiled:3s} attention {attention:6s} "
              f"{1000 * seconds:7.0f} ms/step ({1000 * low:.0f}-{1000 * high:.0f})"
              f"  {tokens / seconds:6.0f} tok/s  MFU {100 * mfu:5.1f}%")
    fastest = min(result["medians"], key=result["medians"].get)
    print(f"fastest: sequence parallel {fastest[0]}, FSDP {fastest[1]}, AdamW {fastest[2]}, compile {fastest[3]}, "
          f"attention {fastest[4]}")
    print_profile(result["profile"], opts.top)


if __name__ == "__main__":
    main()
