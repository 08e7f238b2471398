"""`python -m llama.data prepare`: tokenizing a corpus ahead of training, into the cache train.py opens."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from llama.data.chat import DATA_FORMATS, TRAIN_ON, is_chat_data, is_preference_data
from llama.data.chat_cache import load_conversation_cache
from llama.data.pair_cache import load_pair_cache
from llama.data.errors import DataError
from llama.data.files import PathLike, default_corpus_paths
from llama.data.token_cache import load_token_cache
from llama.data.workers import default_workers
from llama.tokenizer import Tokenizer, TokenizerFileError, load_tokenizer

PREPARE_DESCRIPTION = """\
Tokenize a corpus ahead of training, on every core, into exactly the cache that
train.py opens for the same --data, --tokenizer, --cache-dir, --data-format,
--train-on, --skip-bad-lines and --val-data: train.py then starts without
tokenizing. Chat and instruction .jsonl data go to the conversation cache, as in
train.py; preference pairs ({"prompt", "chosen", "rejected"}, for --objective dpo)
to the pair cache. The cache is the same byte for byte whatever the number of workers.

  python -m llama.data prepare --data corpus/ --tokenizer tokenizer.model
"""


def prepare(data: Sequence[PathLike] | None, tokenizer: Tokenizer, cache_dir: PathLike | None = None, *,
            data_format: str = "auto", train_on: str = "assistant", skip_bad_lines: bool = False,
            val_data: Sequence[PathLike] | None = None, workers: int = 1, quiet: bool = False) -> list:
    """The caches train.py's build_data opens for the same settings, built if missing:
    [train cache] or [train cache, validation cache]. Each worker uses one core."""
    sources = data or default_corpus_paths()
    # as in train.py: the training data decides for both
    pairs, chat = is_preference_data(sources, data_format), is_chat_data(sources, data_format)
    caches = []
    for paths in [sources] + ([val_data] if val_data else []):
        if pairs:
            caches.append(load_pair_cache(paths, tokenizer, cache_dir, data_format=data_format,
                                          skip_bad_lines=skip_bad_lines, quiet=quiet, workers=workers))
        elif chat:
            caches.append(load_conversation_cache(
                paths, tokenizer, cache_dir, data_format=data_format, train_on=train_on,
                skip_bad_lines=skip_bad_lines, quiet=quiet, workers=workers))
        else:
            caches.append(load_token_cache(paths, tokenizer, cache_dir, quiet=quiet, workers=workers,
                                           num_threads=1))
    return caches


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m llama.data", description="Data tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser("prepare", help="tokenize a corpus into the cache train.py reads",
                            description=PREPARE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="*", metavar="PATH",
                   help="text / .jsonl files or directories, as given to train.py (default: Python's stdlib sources)")
    p.add_argument("--tokenizer", default="bytes",
                   help="tokenizer.model (Llama 3 or 2) or 'bytes', as given to train.py (default: %(default)s)")
    p.add_argument("--cache-dir", help="token cache directory (default: .token_cache next to the data)")
    p.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help=".jsonl format: chat messages, alpaca, prompt-completion, text or preference pairs "
                        "(default: detected per file)")
    p.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                   help="chat data: which tokens the loss applies to (default: %(default)s)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="count and report bad .jsonl lines instead of stopping (default: stop)")
    p.add_argument("--val-data", nargs="*", metavar="PATH",
                   help="held-out files or directories, as given to train.py (default: none)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="processes tokenizing in parallel, one core each (default: %(default)s, the cores "
                        "this process may use)")
    opts = parser.parse_args(argv)
    if opts.workers < 1:
        p.error(f"--workers must be >= 1, got {opts.workers}")
    try:
        prepare(opts.data, load_tokenizer(opts.tokenizer), opts.cache_dir, data_format=opts.data_format,
                train_on=opts.train_on, skip_bad_lines=opts.skip_bad_lines, val_data=opts.val_data,
                workers=opts.workers)
    except (DataError, TokenizerFileError, OSError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: no cache was written for the data being tokenized", file=sys.stderr, flush=True)
        return 130
    return 0
