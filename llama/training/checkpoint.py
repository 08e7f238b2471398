"""Training checkpoints that a crash, a kill or a preemption at any moment leaves readable.

A checkpoint is a torch.distributed.checkpoint directory `step_NNNNNNNN/` with each
rank's shards, each rank's RNG state, model_args.json and trainer.json. It is written
under a hidden `.step_NNNNNNNN.partial` name and renamed into place by rank 0 only after
every rank's write has finished, so the newest visible checkpoint is always complete. A
write that fails on any rank is agreed on by all of them, renames nothing, and raises
one CheckpointError on every rank.

Every decision about checkpoints (which one to resume from, whether the directory already
holds a run) is made once, by rank 0, and broadcast: ranks on different nodes may see a
shared filesystem differently (parallel/control.py carries these messages).

A LoRA run's checkpoint holds what trains and nothing of the frozen base: the adapters,
their optimizer state, the data position and RNG. Its trainer.json records the base
(`base`: the --checkpoint path and its fingerprint, llama.weights.peft.base_fingerprint),
so a resume rebuilds the base from there and refuses another one. A LoRA run from random
init (no --checkpoint) records its seed instead: the base is drawn again, alike on any
mesh, by Transformer.init_weights(seed)."""

import json
import logging
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from parallel.control import broadcast_from, broadcast_from_rank0, max_over_ranks

PREFIX = "step_"
# A sharded tensor smaller than this (its whole, in bytes) is saved whole, once. DCP's
# FileSystemWriter writes each stored chunk of a tensor as its own torch.save archive, about
# 1.55 KB of zip records and pickle whatever the chunk's size, and lists it in .metadata (about
# 0.25 KB more); a shard of a small tensor is mostly that. A LoRA run's adapters and their
# AdamW state are small tensors split over dp and tp: at test_train's TINY on 2x2, 304 chunks
# of 117 KB of numbers took 690 KB, 33% of a full checkpoint; saved whole, 136 chunks. At most
# this much per small tensor is gathered on each rank, so large models' shards are untouched.
WHOLE_BELOW = 64 * 1024


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(PREFIX):])


def complete_checkpoints(save_dir: Path) -> list:
    """Finished checkpoint directories, oldest first (those with trainer.json, written last)."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        return []
    found = [d for d in save_dir.glob(f"{PREFIX}*") if d.is_dir() and (d / "trainer.json").is_file()]
    return sorted(found, key=checkpoint_step)


# ---------------------------------------------------------------- decisions made once


def base_record(opts) -> Optional[dict]:
    """What a LoRA run's checkpoints say of the frozen base they adapt (None for a run that
    trains every parameter): the --checkpoint it was read from and its fingerprint, or,
    from random init, the --seed it was drawn with."""
    from llama.config import ModelArgs
    from llama.weights.peft import base_fingerprint, random_base_fingerprint

    if not opts.lora_rank:
        return None
    if opts.checkpoint is None:
        args = ModelArgs.from_preset(opts.preset)
        return {"checkpoint": None, "seed": opts.seed, "fingerprint": random_base_fingerprint(args, opts.seed)}
    path = Path(opts.checkpoint).absolute()
    return {"checkpoint": str(path), "fingerprint": base_fingerprint(path)}


def check_same_base(found: Path, base: Optional[dict]) -> None:
    """The checkpoint `found` continues a run on this base (both None: neither LoRA)."""
    recorded = json.loads((found / "trainer.json").read_text()).get("base")
    if recorded is None and base is None:
        return
    if recorded is None:
        raise ValueError(f"{found}: a checkpoint of a run that trains every parameter; it cannot resume with "
                         "--lora-rank. Drop the --lora-* flags, or start the LoRA run in another --save-dir")
    if base is None:
        raise ValueError(f"{found}: holds LoRA adapters only; resume it with the run's --lora-* flags "
                         f"(--config {found.parent / 'config.toml'} has them)")
    if recorded["fingerprint"] != base["fingerprint"]:
        def told(b):
            return f"--checkpoint {b['checkpoint']}" if b.get("checkpoint") else f"random init with --seed {b.get('seed')}"
        raise ValueError(
            f"{found}: its adapters were trained on {told(recorded)} (fingerprint {recorded['fingerprint'][:12]}), "
            f"but this run's base is {told(base)} (fingerprint {base['fingerprint'][:12]}); resume with the "
            "run's own base, or start a new run in another --save-dir"
        )


def decide_resume(save_dir: Path, resume: bool, base: Optional[dict] = None) -> Optional[Path]:
    """The checkpoint to resume from, as rank 0 sees it; None for a fresh run. A fresh run
    in a directory that already holds checkpoints is refused on every rank at start-up
    (rather than at its first save, or by quietly mixing two runs), and so is a resume on
    another base than the checkpoint's (`base`: base_record's)."""
    answer = None
    if dist.get_rank() == 0:
        found = complete_checkpoints(save_dir)
        if found and not resume:
            answer = ValueError(
                f"--save-dir {save_dir} already holds checkpoints of a run (newest: {found[-1].name}); "
                "pass --resume to continue it, or choose another --save-dir"
            )
        elif found:
            try:
                check_same_base(found[-1], base)
                answer = str(found[-1])
            except ValueError as err:
                answer = err
    answer = broadcast_from_rank0(answer)
    if isinstance(answer, Exception):
        raise answer
    return None if answer is None else Path(answer)


# ---------------------------------------------------------------- saving


def fault_injection(where: str, step: int, rank: int) -> bool:
    """Tests break a run at chosen points: LLAMA_TP_FAULT="where:step:rank[:SIGNAL]" sends
    SIGNAL (default SIGKILL) to this process there; at where="nan" it returns True instead,
    and the caller makes that step's loss NaN. Several faults are joined by commas
    ("nan:2:0,nan:4:0"). Only the first attempt of a torchrun job is hit, so that a restart
    can finish the run."""
    spec = os.environ.get("LLAMA_TP_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return False
    for fault in spec.split(","):
        fault_where, fault_step, fault_rank, *sig = fault.split(":")
        if (fault_where, int(fault_step), int(fault_rank)) != (where, step, rank):
            continue
        if where != "nan":
            os.kill(os.getpid(), getattr(signal, sig[0]) if sig else signal.SIGKILL)
        return True
    return False


class CheckpointError(RuntimeError):
    """A save that failed on some rank, raised alike on every rank once they have agreed
    on it: nothing was renamed into place, so the newest visible checkpoint is the one
    before it."""


@dataclass
class _Pending:
    step: int
    partial: Path
    final: Path
    trainer: dict  # trainer.json's contents, taken when the save began
    model_args: Any
    upload: Any = None  # the future of an async save


class _AlreadyStaged:
    """The stager dcp.async_save gets for a state that is already our host copy: it copies
    nothing again (an AsyncStager by its members)."""

    _synchronize_after_execute = False
    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


class Checkpointer:
    """Saves checkpoints, synchronously or (async_save=True) in a background thread after a
    copy of this rank's shards to CPU memory, so that training goes on while they are
    written. At most one save is in flight: the next save and close() wait for it.

    The copy goes into host buffers that one stager (parallel.compat.checkpoint_stager)
    keeps from save to save, pinned on CUDA: close() frees them. A failure on any rank,
    before or during the write, is agreed on by every rank (one small all-reduce on the
    control group) before anything is renamed, and raised on every rank as one
    CheckpointError naming the step, the directory and the failing rank."""

    def __init__(self, save_dir: Path, keep: int, async_save: bool = False, every: int = 0,
                 base: Optional[dict] = None):
        from parallel.compat import checkpoint_stager

        self.save_dir = Path(save_dir)
        self.base = base  # a LoRA run's base_record, into every trainer.json
        self.keep = keep
        self.async_save = async_save
        self.every = every  # steps between saves; 0: only at the last step
        self.rank = dist.get_rank()
        self.pending: Optional[_Pending] = None
        self.last_saved: Optional[int] = None
        self._deleting: Optional[threading.Thread] = None
        # the background writer's collectives must not interleave with training's
        self._writer_group = dist.new_group(backend="gloo") if async_save else None
        self.stager = checkpoint_stager(pin_memory=torch.cuda.is_available()) if async_save else None
        self._whole: dict = {}  # small_whole's buffers by their place in the state, kept from save to save

    @property
    def newest_step(self) -> Optional[int]:
        """The step of the newest save, finished or in flight."""
        return self.pending.step if self.pending is not None else self.last_saved

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.every and step % self.every == 0) or step == last_step

    def maybe_save(self, state, last_step: int) -> Optional[Path]:
        """Save the run's state (llama.training.step.TrainState) when its step is due."""
        return self.save_state(state) if self.due(state.step, last_step) else None

    def save_unless_newest(self, state) -> Optional[Path]:
        """Before stopping early: save unless the newest save is of this very step."""
        return None if self.newest_step == state.step else self.save_state(state)

    def save_state(self, state) -> Path:
        return self.save(state.step, state.model, state.optimizer, state.trainer_state())

    def resume(self, path: Optional[Path], state) -> None:
        """Load `path` (None: a fresh run) into the run's state."""
        if path is None:
            return
        state.restore(load_checkpoint(path, state.model, state.optimizer))
        self.last_saved = state.step
        if self.rank == 0:
            print(f"resumed from {path} at step {state.step}", flush=True)

    def save(self, step: int, model, optimizer, trainer: dict) -> Path:
        """Write step `step`; trainer: JSON-able state of the loop (data position, args),
        taken now. Returns the directory the checkpoint has, or will have once finished."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        self.wait()
        final = self.save_dir / checkpoint_name(step)
        partial = self.save_dir / f".{final.name}.partial"
        trainer = dict(trainer, base=self.base) if self.base is not None else dict(trainer)
        pending = _Pending(step, partial, final, trainer, model.args)
        error = None
        if self.rank == 0:
            try:
                shutil.rmtree(partial, ignore_errors=True)
                partial.mkdir(parents=True)
            except OSError as err:
                error = err
        self._agree(pending, error)  # a barrier too: the directory exists before any rank writes into it
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": trained_only(model, model_state), "optim": optim_state}
        state = self.small_whole(state)  # collectives: every rank of a tensor's mesh, in the same order
        # This rank's own part first; the ranks agree on it before the write's collectives,
        # which would wait for a rank that failed here until they time out.
        try:
            torch.save({"torch": torch.get_rng_state()}, partial / f"rng_rank{self.rank}.pt")
            if self.async_save:
                state = self.stager.stage(state)  # into the buffers of the last save
        except Exception as err:  # noqa: BLE001 - agreed on below, raised on every rank
            error = err
        self._agree(pending, error)
        if self.async_save:
            response = dcp.async_save(
                state, checkpoint_id=str(partial), process_group=self._writer_group, async_stager=_AlreadyStaged()
            )
            pending.upload = getattr(response, "upload_completion", response)  # a Future either way
            self.pending = pending
            fault_injection("save", step, self.rank)  # while the background write may run
        else:
            try:
                dcp.save(state, checkpoint_id=str(partial))
            except Exception as err:  # noqa: BLE001
                error = err
            fault_injection("save", step, self.rank)
            self._finish(pending, error)
        return final

    def small_whole(self, state):
        """`state` with each sharded tensor of under WHOLE_BELOW bytes replaced by its whole,
        replicated, so that it is stored once, as one chunk, instead of one chunk per shard
        (see WHOLE_BELOW). The wholes are copied into buffers kept from save to save, so an
        async save's stager copies them into its same host buffers each time too."""
        from torch.distributed.tensor import DTensor, Replicate

        def whole(value, where: tuple):
            if isinstance(value, dict):
                return {k: whole(v, (*where, k)) for k, v in value.items()}
            if isinstance(value, list):
                return [whole(v, (*where, i)) for i, v in enumerate(value)]
            if (not isinstance(value, DTensor) or value.numel() * value.element_size() >= WHOLE_BELOW
                    or all(p.is_replicate() for p in value.placements)):
                return value
            full = value.full_tensor()  # an all-gather over the tensor's mesh
            buffer = self._whole.get(where)
            if buffer is None or buffer.shape != full.shape or buffer.dtype != full.dtype:
                buffer = self._whole[where] = torch.empty_like(full)
            buffer.copy_(full)
            mesh = value.device_mesh
            return DTensor.from_local(buffer, mesh, [Replicate()] * mesh.ndim, run_check=False)

        # FSDP over tp (_StridedShard, Shard) gathers in two steps, which DTensor warns of once
        # per mesh as slow and as reducing in another order: neither matters for a few small
        # gathers, which reduce nothing
        redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
        level = redistribute_log.level
        redistribute_log.setLevel(logging.ERROR)
        try:
            return whole(state, ())
        finally:
            redistribute_log.setLevel(level)

    def wait(self) -> None:
        """Let the save in flight finish and become visible; CheckpointError on every rank
        if it failed on any."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            error = None
            try:
                pending.upload.result()
            except Exception as err:  # noqa: BLE001 - agreed on in _finish
                error = err
            self._finish(pending, error)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self.stager is not None:
                self.stager.close()  # its host buffers go
                self.stager = None
            self._whole.clear()
            if self._deleting is not None:
                self._deleting.join()

    def _agree(self, pending: _Pending, error: Optional[BaseException]) -> None:
        """Return when every rank's part of this save succeeded; else, on every rank, remove
        the partial directory (rank 0) and raise one CheckpointError naming the lowest
        failing rank and its error."""
        world = dist.get_world_size()
        failed, lowest = max_over_ranks([error is not None, world - self.rank if error is not None else 0])
        if not failed:
            return
        first = world - int(lowest)
        what = broadcast_from(first, None if error is None else f"{type(error).__name__}: {error}")
        if self.rank == 0:
            shutil.rmtree(pending.partial, ignore_errors=True)
        before = "none" if self.last_saved is None else str(self.save_dir / checkpoint_name(self.last_saved))
        raise CheckpointError(
            f"the checkpoint of step {pending.step} failed on rank {first} ({what}); {pending.final} was not "
            f"written, the newest complete checkpoint is {before}. Check --save-dir {self.save_dir} "
            "(space, permissions) and --resume from it"
        ) from error

    def _finish(self, pending: _Pending, error: Optional[BaseException] = None) -> None:
        from llama.weights.format import write_model_args

        self._agree(pending, error)  # every rank's shards are on disk, or every rank raises
        if self.rank == 0:
            write_model_args(pending.model_args, pending.partial)
            trainer = dict(pending.trainer, step=pending.step, world_size=dist.get_world_size())
            tmp = pending.partial / "trainer.json.tmp"
            tmp.write_text(json.dumps(trainer, indent=1))
            os.replace(tmp, pending.partial / "trainer.json")
            os.replace(pending.partial, pending.final)  # a crash before this leaves the last one intact
            self._delete_old()
        self.last_saved = pending.step

    def _delete_old(self) -> None:
        """In the background on rank 0, outside any barrier: removing a large checkpoint
        from a slow filesystem takes minutes that no rank should wait for."""
        if self._deleting is not None:
            self._deleting.join()
        old = complete_checkpoints(self.save_dir)[: -self.keep] if self.keep > 0 else []
        if old:
            self._deleting = threading.Thread(
                target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in old], daemon=False
            )
            self._deleting.start()


def trained_only(model, model_state: dict) -> dict:
    """The model state without the frozen parameters (a LoRA run's base: it comes from the
    base checkpoint, not from the run's); all of it when everything trains."""
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    return {name: value for name, value in model_state.items() if name not in frozen}


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load model and optimizer state (resharded to this mesh) and this rank's RNG state when
    the world size is unchanged. Returns trainer.json. A LoRA run's checkpoint fills the
    adapters; the frozen base is already in the model, read from its own checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    trained = trained_only(model, model_state)
    state = {"model": trained, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    # strict only when the checkpoint is the whole model: a LoRA run's leaves the base out
    options = StateDictOptions(strict=len(trained) == len(model_state))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)
    trainer = json.loads((Path(path) / "trainer.json").read_text())
    rng = Path(path) / f"rng_rank{dist.get_rank()}.pt"
    if trainer["world_size"] == dist.get_world_size() and rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return trainer
