"""Context parallelism on CPU: one sequence of --seq-len tokens on cp 1 (one process)
against cp 2 (two gloo processes, each holding half of the sequence in load-balanced
chunks), per rank: the training step's time and its peak memory.

    PYTHONPATH=. python bench/bench_cp.py [--seq-len 2048] [--steps 3]

A step is forward, loss, backward and the sum of the gradients over cp (FSDP's job in
training, a plain all-reduce here). Reported per rank (the slowest or largest rank):
  step ms        wall time of a step (median), which other tenants of a shared CPU inflate
  CPU ms         the process's own CPU time in a step: its compute, whatever the load
  saved MiB      the activations autograd saves for backward (parameters not counted):
                 what context parallelism divides
  peak/rise MiB  resident set: its peak (VmHWM), and how far the steps raised it above
                 the resident set before them (allocator slack included)
Numbers, not pass/fail: on a CPU they say how cp 1 and cp 2 compare, not what a GPU
cluster does. One thread per rank."""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from llama import ModelArgs, Transformer
from parallel.losses import vocab_parallel_cross_entropy
from parallel.spawn import run_on_ranks


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only)")


def _saved_activation_bytes(model, forward) -> int:
    """Bytes of the tensors autograd saves in `forward()`, parameters aside, each storage once."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(saved.values())


def _bench(args: ModelArgs, seq_len: int, steps: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from parallel.context import split_for_cp

    cp = dist.get_world_size()
    cp_mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",)) if cp > 1 else None
    with torch.device("meta"):
        model = Transformer(args, cp_mesh=cp_mesh)
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, args.vocab_size, (1, seq_len + 1), generator=gen)
    inputs, targets = (split_for_cp(t, cp_mesh) for t in (tokens[:, :-1], tokens[:, 1:]))

    def forward():
        return vocab_parallel_cross_entropy(model(inputs), targets, reduction="sum") / seq_len

    def step():
        forward().backward()
        if cp > 1:
            flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
            dist.all_reduce(flat)
        model.zero_grad(set_to_none=True)

    rss_before = _memory_kib("VmRSS")
    saved = _saved_activation_bytes(model, forward)  # also the warm-up
    times, cpu_times = [], []
    for _ in range(steps):
        dist.barrier()
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        cpu_times.append(time.process_time() - cpu_start)
        dist.barrier()
        times.append(time.perf_counter() - start)
    peak = _memory_kib("VmHWM")
    return {
        "step ms": 1000 * sorted(times)[len(times) // 2],
        "CPU ms": 1000 * sorted(cpu_times)[len(cpu_times) // 2],
        "saved MiB": saved / 2**20,
        "peak MiB": peak / 1024,
        "rise MiB": (peak - rss_before) / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens in the sequence (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps; the median is reported (default: %(default)s)")
    parser.add_argument("--dim", type=int, default=256, help="model width (default: %(default)s)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default: %(default)s)")
    opts = parser.parse_args()
    args = ModelArgs(
        dim=opts.dim, n_layers=opts.layers, n_heads=8, n_kv_heads=2, vocab_size=2048, multiple_of=64,
        max_seq_len=opts.seq_len,
    )
    print(
        f"model dim {args.dim}, {args.n_layers} layers, {args.n_heads} heads / {args.n_kv_heads} kv, vocab "
        f"{args.vocab_size} ({args.num_params():,} params); one sequence of {opts.seq_len} tokens; 1 thread per rank"
    )
    columns = ["step ms", "CPU ms", "saved MiB", "peak MiB", "rise MiB"]
    print(f"{'cp':>3} {'tokens/rank':>11} " + " ".join(f"{c:>10}" for c in columns) + "   (per rank, the largest)")
    for cp in (1, 2):
        ranks = run_on_ranks(_bench, cp, args, opts.seq_len, opts.steps)
        print(f"{cp:>3} {opts.seq_len // cp:>11} " + " ".join(f"{max(r[c] for r in ranks):10.0f}" for c in columns))


if __name__ == "__main__":
    main()
