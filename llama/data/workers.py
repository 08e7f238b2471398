"""Encoding chunks of a corpus in a background thread or in worker processes, results in order.

`map_in_order(fn, tokenizer, chunks, workers)` is what both caches build with:
one worker encodes in a thread of this process, more in fresh processes (never
forked), each loading its own tokenizer. Results come back in corpus order, so a
cache is the same bytes whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from typing import Callable, Iterator, Union

import llama.data.files as files  # files.PART_BYTES is read at each call: tests shrink it
from llama.data.errors import DataError
from llama.tokenizer import Tokenizer, load_tokenizer


def default_workers() -> int:
    """The CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


_worker_tokenizer: Tokenizer | None = None  # set in each worker process by _init_worker


def _tokenizer_source(tokenizer: Tokenizer) -> Union[str, Tokenizer]:
    """What a worker loads its tokenizer from: a name or a path, or (for a tokenizer
    load_tokenizer cannot make) the object itself, pickled."""
    if tokenizer.kind == "bytes":
        return "bytes"
    model_path = getattr(tokenizer, "model_path", None)
    return str(model_path) if model_path is not None else tokenizer


def _init_worker(source: Union[str, Tokenizer], fingerprint: str) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    tokenizer = load_tokenizer(source) if isinstance(source, str) else source
    if tokenizer.fingerprint != fingerprint:
        raise DataError(f"{source}: the tokenizer changed while the cache was being built; run again")
    _worker_tokenizer = tokenizer


def _with_worker_tokenizer(fn: Callable, chunk):
    return fn(_worker_tokenizer, chunk)


def useful_workers(workers: int, total_bytes: int) -> int:
    """No more workers than chunks: a small corpus is not worth starting processes for."""
    return max(1, min(workers, -(-total_bytes // files.PART_BYTES)))


def _process_context():
    """Never fork: a forked copy of a process running threads (torch, tiktoken) can deadlock.
    forkserver where the platform has one: a fresh process imports the llama package (and
    torch with it) once, then forks every worker from that clean state in milliseconds,
    instead of each spawned worker paying seconds for its own imports. Else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # The llama package, and torch with it: the imports that would cost each worker seconds.
    context.set_forkserver_preload(["llama"])
    if threading.current_thread() is threading.main_thread():  # only it may set handlers
        # Started with SIGINT ignored, the server and the workers it forks keep ignoring
        # it: Ctrl-C, sent to the whole process group, stops this process alone, with one
        # message instead of a traceback per process.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            signal.signal(signal.SIGINT, previous)
    return context


def map_in_order(fn: Callable, tokenizer: Tokenizer, chunks: Iterator, workers: int = 1) -> Iterator:
    """fn(tokenizer, chunk) for every chunk, yielded in the order of the chunks.

    workers == 1: in a background thread of this process, so reading the next chunk
    overlaps encoding this one. workers > 1: in that many fresh processes (forkserver
    or spawn, never fork), each loading its own tokenizer by path (a tiktoken or
    SentencePiece object does not pickle cheaply). At most two chunks per worker are
    in flight, so memory stays bounded on a corpus of any size, and the first error
    in corpus order is the one raised.
    """
    if workers <= 1:
        pool = ThreadPoolExecutor(1)
        submit = lambda chunk: pool.submit(fn, tokenizer, chunk)  # noqa: E731
    else:
        pool = ProcessPoolExecutor(workers, mp_context=_process_context(), initializer=_init_worker,
                                   initargs=(_tokenizer_source(tokenizer), tokenizer.fingerprint))
        submit = lambda chunk: pool.submit(_with_worker_tokenizer, fn, chunk)  # noqa: E731
    in_flight: deque[Future] = deque()
    try:
        for chunk in chunks:
            in_flight.append(submit(chunk))
            if len(in_flight) >= 2 * workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

