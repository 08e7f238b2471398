"""The pipeline bubble of torch.distributed.pipelining's schedules as parallel/pipeline.py
runs them, measured on CPU against the theory (p - 1) / (v m + p - 1): p stages, m
micro-batches, v stages per rank (1 for 1F1B).

    PYTHONPATH=. python bench/bench_pp.py [--unit-ms 20] [--steps 3] [--skip-model]

Two measurements:

1. Timed stages. Every stage is a module whose forward sleeps `unit` ms per micro-batch
   and whose backward sleeps 2 units (a backward costs two forwards), on p gloo processes
   for p = 2 and 4. A sleeping rank uses no CPU, so 4 ranks on 2 cores each run as if on
   their own device, and the wall time shows exactly what the schedule leaves idle:
       bubble = 1 - (work per rank) / (step time),  work per rank = v m x 3 units
   where everything else (the gloo send/recv of each micro-batch's activation) counts as
   bubble too.
2. The real model: the debug-sized Transformer cut into 2 stages (TransformerStage, FSDP,
   the vocab-parallel loss: build_pipeline) on 2 processes of one thread, one per core,
   against the whole model on one process of one thread on the same global batch:
       bubble = 1 - (one-process step / 2) / (pp 2 step time)
   This includes the cost of sending activations and what the two halves' unequal
   work (embedding, LM head and loss on the ends) adds; other tenants of the machine
   inflate it, so run it on a quiet machine.

Numbers, not pass/fail."""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn as nn

from parallel.spawn import run_on_ranks


def theory(pp: int, microbatches: int, virtual_stages: int) -> float:
    return (pp - 1) / (virtual_stages * microbatches + pp - 1)


class _Sleep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        time.sleep(seconds)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        return grad.clone(), None


class TimedStage(nn.Module):
    """A stage whose forward takes `seconds` and backward twice that, on no CPU."""

    def __init__(self, seconds: float, width: int = 16):
        super().__init__()
        self.seconds = seconds
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x):
        return _Sleep.apply(x * self.weight, self.seconds)


def _timed(pp: int, microbatches: int, virtual_stages: int, unit_s: float, steps: int) -> float:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B

    rank, n_stages = dist.get_rank(), pp * virtual_stages
    stages, modules = [], []
    for index in range(rank, n_stages, pp):
        module = TimedStage(unit_s)
        modules.append(module)
        stages.append(PipelineStage(module, index, n_stages, torch.device("cpu")))
    loss = lambda out, target: (out - target).pow(2).sum()  # noqa: E731
    if virtual_stages == 1:
        schedule = Schedule1F1B(stages[0], microbatches, loss_fn=loss, scale_grads=False)
    else:
        schedule = ScheduleInterleaved1F1B(stages, microbatches, loss_fn=loss, scale_grads=False)
    x, target = torch.randn(microbatches, 16), torch.zeros(microbatches, 16)
    times = []
    for step in range(steps + 1):  # the first step also infers the stages' shapes
        dist.barrier()
        start = time.perf_counter()
        schedule.step(*((x,) if rank == 0 else ()), target=target if rank == pp - 1 else None, return_outputs=False)
        dist.barrier()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_step(pp: int, microbatches: int, steps: int, batch: int, seq: int) -> float:
    from llama.config import ModelArgs
    from parallel.mesh import build_mesh
    from parallel.pipeline import PipelineConfig, build_pipeline
    from parallel.fsdp import build_parallel_model
    from parallel.losses import vocab_parallel_cross_entropy

    args = ModelArgs.from_preset("debug")
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)
    targets = torch.randint(0, args.vocab_size, (batch, seq), generator=gen)
    mesh = build_mesh(1, pp=pp, device="cpu")
    if pp > 1:
        pipeline = build_pipeline(args, mesh, PipelineConfig(microbatches=microbatches))

        def step():
            pipeline.step(tokens, targets, global_tokens=tokens.numel())
            for part in pipeline.parts:
                part.zero_grad(set_to_none=True)
    else:
        model = build_parallel_model(args, mesh)

        def step():
            for rows in range(0, batch, batch // microbatches):  # the same micro-batches, one after another
                part = slice(rows, rows + batch // microbatches)
                loss = vocab_parallel_cross_entropy(model(tokens[part]), targets[part], reduction="sum") / tokens.numel()
                loss.backward()
            model.zero_grad(set_to_none=True)

    times = []
    for i in range(steps + 1):
        dist.barrier()
        start = time.perf_counter()
        step()
        dist.barrier()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--unit-ms", type=float, default=20.0, help="timed stages: forward time per micro-batch (default: %(default)s)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per configuration; median (default: %(default)s)")
    p.add_argument("--skip-model", action="store_true", help="only the timed stages (default: both)")
    p.add_argument("--seq-len", type=int, default=256, help="real model: tokens per sequence (default: %(default)s)")
    opts = p.parse_args(argv)

    print("timed stages: forward 1 unit, backward 2 units per micro-batch and stage; bubble = idle share of the step")
    print(f"{'pp':>3} {'schedule':>12} {'v':>2} {'m':>3} {'step ms':>9} {'ideal ms':>9} {'bubble':>8} {'theory':>8}")
    unit = opts.unit_ms / 1000
    for pp in (2, 4):
        for virtual_stages, schedule in ((1, "1f1b"), (2, "interleaved")):
            for m in (pp, 2 * pp, 4 * pp):
                step = run_on_ranks(_timed, pp, pp, m, virtual_stages, unit, opts.steps)[0]
                ideal = virtual_stages * m * 3 * unit
                print(f"{pp:>3} {schedule:>12} {virtual_stages:>2} {m:>3} {step * 1e3:>9.0f} {ideal * 1e3:>9.0f} "
                      f"{1 - ideal / step:>8.1%} {theory(pp, m, virtual_stages):>8.1%}", flush=True)
    if opts.skip_model:
        return
    print(f"\nreal model (debug preset, seq {opts.seq_len}, 1F1B): pp 2 on 2 processes against 1 process, same micro-batches")
    print(f"{'m':>3} {'1 proc ms':>10} {'pp 2 ms':>9} {'bubble':>8} {'theory':>8}")
    for m in (2, 4, 8):
        batch = 8
        whole = run_on_ranks(_model_step, 1, 1, m, opts.steps, batch, opts.seq_len)[0]
        pipelined = max(run_on_ranks(_model_step, 2, 2, m, opts.steps, batch, opts.seq_len))
        print(f"{m:>3} {whole * 1e3:>10.0f} {pipelined * 1e3:>9.0f} {1 - whole / 2 / pipelined:>8.1%} "
              f"{theory(2, m, 1):>8.1%}", flush=True)


if __name__ == "__main__":
    main()
