"""What a training run reports: metrics.jsonl, TensorBoard scalars, the log line, and
profiler traces and memory snapshots on request. Rank 0 writes the metrics."""

import json
import sys
from pathlib import Path
from typing import Optional

import torch

# the metrics.jsonl keys that are plotted as TensorBoard scalars, under these tags
TENSORBOARD_TAGS = {
    "loss": "train/loss",
    "val_loss": "val/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "speed/tokens_per_s",
    "mfu": "speed/mfu",
    "memory_gb": "memory/gb",
    "skipped_steps": "train/skipped_steps",
    # DPO (llama/training/preference.py)
    "reward_chosen": "train/reward_chosen",
    "reward_rejected": "train/reward_rejected",
    "reward_margin": "train/reward_margin",
    "reward_accuracy": "train/reward_accuracy",
    "val_reward_margin": "val/reward_margin",
    "val_reward_accuracy": "val/reward_accuracy",
}


def read_metrics(path) -> list[dict]:
    """The rows of one metrics.jsonl, in file order. A run killed while writing leaves a
    partial last line: that line is skipped with a warning. Any other line that is not a
    JSON object with a "step" is an error naming file:line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                print(f"warning: {path}:{number}: skipping the unreadable last line (a run killed mid-write?)", file=sys.stderr)
                break
            raise ValueError(f"{path}:{number}: not valid JSON ({e.msg}); only a truncated last line is skipped, "
                             "so fix or delete this line") from None
        if not isinstance(row, dict) or "step" not in row:
            raise ValueError(f'{path}:{number}: expected a JSON object with a "step", got {line[:80]!r}')
        rows.append(row)
    return rows


def drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps that the resumed run repeats."""
    path = Path(path)
    if path.is_file():
        rows = [row for row in read_metrics(path) if row["step"] <= step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(path)


class MetricsLog:
    """Appends rows to SAVE_DIR/metrics.jsonl and, with tensorboard=True, writes their
    scalars to SAVE_DIR/tensorboard. Only the rank that logs (rank 0) makes one."""

    def __init__(self, save_dir: Path, tensorboard: bool = False):
        self.path = Path(save_dir) / "metrics.jsonl"
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'") from None
            self.writer = SummaryWriter(str(Path(save_dir) / "tensorboard"))

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, tag in TENSORBOARD_TAGS.items():
                if row.get(key) is not None:
                    self.writer.add_scalar(tag, row[key], global_step=row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def log_line(record: dict) -> str:
    val = f" | val loss {record['val_loss']:.4f}" if "val_loss" in record else ""
    if "reward_accuracy" in record:  # DPO: how often the chosen reply wins, and by how much
        val += f" | reward acc {record['reward_accuracy']:.3f} margin {record['reward_margin']:.3f}"
    if "val_reward_accuracy" in record:
        val += f" | val reward acc {record['val_reward_accuracy']:.3f}"
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    skipped = f" | {record['skipped_steps']} skipped" if record.get("skipped_steps") else ""
    return (
        f"step {record['step']:5d} | loss {record['loss']:.4f}{val} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f}"
        f" | {record['tokens_per_s']:.0f} tok/s ({record['tokens_per_s_per_device']:.0f}/device)"
        f" | MFU {mfu} | mem {record['memory_gb']:.2f} GB{skipped}"
    )


def parse_step_range(spec: Optional[str]) -> Optional[tuple]:
    """'A:B' -> (A, B), the steps A to B inclusive."""
    if not spec:
        return None
    try:
        first, last = (int(part) for part in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile-steps {spec!r}: write FIRST:LAST, e.g. 5:7") from None
    if not 1 <= first <= last:
        raise ValueError(f"--profile-steps {spec!r}: need 1 <= FIRST <= LAST")
    return first, last


class StepProfiler:
    """A torch profiler trace of steps FIRST..LAST, one Chrome trace per rank in
    SAVE_DIR/profile/ (open in chrome://tracing or Perfetto)."""

    def __init__(self, steps: Optional[tuple], save_dir: Path, rank: int, device: torch.device):
        self.steps, self.rank, self.profiler = steps, rank, None
        self.out = Path(save_dir) / "profile" / f"trace_rank{rank}.json"
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)

    def before_step(self, step: int) -> None:
        """`step`: the number the coming step will have once done."""
        if self.steps and step == self.steps[0]:
            self.profiler = torch.profiler.profile(activities=self.activities)
            self.profiler.start()

    def after_step(self, step: int) -> Optional[Path]:
        if self.profiler is not None and step == self.steps[1]:
            self.profiler.stop()
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.profiler.export_chrome_trace(str(self.out))
            self.profiler = None
            return self.out
        return None


class MemorySnapshot:
    """CUDA allocator history from the start of training to the end of step `at_step`,
    written to SAVE_DIR/memory_snapshot_rankR.pickle (drag into pytorch.org/memory_viz)."""

    def __init__(self, enabled: bool, save_dir: Path, rank: int, device: torch.device, at_step: int):
        self.on = enabled and device.type == "cuda"
        self.at_step = at_step
        self.out = Path(save_dir) / f"memory_snapshot_rank{rank}.pickle"
        if enabled and not self.on and rank == 0:
            print("--memory-snapshot records the CUDA allocator; on CPU it writes nothing", file=sys.stderr, flush=True)
        if self.on:
            torch.cuda.memory._record_memory_history(max_entries=200_000)

    def after_step(self, step: int) -> Optional[Path]:
        if self.on and step == self.at_step:
            torch.cuda.memory._dump_snapshot(str(self.out))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.on = False
            return self.out
        return None
