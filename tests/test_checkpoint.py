"""llama.training.checkpoint.Checkpointer on two gloo ranks: a save that fails on one rank ends
every rank promptly with the same error and renames nothing; async saves copy into one
stager's buffers, reused from save to save and freed by close()."""

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llama import ModelArgs
from parallel.compat import stager_reuses_buffers
from parallel.spawn import run_on_ranks

TINY = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16, max_seq_len=16)
COLLECTIVE_TIMEOUT = 20  # seconds: a rank left waiting fails the test this soon instead of hanging


def _trained(steps: int = 1):
    """A 2-rank FSDP model and its AdamW after `steps` steps (so the optimizer has state)."""
    from parallel.control import control_group
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh

    control_group()
    model = build_parallel_model(TINY, build_mesh(tp=1), seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        step(model, optimizer)
    return model, optimizer


def step(model, optimizer) -> None:
    tokens = torch.randint(0, TINY.vocab_size, (2, 9), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(tokens[:, :-1]).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _full(model) -> dict:
    return {name: p.detach().full_tensor().clone() for name, p in model.named_parameters()}


def _fail_on_rank(rank: int, how: str) -> None:
    """Make this rank's part of the next save fail: its background upload (`upload`: the
    write finishes, then its future reports an error, as a failed flush or verify would),
    its own file before the write (`rng`: torch.save of its RNG state), or on rank 0 the
    partial directory (`directory`)."""
    if dist.get_rank() != rank:
        return
    import torch.distributed.checkpoint as dcp
    from concurrent.futures import Future

    if how == "upload":
        real = dcp.async_save

        def failing_async_save(*args, **kwargs):
            response = real(*args, **kwargs)
            upload = getattr(response, "upload_completion", response)
            failed = Future()
            upload.add_done_callback(lambda _: failed.set_exception(OSError("injected: disk quota exceeded")))
            return failed

        dcp.async_save = failing_async_save
    elif how == "rng":
        real_save = torch.save

        def failing_save(obj, f, *args, **kwargs):
            if str(f).endswith(f"rng_rank{rank}.pt"):
                raise OSError("injected: read-only file system")
            return real_save(obj, f, *args, **kwargs)

        torch.save = failing_save
    else:
        real_mkdir = Path.mkdir

        def failing_mkdir(self, *args, **kwargs):
            if self.name.endswith(".partial"):
                raise PermissionError("injected: permission denied")
            return real_mkdir(self, *args, **kwargs)

        Path.mkdir = failing_mkdir


def _save_that_fails(save_dir: str, async_save: bool, how: str, rank: int) -> dict:
    from llama.training.checkpoint import CheckpointError, Checkpointer

    model, optimizer = _trained()
    checkpoints = Checkpointer(Path(save_dir), keep=2, async_save=async_save)
    checkpoints.save(1, model, optimizer, {"data": {}})
    checkpoints.wait()
    _fail_on_rank(rank, how)
    start = time.monotonic()
    error = None
    try:
        checkpoints.save(2, model, optimizer, {"data": {}})
        checkpoints.close()  # an async save's failure surfaces here
    except CheckpointError as err:
        error = str(err)
    return {"error": error, "seconds": time.monotonic() - start, "last_saved": checkpoints.last_saved}


@pytest.mark.parametrize("async_save, how, rank", [(True, "upload", 1), (False, "rng", 1), (True, "directory", 0)],
                         ids=["async-upload", "sync-rng-file", "rank0-directory"])
def test_a_save_failing_on_one_rank_ends_every_rank_with_one_error_and_renames_nothing(tmp_path, async_save, how, rank):
    results = run_on_ranks(_save_that_fails, 2, str(tmp_path), async_save, how, rank, timeout=120,
                           pg_timeout=COLLECTIVE_TIMEOUT)
    errors = {r["error"] for r in results}
    assert len(errors) == 1 and None not in errors, errors  # every rank, the same message
    (error,) = errors
    assert f"step 2 failed on rank {rank}" in error and "injected" in error
    assert str(tmp_path / "step_00000002") in error and str(tmp_path / "step_00000001") in error
    assert all(r["seconds"] < COLLECTIVE_TIMEOUT / 2 for r in results), results  # agreed, not timed out
    assert all(r["last_saved"] == 1 for r in results)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no final, no partial left


def _two_async_saves(save_dir: str) -> dict:
    from llama.training.checkpoint import Checkpointer, load_checkpoint

    model, optimizer = _trained()
    checkpoints = Checkpointer(Path(save_dir), keep=2, async_save=True)
    stager, staged, kept, closes = checkpoints.stager, [], [], []
    real_stage, real_close = stager.stage, stager.close

    def recording_stage(state):
        out = real_stage(state)
        kept.append(out)  # alive, so that a fresh copy cannot land at the freed addresses by chance
        staged.append(sorted(t.to_local().data_ptr() for t in out["model"].values()))
        return out

    stager.stage = recording_stage
    stager.close = lambda: (closes.append(1), real_close())
    checkpoints.save(1, model, optimizer, {"data": {}})
    step(model, optimizer)
    want = _full(model)
    checkpoints.save(2, model, optimizer, {"data": {}})  # waits for save 1, copies into its buffers
    step(model, optimizer)  # training goes on while save 2 is written
    checkpoints.close()
    dist.barrier()  # rank 0 renames the finished checkpoint into place after the others return
    load_checkpoint(Path(save_dir) / "step_00000002", model, optimizer)
    got = _full(model)
    return {
        "stages": len(staged),
        "same_buffers": len(staged) == 2 and staged[0] == staged[1],
        "closed": len(closes),
        "stager_after_close": checkpoints.stager,
        "restored": all(torch.equal(got[n], want[n]) for n in want),
    }


def test_async_saves_copy_into_one_stagers_buffers_which_close_frees(tmp_path):
    """Both saves go through the checkpointer's one stager; the second copies into the
    first one's host buffers (no fresh allocation, no fresh pinning on CUDA), holds the
    weights of its own step although training changed them while it was written, and
    close() closes the stager."""
    for result in run_on_ranks(_two_async_saves, 2, str(tmp_path), timeout=120, pg_timeout=COLLECTIVE_TIMEOUT):
        assert result["stages"] == 2 and result["closed"] == 1 and result["stager_after_close"] is None
        assert result["same_buffers"] == stager_reuses_buffers(pin_memory=False)
        assert result["restored"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]
