"""Train Llama 3 with tensor parallelism inside a node and FSDP2 across nodes.

    torchrun --nproc_per_node 4 train.py                      # debug model, 2x2 mesh, CPU demo
    torchrun --nnodes N --nproc_per_node 8 train.py --checkpoint CONVERTED --data DIR \\
        --tokenizer tokenizer.model --tp 8 --seq-len 8192 --micro-batch 1 --steps 1000

With no arguments it trains the `debug` preset from random weights on Python's own
standard-library sources with a byte tokenizer: nothing to download. Every log step
prints one line and appends one JSON object to SAVE_DIR/metrics.jsonl. Checkpoints
are torch.distributed.checkpoint directories, written atomically, and resume on any
mesh (`--resume`)."""

import argparse
import datetime
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from llama.training.build import (
    build_trainee, choose_default_tp, make_mesh, prepare_device, read_model_and_tokenizer)
from llama.training.checkpoint import (
    CheckpointError, Checkpointer, base_record, checkpoint_name, decide_resume, fault_injection)
from llama.training.evaluation import Validation
from llama.training.flags import build_parser, parse_args
from llama.training.inputs import batch_layout, build_data
from llama.training.metrics import MemorySnapshot, StepProfiler, parse_step_range
from llama.training.optim import build_optimizer, lr_at, set_lr
from llama.training.preemption import PREEMPTED_EXIT_CODE, StopRequests, parse_signals, parse_time_limit
from llama.training.reference import build_objective, plan_reference
from llama.training.run_config import write_config
from llama.training.step import NONFINITE_EXIT_CODE, SkippedSteps, TrainState, train_step
from llama.training.step_log import StepLog, run_banner
from parallel.control import control_group
from parallel.mesh import dp_size, exit_without_teardown, init_distributed


def train(opts, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """The run; returns the process's exit code: 0 when done, PREEMPTED_EXIT_CODE when
    stopped by a signal or the time limit, NONFINITE_EXIT_CODE after --max-skips."""
    mesh = make_mesh(opts)
    opts.tp = mesh["tp"].size()  # resolved, for SAVE_DIR/config.toml
    rank, save_dir = dist.get_rank(), Path(opts.save_dir)
    control_group()  # every rank, before the first message on it
    stop = StopRequests(parse_signals(opts.save_on_signal), parse_time_limit(opts.time_limit))
    device = prepare_device(opts, mesh)
    profile = StepProfiler(parse_step_range(opts.profile_steps), save_dir, rank, device)
    base = base_record(opts)  # a LoRA run's frozen base, which its checkpoints leave out
    resume_from = decide_resume(save_dir, opts.resume, base)
    args, tokenizer = read_model_and_tokenizer(opts)
    global_batch = batch_layout(opts, args, dp_size(mesh))
    data = build_data(opts, tokenizer, mesh, global_batch, args.vocab_size)
    # DPO: the reference's log-probabilities stored, or computed now by a model of their own
    reference = plan_reference(opts, args, mesh, data, save_dir, device, resumed=resume_from is not None)
    # resuming: the checkpoint's weights replace whatever is there, so none are drawn or read
    # (but a LoRA run's base, which its checkpoints do not hold)
    trainee = build_trainee(opts.checkpoint or args, mesh, opts, init=resume_from is None)
    optimizer = build_optimizer(trainee.model, opts, device)
    state = TrainState(trainee.model, optimizer, data.loader, SkippedSteps(device), vars(opts))
    checkpoints = Checkpointer(save_dir, opts.keep, async_save=opts.async_checkpoint, every=opts.save_every, base=base)
    checkpoints.resume(resume_from, state)
    trainee.objective = build_objective(opts, trainee, data, mesh, reference)  # DPO: the pass by the policy's start
    last_step = opts.steps if opts.stop_after is None else min(opts.steps, state.step + opts.stop_after)
    log = StepLog(opts, args, mesh, device, global_batch, last_step, resumed_at=None if resume_from is None else state.step)
    if rank == 0 and parser is not None:
        write_config(opts, parser, save_dir / "config.toml")
    log.print(run_banner(opts, args, mesh, global_batch, data.loader.dataset.num_samples, data.summary))
    validation = Validation(trainee, data.validation, device, mesh, opts.eval_every, last_step)
    memory_snapshot = MemorySnapshot(opts.memory_snapshot, save_dir, rank, device, at_step=min(state.step + 3, last_step))
    if validation and resume_from is None:  # the starting point of the validation curve
        log.validation(state.step, validation.run())

    exit_code, stop_reason = 0, None
    stop.start_clock()  # step times count from here,
    log.start_clock()  # and tokens/s
    while state.step < last_step:
        profile.before_step(state.step + 1)
        lr = set_lr(optimizer, lr_at(state.step, opts))
        poison = fault_injection("nan", state.step + 1, rank)
        loss_share, grad_norm, skipped = train_step(trainee, optimizer, data.loader, device, opts.clip, poison=poison)
        step = state.advance(skipped)
        fault_injection("step", step, rank)
        profile.after_step(step)
        memory_snapshot.after_step(step)
        with log.paused():  # tokens/s counts training alone
            val = validation.maybe_run(step)
        waits_anyway = log.due(step) or checkpoints.due(step, last_step)  # the steps that read the device
        if waits_anyway and state.skipped.in_a_row() >= opts.max_skips:
            exit_code = NONFINITE_EXIT_CODE
            break
        log.step(step, lr, loss_share, grad_norm, val, data.loader.sample, state.skipped)
        with log.paused(), stop.saving():
            checkpoints.maybe_save(state, last_step)
        stop_reason = stop.agreed(step, waits_anyway) if step < last_step else None
        if stop_reason is not None:
            checkpoints.save_unless_newest(state)
            exit_code = PREEMPTED_EXIT_CODE
            break
    checkpoints.close()  # the save in flight, if any, becomes visible
    log.close(*exit_message(exit_code, state.step, opts, checkpoints, stop.received or stop_reason))
    return exit_code


def exit_message(exit_code: int, step: int, opts, checkpoints: Checkpointer, stopped_by: Optional[str]) -> tuple:
    """(the run's last line or None, its stream)."""
    if exit_code == PREEMPTED_EXIT_CODE:
        return (f"preempted at step {step}: checkpoint saved to {checkpoints.save_dir / checkpoint_name(step)} "
                f"(stopped by {stopped_by}); continue with --resume"), sys.stdout
    if exit_code == NONFINITE_EXIT_CODE:
        newest = ("no checkpoint" if checkpoints.last_saved is None
                  else f"the newest checkpoint, step {checkpoints.last_saved},")
        return (f"stopped at step {step}: {opts.max_skips} consecutive steps had a non-finite loss or grad norm and "
                f"were skipped; {newest} is intact. Lower --lr, or check the data"), sys.stderr
    return None, sys.stdout


def main(argv=None) -> int:
    opts = parse_args(argv, __doc__)
    tp_reason = choose_default_tp(opts)
    init_distributed(timeout=datetime.timedelta(minutes=opts.comm_timeout))
    try:
        if tp_reason and dist.get_rank() == 0:
            print(tp_reason, flush=True)
        return train(opts, build_parser(__doc__))
    except (ValueError, CheckpointError) as err:  # found by every rank alike (bad input, a failed save): one line
        if dist.get_rank() == 0:
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_without_teardown(main())
