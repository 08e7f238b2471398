"""Each component of the run decides its own cadence, so train.py's loop does not: the log
(when it writes, and that tokens/s counts training alone), validation (when it runs), the
checkpointer (when it saves, and the early-stop save only when the newest is not this
step) and the stop requests (save time is not step time). One gloo rank, a fake clock."""

import json
import types

import torch

from llama import ModelArgs
from parallel.spawn import run_on_ranks

TINY = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=16)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _log_counts_training_alone(save_dir: str) -> list:
    import llama.training.step_log as step_log
    from llama.training.step import SkippedSteps
    from parallel.mesh import build_mesh

    clock = Clock()
    step_log.time.perf_counter = clock  # the module's clock (a forked rank: nothing else sees it)
    opts = types.SimpleNamespace(log_every=2, seq_len=8, save_dir=save_dir, tensorboard=False, peak_tflops=1.0,
                                 checkpoint=None, preset="tiny")
    mesh = build_mesh(tp=1)
    log = step_log.StepLog(opts, TINY, mesh, torch.device("cpu"), global_batch=4, last_step=5, resumed_at=None)
    due = [log.due(step) for step in range(1, 6)]
    log.start_clock()
    skipped = SkippedSteps("cpu")
    for step in range(1, 6):
        clock.now += 1.0  # the step itself
        with log.paused():
            clock.now += 30.0  # validation, or a save: not training
        val = {"val_loss": 1.5} if step == 3 else None  # a validation on a step that does not log gets its own row
        log.step(step, 1e-3, {"loss": torch.tensor(2.0)}, torch.tensor(0.5), val, 4 * step, skipped)
    log.close()
    return due


def test_the_log_writes_on_step_1_every_n_steps_and_the_last_and_tokens_per_s_counts_training_alone(tmp_path):
    due = run_on_ranks(_log_counts_training_alone, 1, str(tmp_path))[0]
    assert due == [True, True, False, True, True]  # step 1, every 2nd, and the last (5)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[2] == {"step": 3, "val_loss": 1.5}
    tokens_per_step = 4 * 8
    # 1 s of training per step, 30 s paused per step; the window restarts at each log line
    assert [r["tokens_per_s"] for r in rows if "loss" in r] == [tokens_per_step * 1.0] * 4
    assert rows[0]["loss"] == 2.0 and rows[0]["mfu"] == TINY.training_flops_per_token(8) * tokens_per_step / 1e12


def test_validation_runs_every_n_steps_and_at_the_last_step_and_not_without_a_set():
    from llama.training.evaluation import Validation

    ran = []
    validation = Validation(None, ["a batch"], "cpu", None, every=3, last_step=7)
    validation.run = lambda: ran.append(len(ran)) or 0.25
    assert [validation.maybe_run(step) for step in range(1, 8)] == [None, None, 0.25, None, None, 0.25, 0.25]
    assert len(ran) == 3 and bool(validation)
    empty = Validation(None, [], "cpu", None, every=1, last_step=7)
    assert not empty and empty.maybe_run(1) is None


def test_the_checkpointer_saves_every_n_steps_and_at_the_last_and_early_only_when_the_newest_is_not_this_step():
    from llama.training.checkpoint import Checkpointer

    checkpoints = Checkpointer.__new__(Checkpointer)  # its cadence alone: no process group, no directory
    checkpoints.every, checkpoints.pending, checkpoints.last_saved = 4, None, None
    assert [step for step in range(1, 11) if checkpoints.due(step, last_step=10)] == [4, 8, 10]
    checkpoints.every = 0  # --save-every 0: the last step only
    assert [step for step in range(1, 11) if checkpoints.due(step, last_step=10)] == [10]

    saved = []
    checkpoints.save_state = lambda state: saved.append(state.step)
    state = types.SimpleNamespace(step=8)
    checkpoints.last_saved = 8
    assert checkpoints.save_unless_newest(state) is None and saved == []  # step 8 is on disk already
    state.step = 9
    checkpoints.save_unless_newest(state)
    assert saved == [9]


def test_save_time_counts_towards_the_stop_margin_as_save_time_not_step_time(monkeypatch):
    import llama.training.preemption as preemption

    clock = Clock()
    monkeypatch.setattr(preemption.time, "monotonic", clock)
    monkeypatch.setattr(preemption, "max_over_ranks", lambda values: values)  # one rank: the values are the maxima
    stop = preemption.StopRequests(time_limit_s=10_000)
    stop.start_clock()
    clock.now += 2.0  # a step
    with stop.saving():
        clock.now += 50.0  # its save
    assert stop.agreed(1) is None
    assert (stop.longest_step, stop.longest_save) == (2.0, 50.0)
    clock.now += 3.0  # the next step, no save
    stop.agreed(2)
    assert (stop.longest_step, stop.longest_save) == (3.0, 50.0)
