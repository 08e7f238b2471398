"""Training-step throughput of the 2-D model on 4 CPU processes (gloo) for the meshes
2x2, 4x1 and 1x4 (dp x tp) at the same global batch, with each step's collectives per
mesh dimension (counted by parallel.plan.counter.CommCounter on a separate, untimed step).

    PYTHONPATH=. python bench/bench_2d.py [--preset debug] [--seq-len 256] [--global-batch 8]

Without --preset the model is the one --dim, --layers, --heads, --kv-heads and --vocab
describe (a 4-M-parameter model by default).

Numbers, not pass/fail: on a shared CPU they say how the meshes compare, not what a
GPU cluster does. One process per rank, one thread each."""

import argparse
import time

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from llama import PRESETS, ModelArgs
from parallel.fsdp import build_parallel_model
from parallel.mesh import build_mesh, dp_rank
from parallel.plan.counter import CommCounter
from parallel.spawn import run_on_ranks
from parallel.train_utils import clip_grad_norm_, token_loss

MESHES = [(2, 2), (4, 1), (1, 4)]


def _step(model, opt, inputs, targets, count):
    # count: the global batch's target tokens, known on every rank as train.py's loader
    # knows them, so the step issues no token-count collective
    token_loss(model(inputs), targets, count).backward()
    clip_grad_norm_(model, 1.0)
    opt.step()
    opt.zero_grad()


def _bench(args: ModelArgs, opts) -> list:
    results = []
    for dp, tp in MESHES:
        mesh = build_mesh(tp)
        model = build_parallel_model(args, mesh, strategy=opts.strategy, sequence_parallel=tp > 1)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, args.vocab_size, (opts.global_batch, opts.seq_len + 1), generator=gen)
        per = opts.global_batch // dp
        mine = tokens[dp_rank(mesh) * per : (dp_rank(mesh) + 1) * per]
        inputs, targets = mine[:, :-1], mine[:, 1:]
        count = int((tokens[:, 1:] != -100).sum())
        _step(model, opt, inputs, targets, count)  # warm-up
        counter = CommCounter(mesh)
        with counter:
            _step(model, opt, inputs, targets, count)
        times = []
        for _ in range(opts.steps):
            dist.barrier()
            start = time.perf_counter()
            _step(model, opt, inputs, targets, count)
            dist.barrier()
            times.append(time.perf_counter() - start)
        # the median step: robust to the other tenants of a shared CPU
        seconds = sorted(times)[len(times) // 2]
        results.append(dict(mesh=(dp, tp), seconds=seconds, comm=counter.summary()))
        del model, opt
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=list(PRESETS), help="a preset model instead of the flags below (default: none)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default: %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--global-batch", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=7, help="timed steps; the median is reported (default: %(default)s)")
    parser.add_argument("--strategy", default="full", help="FSDP strategy (default: %(default)s)")
    opts = parser.parse_args()
    if opts.preset:
        args = ModelArgs.from_preset(opts.preset)
        if opts.seq_len > args.max_seq_len:
            parser.error(f"--seq-len {opts.seq_len} exceeds the preset's max_seq_len {args.max_seq_len}")
    else:
        args = ModelArgs(
            dim=opts.dim, n_layers=opts.layers, n_heads=opts.heads, n_kv_heads=opts.kv_heads,
            vocab_size=opts.vocab, multiple_of=64, max_seq_len=opts.seq_len,
        )
    tokens = opts.global_batch * opts.seq_len
    print(
        f"model dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv, vocab "
        f"{args.vocab_size} ({args.num_params():,} params); global batch {opts.global_batch} x {opts.seq_len} = "
        f"{tokens} tokens/step; strategy {opts.strategy}, sequence parallel when tp > 1; 4 gloo ranks, 1 thread each"
    )
    results = run_on_ranks(_bench, 4, args, opts)[0]
    print(f"{'dp x tp':8} {'step ms':>8} {'tokens/s':>9}   collectives per step: dim op calls payload-MiB (ring-sent MiB/rank)")
    for r in results:
        dp, tp = r["mesh"]
        comm = "; ".join(
            f"{dim} {op} {e['calls']} {e['bytes'] / 2**20:.2f} ({e['wire_bytes'] / 2**20:.2f})"
            for dim, ops in sorted(r["comm"].items())
            for op, e in sorted(ops.items())
        )
        print(f"{dp} x {tp:<4} {1000 * r['seconds']:8.0f} {tokens / r['seconds']:9.0f}   {comm}")


if __name__ == "__main__":
    main()
