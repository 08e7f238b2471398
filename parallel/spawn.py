"""Run a function on N local processes joined in a gloo group: the one way tests and
CPU benchmarks start several ranks. `fn(*args)` runs on every rank after
`init_process_group`; the ranks' return values come back as a list, and any rank's
exception is raised here with its traceback.

Where the platform has it, the ranks are forked from a fork server that has imported
torch (and whatever `preload` names) once, instead of spawned interpreters that import
it again at every launch: a 4-rank launch then starts in about 0.2 s instead of 3-6 s
on a 2-core machine. Each rank still starts from the server's clean state, never from
the caller's, and takes the caller's current environment variables and directory, as a
spawned one would."""

import datetime
import os
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_PRELOAD = ["torch", "torch.distributed"]
_context = None


def preload(modules: list) -> None:
    """Modules the fork server imports once for every later launch (tests name the
    project's heavy ones). Only before the first launch: the server is started then."""
    if _context is not None:
        raise RuntimeError("parallel.spawn.preload: the fork server has started; call preload before any run_on_ranks")
    _PRELOAD.extend(m for m in modules if m not in _PRELOAD)


def _start_context():
    global _context
    if _context is None:
        if "forkserver" in mp.get_all_start_methods():
            _context = mp.get_context("forkserver")
            _context.set_forkserver_preload(list(_PRELOAD))
        else:
            _context = mp.get_context("spawn")
    return _context


def _worker(rank, world_size, port, threads, fn, args, results, pg_timeout, environ, cwd):
    # the caller's environment and directory now, not the fork server's from its start
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(threads)
    try:
        options = {} if pg_timeout is None else {"timeout": datetime.timedelta(seconds=pg_timeout)}
        dist.init_process_group("gloo", rank=rank, world_size=world_size, **options)
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: B036 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_on_ranks(fn, world_size: int, *args, threads: int = 1, timeout: float = 600.0, pg_timeout=None) -> list:
    """pg_timeout: seconds a collective may wait (default: torch's)."""
    ctx = _start_context()
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, port, threads, fn, args, results, pg_timeout, dict(os.environ), os.getcwd()),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    outputs, failures, reported = [None] * world_size, [], set()
    deadline = time.monotonic() + timeout
    try:
        while len(reported) < world_size and not failures:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode not in (None, 0)]
                if dead:
                    failures.append(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting")
                elif time.monotonic() > deadline:
                    failures.append(f"timed out after {timeout:.0f} s waiting for ranks {sorted(set(range(world_size)) - reported)}")
                continue
            reported.add(rank)
            if ok:
                outputs[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
    finally:
        for p in procs:
            p.join(timeout=5 if failures else 60)
            if p.is_alive():
                p.kill()
    if failures:
        raise RuntimeError("a rank failed\n" + "\n".join(failures))
    return outputs
