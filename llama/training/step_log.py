"""The run's log: when a step logs, what it prints and writes to metrics.jsonl, and what
tokens/s counts (training alone: evaluation and saves run with the clock paused).

Every rank takes part (the logged loss is a sum over ranks); rank 0 prints the lines and
writes the rows."""

import contextlib
import resource
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llama.config import ModelArgs
from parallel.devices import measure_machine_peak, sum_over_ranks, table_peak
from parallel.train_utils import sum_over_batch

from .metrics import MetricsLog, drop_metrics_after, log_line
from .step import SkippedSteps

BAR_WIDTH = 100


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def progress_bar(step: int, total: int, width: int = 40) -> str:
    done = width * step // max(total, 1)
    return f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}"


def machine_peak_tflops(opts, device) -> Optional[float]:
    """The whole world's peak for MFU: --peak-tflops per device, else the GPU table's, else
    on CPU measured now on every rank (None where neither is known)."""
    peak = opts.peak_tflops
    if peak is None and device.type == "cuda":
        peak = table_peak(opts.dtype)
    if peak is None and device.type == "cpu":
        return measure_machine_peak(device)
    return None if peak is None else sum_over_ranks(peak, device)


def run_banner(opts, args: ModelArgs, mesh, global_batch: int, num_samples: int, data_summary: list) -> str:
    """The lines a run starts with: the model, the mesh, the batch and the data."""
    mesh_shape = " x ".join(f"{n} {s}" for n, s in zip(mesh.mesh_dim_names, mesh.mesh.shape))
    if getattr(opts, "objective", None) == "dpo":
        batch = f"global batch {global_batch} pairs x 2 x {opts.seq_len} tokens | {num_samples} pairs/epoch"
    else:
        batch = f"global batch {global_batch} x {opts.seq_len} tokens | {num_samples} samples/epoch"
    first = f"model {opts.checkpoint or opts.preset}: {args.num_params():,} params | mesh {mesh_shape} | {batch}"
    return "\n".join([first, *data_summary])


class StepLog:
    """Logs every --log-every steps, step 1 (the starting loss) and the last step; a
    validation loss on a step that does not log gets a line of its own. A progress bar
    on a terminal between lines."""

    def __init__(self, opts, args: ModelArgs, mesh, device, global_batch: int, last_step: int, resumed_at: Optional[int]):
        self.mesh, self.device, self.last_step, self.every = mesh, device, last_step, opts.log_every
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        rows = 2 if getattr(opts, "objective", None) == "dpo" else 1  # a DPO sample is a pair of sequences
        self.tokens_per_step = global_batch * rows * opts.seq_len
        self.flops_per_token = args.training_flops_per_token(opts.seq_len)
        self.show_bar = self.rank == 0 and sys.stdout.isatty()
        self.metrics = None
        if self.rank == 0:
            save_dir = Path(opts.save_dir)
            if resumed_at is not None:
                drop_metrics_after(save_dir / "metrics.jsonl", resumed_at)  # the steps the resumed run repeats
            save_dir.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(save_dir, tensorboard=opts.tensorboard)
        self.peak_total = machine_peak_tflops(opts, device)
        self.window_start, self.window_steps = time.perf_counter(), 0
        self.last: dict = {}

    def start_clock(self) -> None:
        """The loop starts: tokens/s counts from here."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def print(self, line: str, file=None) -> None:
        """A line from rank 0, over the progress bar if there is one."""
        if self.rank == 0:
            print(f"\r{line:<{BAR_WIDTH}}" if self.show_bar else line, file=file or sys.stdout, flush=True)

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step in (1, self.last_step)

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside does not count towards tokens/s."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.window_start += time.perf_counter() - start

    def validation(self, step: int, val: dict) -> None:
        """val: {"val_loss": ..., and the objective's val_ metrics} (evaluation.evaluate)."""
        extra = "".join(f" | {name[4:].replace('_', ' ')} {value:.4f}" for name, value in val.items() if name != "val_loss")
        self.print(f"step {step:5d} | val loss {val['val_loss']:.4f}{extra}")
        if self.metrics is not None:
            self.metrics.write({"step": step, **val})

    def step(self, step: int, lr: float, loss_share: dict, grad_norm: torch.Tensor, val: Optional[dict],
             samples_seen: int, skipped: SkippedSteps) -> None:
        """After every step: the log line and metrics row when due (the only host reads of
        the step's tensors), or the validation line; then the progress bar. loss_share:
        this rank's shares of the step's means, {"loss": ..., and the objective's metrics}
        (train_step); val: the validation's means (evaluation.evaluate) or None."""
        self.window_steps += 1
        if self.due(step):
            elapsed = time.perf_counter() - self.window_start
            tokens_per_s = self.tokens_per_step * self.window_steps / elapsed
            means = dict(zip(loss_share, sum_over_batch([float(v) for v in loss_share.values()], self.mesh)))
            self.last = {
                "step": step,
                "loss": means.pop("loss"),  # the shares add up to the step's mean
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / self.world,
                "mfu": None if self.peak_total is None else self.flops_per_token * tokens_per_s / (self.peak_total * 1e12),
                "memory_gb": memory_gb(self.device),
                "samples_seen": samples_seen,
                "skipped_steps": skipped.total(),
                **means,  # the objective's metrics (DPO's rewards)
            }
            if val is not None:
                self.last.update(val)
            self.print(log_line(self.last))
            if self.metrics is not None:
                self.metrics.write(self.last)
            self.window_start, self.window_steps = time.perf_counter(), 0
        elif val is not None:
            self.validation(step, val)
        if self.show_bar:
            print(f"\r{progress_bar(step, self.last_step):<{BAR_WIDTH}}", end="", flush=True)

    def close(self, message: Optional[str] = None, file=None) -> None:
        """The run's last line, if any, below the progress bar."""
        if self.rank == 0 and (message or self.show_bar):
            print(("\n" if self.show_bar and message else "") + (message or ""), file=file or sys.stdout, flush=True)
        if self.metrics is not None:
            self.metrics.close()
