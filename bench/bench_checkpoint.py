"""Step-time overhead of saving a checkpoint every N steps: synchronous against async
(`train.py --async-checkpoint`), on the 2x2 CPU config of DEVELOPERS.md.

    PYTHONPATH=. python bench/bench_checkpoint.py [--steps 30] [--save-every 10] [--repeats 2]

4 gloo processes, dim 512, 4 layers, 8 / 4 heads, vocab 8192, seq 512, micro-batch 4
per dp rank, fp32, fused AdamW: train.py's step. Each variant (no saves, sync, async) runs
the same steps; its time runs from the first step to the end of its last save (an async
save's wait included). Variants alternate, `--repeats` times, and each figure is the
median. Overhead = (time - time without saves) / steps. The checkpoint holds the model,
the AdamW state and the RNG state: 12 bytes per parameter, about 250 MB."""

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from llama import ModelArgs
from llama.data.windows import Batch
from llama.training.checkpoint import Checkpointer
from parallel.fsdp import build_parallel_model
from parallel.losses import vocab_parallel_cross_entropy
from parallel.mesh import build_mesh, dp_rank, dp_size
from parallel.train_utils import clip_grad_norm_

ARGS = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=512)
VARIANTS = ("none", "sync", "async")


def _bench(opts, root: str) -> dict:
    mesh = build_mesh(2)
    gen = torch.Generator().manual_seed(dp_rank(mesh))
    tokens = torch.randint(0, ARGS.vocab_size, (opts.micro_batch, opts.seq_len + 1), generator=gen)
    batch = Batch(tokens[:, :-1], tokens[:, 1:], None)
    global_tokens = opts.micro_batch * opts.seq_len * dp_size(mesh)
    model = build_parallel_model(ARGS, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    checkpointers = {
        "sync": Checkpointer(Path(root) / "sync", keep=1),
        "async": Checkpointer(Path(root) / "async", keep=1, async_save=True),
    }

    def step():
        logits = model(batch.inputs)
        (vocab_parallel_cross_entropy(logits, batch.targets, reduction="sum") / global_tokens).backward()
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(), step()  # warm-up, and the optimizer state exists
    times = {v: [] for v in VARIANTS}
    save_calls = {v: [] for v in VARIANTS}
    for _ in range(opts.repeats):
        for variant in VARIANTS:
            dist.barrier()
            start = time.perf_counter()
            for i in range(1, opts.steps + 1):
                step()
                if variant != "none" and i % opts.save_every == 0:
                    call = time.perf_counter()
                    checkpointers[variant].save(i, model, optimizer, {"data": {}})
                    save_calls[variant].append(time.perf_counter() - call)
            if variant != "none":
                checkpointers[variant].close()
            dist.barrier()
            times[variant].append(time.perf_counter() - start)
    size = sum(f.stat().st_size for f in (Path(root) / "sync").rglob("*") if f.is_file())
    return {
        "times": {v: statistics.median(t) for v, t in times.items()},
        "save_call": {v: statistics.median(t) if t else 0.0 for v, t in save_calls.items()},
        "bytes": size,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="steps per variant and repeat (default: %(default)s)")
    parser.add_argument("--save-every", type=int, default=10, help="steps between saves (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the three variants (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="(default: %(default)s)")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per dp rank (default: %(default)s)")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary directory)")
    opts = parser.parse_args()

    from parallel.spawn import run_on_ranks

    root = opts.dir or tempfile.mkdtemp(prefix="bench_checkpoint_")
    try:
        result = run_on_ranks(_bench, 4, opts, root, timeout=3600)[0]
    finally:
        if not opts.dir:
            shutil.rmtree(root, ignore_errors=True)
    base = result["times"]["none"]
    saves = opts.steps // opts.save_every
    print(f"2x2 CPU config, {opts.steps} steps, a save every {opts.save_every} ({saves} saves of "
          f"{result['bytes'] / 1e6:.0f} MB), median of {opts.repeats}:")
    print(f"{'variant':8s} {'total s':>8s} {'ms/step':>8s} {'overhead ms/step':>17s} {'overhead':>9s} {'save call s':>12s}")
    for variant in VARIANTS:
        total = result["times"][variant]
        extra = (total - base) / opts.steps
        print(f"{variant:8s} {total:8.1f} {1000 * total / opts.steps:8.0f} {1000 * extra:17.0f} "
              f"{100 * (total - base) / base:8.1f}% {result['save_call'][variant]:12.2f}")


if __name__ == "__main__":
    main()
