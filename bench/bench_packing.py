"""Packing efficiency of whole conversations into windows (target: >= 90%).

A synthetic chat set whose conversation lengths (in tokens, BOS to the last
<|eot_id|>) are log-normal with median 300 and sigma 0.9 (mean ~450, about 1.6%
longer than seq 2048, so truncated), packed with ChatDataset's best-fit decreasing into
windows of seq_len + 1 = 2049 tokens. Prints efficiency (real tokens / window
tokens), truncated conversations and packing time, then the time to pack 1M
lengths with the same packer. The cache is built directly (tokens are random
ids; packing only sees lengths), so no tokenizer runs.

Prints figures; it is not a test.  Usage:
    PYTHONPATH=. python bench/bench_packing.py [--conversations 20000] [--median 300] [--sigma 0.9]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llama.data.chat_cache import ConversationCache  # noqa: E402
from llama.data.chat_packing import ChatDataset, pack_windows  # noqa: E402


def synthetic_cache(lengths: np.ndarray, seed: int) -> ConversationCache:
    """In-memory conversations of the given lengths: random ids, half of each trained."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, 128_000, offsets[-1], dtype=np.uint32)
    mask = (rng.random(offsets[-1]) < 0.5).astype(np.uint8)
    return ConversationCache(tokens, mask, offsets, [Path("synthetic.jsonl")], Path("synthetic.chat.json"),
                             hit=False, pad_id=128_004)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=20_000)
    parser.add_argument("--median", type=float, default=300)
    parser.add_argument("--sigma", type=float, default=0.9)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    lengths = np.maximum(8, rng.lognormal(np.log(args.median), args.sigma, args.conversations)).astype(np.int64)
    cache = synthetic_cache(lengths, args.seed)
    start = time.perf_counter()
    ds = ChatDataset(cache, args.seq_len, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"{args.conversations:,} conversations, log-normal lengths (median {np.median(lengths):.0f}, "
          f"mean {lengths.mean():.0f}, max {lengths.max():,}; sigma {args.sigma}), seq_len {args.seq_len}")
    print(f"packing efficiency {ds.packing_efficiency:.2%} ({ds.num_tokens:,} real tokens in {ds.num_samples:,} "
          f"windows of {args.seq_len + 1}), {ds.num_truncated} truncated, packed in {seconds:.2f}s")

    many = np.minimum(np.maximum(8, rng.lognormal(np.log(args.median), args.sigma, 1_000_000)), args.seq_len + 1)
    start = time.perf_counter()
    _, offsets = pack_windows(many.astype(np.int64), args.seq_len + 1, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"1,000,000 conversations: packed in {seconds:.2f}s, efficiency "
          f"{many.astype(np.int64).sum() / ((len(offsets) - 1) * (args.seq_len + 1)):.2%}")


if __name__ == "__main__":
    main()
