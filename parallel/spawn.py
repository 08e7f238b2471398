"""Run a function on N local processes joined in a gloo group: the one way tests and
CPU benchmarks start several ranks. `fn(*args)` runs on every rank after
`init_process_group`; the ranks' return values come back as a list, and any rank's
exception is raised here with its traceback."""

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


def _worker(rank, world_size, port, threads, fn, args, results, pg_timeout):
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
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, world_size, port, threads, fn, args, results, pg_timeout), daemon=True)
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
