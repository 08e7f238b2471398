"""Training-step time with document masking against without, on 4 CPU processes (gloo).

    PYTHONPATH=. python bench/bench_doc_masking.py [--steps 6] [--docs-per-window 4]

The 2x2 CPU config of DEVELOPERS.md: dim 512, 4 layers, 8 heads / 4 kv heads, vocab
8192, seq 512, micro-batch 4 per dp rank, fp32, sequence parallelism, FSDP "full".
Each packed row holds about `--docs-per-window` documents (lengths drawn at random).
The two variants alternate step by step on the same model, so that a machine whose
speed drifts affects both alike; the figure is the ratio of the median step times.
Target: masked at most 15% slower."""

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist

from llama import ModelArgs
from parallel.fsdp import build_parallel_model
from parallel.losses import vocab_parallel_cross_entropy
from parallel.mesh import build_mesh, dp_rank, dp_size
from parallel.train_utils import clip_grad_norm_

ARGS = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=512)


def packed_document_ids(rows: int, seq: int, docs_per_window: int, gen: torch.Generator) -> torch.Tensor:
    """Rows of about docs_per_window documents: docs_per_window - 1 random cut points per row."""
    ids = torch.zeros(rows, seq, dtype=torch.int64)
    for r in range(rows):
        cuts = torch.randperm(seq - 1, generator=gen)[: docs_per_window - 1] + 1
        for cut in cuts.tolist():
            ids[r, cut:] += 1
    return ids


def _bench(opts) -> dict:
    mesh = build_mesh(2)
    model = build_parallel_model(ARGS, mesh, sequence_parallel=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(dp_rank(mesh))
    tokens = torch.randint(0, ARGS.vocab_size, (opts.micro_batch, opts.seq_len + 1), generator=gen)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    document_ids = packed_document_ids(opts.micro_batch, opts.seq_len, opts.docs_per_window, gen)
    global_tokens = opts.micro_batch * opts.seq_len * dp_size(mesh)

    def step(ids):
        logits = model(inputs, document_ids=ids)
        (vocab_parallel_cross_entropy(logits, targets, reduction="sum") / global_tokens).backward()
        clip_grad_norm_(model, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {"causal": [], "documents": []}
    step(None), step(document_ids)  # warm-up
    for _ in range(opts.steps):
        for name, ids in (("causal", None), ("documents", document_ids)):
            dist.barrier()
            start = time.perf_counter()
            step(ids)
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each variant (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=512, help="default: %(default)s")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per dp rank (default: %(default)s)")
    parser.add_argument("--docs-per-window", type=int, default=4, help="documents per packed row (default: %(default)s)")
    opts = parser.parse_args()

    from parallel.spawn import run_on_ranks

    result = run_on_ranks(_bench, 4, opts)[0]
    tokens = opts.micro_batch * opts.seq_len * 2
    for name, seconds in result.items():
        print(f"{name:10s} {1000 * seconds:7.0f} ms/step  {tokens / seconds:6.0f} tok/s")
    ratio = result["documents"] / result["causal"]
    print(f"document masking: {100 * (ratio - 1):+.1f}% step time (target: at most +15%)")


if __name__ == "__main__":
    main()
