"""Tokenization throughput of the data pipeline against a bare tiktoken loop.

Builds a corpus of tens of MB from the Python standard library sources
(repeated until large enough) in a temporary directory, then measures with the
Llama 3 tokenizer:

- bare tiktoken: `enc.encode(text)` per document, one thread, text already in memory;
- the pipeline: `load_token_cache` end to end (read, decode, encode, write
  the uint32 cache), on one thread and on all cores;
- a cache-hit load.

Prints figures; it is not a test.  Usage:
    PYTHONPATH=. python bench/bench_tokenize.py [--mb 32] [--threads N] [--repeat 3]
"""

import argparse
import importlib.resources
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import sys

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import tiktoken
from tiktoken.load import load_tiktoken_bpe

from llama.data.token_cache import load_token_cache
from llama.tokenizer import LLAMA3_SPLIT_PATTERN, llama3_special_tokens, load_tokenizer

LLAMA3_MODEL = Path(str(importlib.resources.files("llama_models") / "llama3" / "tokenizer.model"))


def stdlib_sources() -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py")
                  if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts)


def build_corpus(root: Path, target_bytes: int) -> int:
    """Copy stdlib sources into root/rep<k>/ until target_bytes; returns the byte count."""
    sources, total, rep = stdlib_sources(), 0, 0
    while total < target_bytes:
        for i, src in enumerate(sources):
            dst = root / f"rep{rep}" / f"{i:05d}_{src.name}"
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            total += dst.stat().st_size
            if total >= target_bytes:
                break
        rep += 1
    return total


def best_of(repeat: int, fn, setup=lambda: None):
    """(result, fastest seconds) over `repeat` runs: the machine may be shared."""
    times = []
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=32.0, help="corpus size in MB")
    parser.add_argument("--threads", type=int, default=None, help="pipeline threads (default: all cores)")
    parser.add_argument("--repeat", type=int, default=3, help="report the best of this many runs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        nbytes = build_corpus(data, int(args.mb * 1e6))
        files = sorted(data.rglob("*.py"))
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        mb = nbytes / 1e6
        print(f"corpus: {len(files)} files, {mb:.1f} MB (stdlib sources, repeated)")

        ranks = load_tiktoken_bpe(str(LLAMA3_MODEL))
        enc = tiktoken.Encoding("llama3", pat_str=LLAMA3_SPLIT_PATTERN, mergeable_ranks=ranks,
                                special_tokens=llama3_special_tokens(len(ranks)))
        bare_tokens, bare_s = best_of(args.repeat, lambda: sum(len(enc.encode(text)) for text in texts))
        print(f"bare tiktoken loop (1 thread, in memory): {mb / bare_s:6.1f} MB/s  "
              f"({bare_s:.2f} s, {bare_tokens:,} tokens)")

        tokenizer = load_tokenizer(LLAMA3_MODEL)
        cache_dir = Path(tmp) / "cache"

        def build(num_threads):
            return best_of(args.repeat, setup=lambda: shutil.rmtree(cache_dir, ignore_errors=True),
                           fn=lambda: load_token_cache(data, tokenizer, cache_dir, quiet=True,
                                                       num_threads=num_threads))

        _, one_s = build(1)
        print(f"pipeline (files -> cache, 1 thread):     {mb / one_s:6.1f} MB/s  ({one_s:.2f} s)")
        cache, pipe_s = build(args.threads)
        assert not cache.hit
        # Not exactly bare + BOS/EOS: like Meta, the pipeline cuts documents of
        # > 400k characters (pydoc_data/topics.py) into chunks, which can change
        # a token at each cut.
        print(f"pipeline (files -> cache, {args.threads or 'all'} threads): {mb / pipe_s:6.1f} MB/s  "
              f"({pipe_s:.2f} s, {cache.num_tokens - 2 * cache.num_docs:,} tokens + BOS/EOS)")

        hit, hit_s = best_of(args.repeat, lambda: load_token_cache(data, tokenizer, cache_dir, quiet=True))
        assert hit.hit
        print(f"ratio pipeline / bare tiktoken: {bare_s / pipe_s:.2f}x (1 thread: {bare_s / one_s:.2f}x)")
        print(f"cache-hit load: {hit_s * 1e3:.1f} ms ({hit.num_tokens:,} tokens, {len(files)} files stat'ed)")

if __name__ == "__main__":
    main()
