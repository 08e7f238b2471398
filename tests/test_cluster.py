"""train.py as a good citizen of a shared cluster: preemption by signal and by time limit,
checkpoint decisions made once, async checkpoints, non-finite steps, config files and
observability. The end-to-end tests run real torchrun jobs and compare weights."""

import datetime
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llama.training.metrics import drop_metrics_after, read_metrics
from llama.training.preemption import PREEMPTED_EXIT_CODE, StopRequests, parse_signals, parse_time_limit
from parallel.spawn import run_on_ranks
from tests.test_train import (  # noqa: F401
    ROOT, RUN, check, converted, data, final_weights, metrics, shared_run, torchrun, torchrun_job)

from llama.training import flags
from llama.training.step import NONFINITE_EXIT_CODE, Trainee, train_step

NONFINITE = NONFINITE_EXIT_CODE


def launch(*args, nproc=4, env=None) -> subprocess.Popen:
    """torchrun in the background, in its own process group like a scheduler's job step."""
    cmd, full_env = torchrun_job(*args, nproc=nproc, env=env)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=ROOT)


def wait_for_step(save_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.communicate()[1][-3000:]}"
        path = save_dir / "metrics.jsonl"
        if path.is_file() and any(row.get("step", 0) >= step and "loss" in row for row in read_metrics(path)):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


# ---------------------------------------------------------------- preemption


def test_sigterm_to_torchrun_saves_then_resume_matches_the_uninterrupted_run(converted, data, tmp_path):
    # 2 ranks: the agent forwards the signal to each worker, and they agree on one step to stop at
    common = ["--checkpoint", converted, "--data", data, "--steps", 24, "--save-every", 0, *RUN]
    check(torchrun(*common, "--save-dir", tmp_path / "whole", nproc=2))

    job = launch(*common, "--save-dir", tmp_path / "split", nproc=2)
    wait_for_step(tmp_path / "split", 3, job)
    job.send_signal(signal.SIGTERM)  # to the torchrun agent, which forwards it to every worker
    out, err = job.communicate(timeout=120)
    assert "preempted at step" in out, err[-3000:]
    stopped_at = int(out.split("preempted at step ")[1].split(":")[0])
    assert 3 <= stopped_at < 24
    assert f"checkpoint saved to {tmp_path / 'split' / f'step_{stopped_at:08d}'}" in out
    assert sorted(p.name for p in (tmp_path / "split").glob("step_*")) == [f"step_{stopped_at:08d}"]

    check(torchrun(*common, "--save-dir", tmp_path / "split", "--resume", nproc=2))
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "split"))
    losses = {r["step"]: r["loss"] for r in metrics(tmp_path / "whole")}
    assert [r["loss"] for r in metrics(tmp_path / "split")] == [losses[r["step"]] for r in metrics(tmp_path / "split")]


def test_a_signal_during_a_save_lets_the_save_finish_and_then_stops(converted, data, tmp_path):
    common = ["--checkpoint", converted, "--data", data, "--steps", 12, "--save-every", 4, *RUN]
    # rank 1 gets SIGUSR1 between writing its shards of step 4 and the rename
    result = torchrun(*common, "--save-dir", tmp_path, nproc=2, env={"LLAMA_TP_FAULT": "save:4:1:SIGUSR1"})
    assert result.returncode != 0
    assert f"preempted at step 4: checkpoint saved to {tmp_path / 'step_00000004'}" in result.stdout
    assert "(stopped by a signal)" in result.stdout  # rank 1 got it, rank 0 learns of it
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in result.stderr  # torchrun's report of the workers' exit
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000004"]
    assert (tmp_path / "step_00000004" / "trainer.json").is_file()
    assert not list(tmp_path.glob(".step_*.partial"))


def test_time_limit_stops_with_a_checkpoint_before_the_budget_runs_out(converted, data, tmp_path):
    # 2000 steps take minutes; a 15-second budget leaves room for start-up and some steps
    # (tens of ms each), then stops while the last step and its save still fit
    common = ["--checkpoint", converted, "--data", data, "--steps", 2000, "--save-every", 0, *RUN]
    result = torchrun(*common, "--save-dir", tmp_path, "--time-limit", "0:00:15", nproc=2)
    assert "preempted at step " in result.stdout, result.stderr[-3000:]
    stopped_at = int(result.stdout.split("preempted at step ")[1].split(":")[0])
    assert 3 <= stopped_at < 2000, result.stdout[-3000:]  # steps ran before the budget ended
    assert f"preempted at step {stopped_at}: checkpoint saved to {tmp_path / f'step_{stopped_at:08d}'}" in result.stdout
    assert "(stopped by the --time-limit)" in result.stdout
    assert f"exitcode  : {PREEMPTED_EXIT_CODE}" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [f"step_{stopped_at:08d}"]  # the last step's
    assert [r["step"] for r in metrics(tmp_path) if "loss" in r] == list(range(1, stopped_at + 1))


def test_stop_requests_leave_room_for_the_longest_step_and_save():
    stop = StopRequests(time_limit_s=100.0, safety=2.0)
    stop.start -= 60  # 40 s left
    stop.observe(step_seconds=5.0, save_seconds=10.0)
    assert not stop.out_of_time()  # needs 2 x 15 = 30 s
    stop.observe(save_seconds=16.0)
    assert stop.out_of_time()  # needs 2 x 21 = 42 s
    assert not StopRequests().out_of_time()


def _agreement_cadence(signal_after: int) -> dict:
    """60 simulated steps on 2 gloo ranks with train.py's calls: a log every 25 steps,
    steps of 0.5 s on rank 0 and 0.25 s on rank 1 (the agreed longest, 0.5 s, sets N on
    both: 10 s / 0.5 s = 20 steps). Counts the all-reduces on the control group. Rank 1
    signals itself SIGUSR1 after step `signal_after` (0: never)."""
    import torch.distributed as dist

    from parallel.control import control_group

    control_group()
    all_reduces, real = [], dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: (all_reduces.append(1), real(*args, **kwargs))[1]
    stop = StopRequests([signal.SIGUSR1], signal_delay_s=10.0)
    agreed_at, stopped = [], None
    for step in range(1, 61):
        stop.observe(step_seconds=0.5 if dist.get_rank() == 0 else 0.25)
        if step == signal_after and dist.get_rank() == 1:
            os.kill(os.getpid(), signal.SIGUSR1)
        before = stop.agreements
        reason = stop.agreed(step, waits_anyway=step % 25 == 0)
        if stop.agreements > before:
            agreed_at.append(step)
        if reason is not None:
            stopped = (step, reason)
            break
    dist.all_reduce = real
    return {"agreed_at": agreed_at, "all_reduces": len(all_reduces), "every": stop.steps_between_agreements(),
            "stopped": stopped}


def test_ranks_agree_on_stopping_only_on_log_steps_and_every_n_steps():
    """Not every step: the first boundary, then every N = 20 steps counted from the last
    agreement, and the log steps (25, 50) in between; one all-reduce each, on every rank
    alike although their step times differ."""
    for result in run_on_ranks(_agreement_cadence, 2, 0, timeout=120, pg_timeout=20):
        assert result["agreed_at"] == [1, 21, 25, 45, 50]
        assert result["all_reduces"] == 5 and result["every"] == 20 and result["stopped"] is None


def test_a_signal_is_honoured_within_n_steps_on_every_rank():
    """SIGUSR1 on rank 1 after step 27: the next agreement, step 45 (the one after 25, a
    log step, plus 20), stops both ranks, at most N steps after the signal."""
    for result in run_on_ranks(_agreement_cadence, 2, 27, timeout=120, pg_timeout=20):
        assert result["stopped"] == (45, "a signal")
        assert result["stopped"][0] - 27 <= result["every"]


def test_the_time_limit_looks_as_far_ahead_as_the_next_agreement():
    """N is bounded by the margin: 1 s steps and 4 s saves keep 2 x 5 = 10 s in hand, so
    the ranks agree at least every 10 steps, and an agreement stops the job once the time
    left no longer covers the margin plus those 10 steps."""
    stop = StopRequests(time_limit_s=100.0, safety=2.0, signal_delay_s=60.0)
    stop.observe(step_seconds=1.0, save_seconds=4.0)
    assert stop.steps_between_agreements() == 10
    assert StopRequests(signal_delay_s=60.0).steps_between_agreements() == 1  # no step seen yet
    stop.start -= 75  # 25 s left: margin 10 s + 10 steps of 1 s fit
    assert not stop.out_of_time(steps_ahead=10)
    stop.start -= 10  # 15 s left: the margin alone would fit, the steps to the next agreement not
    assert stop.out_of_time(steps_ahead=10) and not stop.out_of_time()


def test_save_on_signal_none_installs_no_handler():
    watched = (signal.SIGTERM, signal.SIGUSR1)
    before = {sig: signal.getsignal(sig) for sig in watched}
    try:
        StopRequests(parse_signals(flags.parse_args(["--save-on-signal", "none"]).save_on_signal))
        assert {sig: signal.getsignal(sig) for sig in watched} == before
        stop = StopRequests(parse_signals(flags.parse_args([]).save_on_signal))  # the default: both handled
        assert all(signal.getsignal(sig) == stop._on_signal for sig in watched)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_save_on_signal_none_leaves_train_py_to_the_signals_default_action(converted, data, tmp_path):
    """SIGUSR1 after step 2, which --save-on-signal's default would turn into a save and exit
    code 3: with 'none' the worker dies of it (SIGUSR1's default action), saving nothing."""
    result = torchrun("--checkpoint", converted, "--data", data, "--steps", 4, "--save-every", 0, *RUN,
                      "--save-dir", tmp_path, "--save-on-signal", "none", nproc=1, env={"LLAMA_TP_FAULT": "step:2:0:SIGUSR1"})
    assert result.returncode != 0
    assert f"exitcode  : -{int(signal.SIGUSR1)}" in result.stderr, result.stderr[-3000:]
    assert "received SIGUSR1" not in result.stderr and "preempted" not in result.stdout
    assert not list(tmp_path.glob("step_*"))


def test_time_limits_and_signal_names_parse_or_fail_naming_the_flag():
    assert parse_time_limit("02:30") == 9000
    assert parse_time_limit("0:00:45") == 45
    assert parse_time_limit("1-00:00:00") == 86400
    assert parse_time_limit(None) is None
    with pytest.raises(ValueError, match="--time-limit '90m'"):
        parse_time_limit("90m")
    assert parse_signals("SIGTERM,usr1") == [signal.SIGTERM, signal.SIGUSR1]
    assert parse_signals("none") == []
    with pytest.raises(ValueError, match="--save-on-signal: SIGKILL"):
        parse_signals("SIGKILL")


# ---------------------------------------------------------------- decisions made once


def _resume_decisions(base: str) -> list:
    import torch.distributed as dist

    from llama.training.checkpoint import decide_resume

    def decide(case: str, rank0_has_checkpoints: bool, resume: bool):
        # each rank looks at its own directory, as if a shared filesystem looked different to it
        save_dir = Path(base) / case / f"rank{dist.get_rank()}"
        if dist.get_rank() == 0 and rank0_has_checkpoints:
            for step in (3, 6):
                (save_dir / f"step_{step:08d}").mkdir(parents=True)
                (save_dir / f"step_{step:08d}" / "trainer.json").write_text("{}")
        (save_dir / "step_00000009").mkdir(parents=True, exist_ok=True)  # unfinished: no trainer.json
        try:
            found = decide_resume(save_dir, resume)
            return None if found is None else found.name
        except ValueError as err:
            return f"error: {err}"

    return [decide("resume", True, True), decide("fresh", False, True), decide("refused", True, False)]


def test_rank0_decides_on_resuming_and_every_rank_gets_its_answer(tmp_path):
    rank0, rank1 = run_on_ranks(_resume_decisions, 2, str(tmp_path))
    assert rank0 == rank1
    resumed, fresh, refused = rank0
    assert resumed == "step_00000006"  # rank 1 sees no checkpoint but resumes rank 0's newest
    assert fresh is None  # rank 0 sees none, so no rank resumes
    # checkpoints without --resume: refused on every rank at start-up
    assert refused.startswith("error: ") and "pass --resume" in refused and "step_00000006" in refused


def test_a_fresh_run_into_a_used_save_dir_is_one_error_before_any_work(data, tmp_path):
    (tmp_path / "step_00000005").mkdir()
    (tmp_path / "step_00000005" / "trainer.json").write_text("{}")
    result = torchrun("--data", data, "--save-dir", tmp_path, "--steps", 2, *RUN, nproc=2, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "pass --resume" in errors[0], result.stderr[-2000:]


def _rank0_fails() -> str:
    from parallel.control import rank0_first

    def fail():
        raise ValueError("corpus.jsonl:3: not JSON")

    try:
        rank0_first(fail, timeout=datetime.timedelta(seconds=60))
    except ValueError as err:
        return str(err)
    return "no error"


def _rank0_takes(seconds: float) -> float:
    import torch.distributed as dist

    from parallel.control import rank0_first

    rank0_first(lambda: time.sleep(seconds), timeout=datetime.timedelta(seconds=60))
    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def test_ranks_wait_for_rank0_to_tokenize_beyond_the_collective_timeout():
    # rank 1 waits 6 s for rank 0 although a collective may wait only 2 s
    assert run_on_ranks(_rank0_takes, 2, 6.0, pg_timeout=2) == [2.0, 2.0]


def test_an_error_while_rank0_tokenizes_is_raised_on_every_rank():
    assert run_on_ranks(_rank0_fails, 2) == ["corpus.jsonl:3: not JSON"] * 2


def test_other_ranks_open_rank0s_cache_without_reading_the_corpus_again(tmp_path, monkeypatch):
    from llama.data import token_cache
    from llama.data.chat_cache import load_conversation_cache, open_conversation_cache
    from llama.data.errors import DataError
    from llama.data.token_cache import load_token_cache, open_token_cache
    from llama.tokenizer import load_tokenizer

    (tmp_path / "a.txt").write_text("first document\n\nsecond one")
    (tmp_path / "c.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    tokenizer = load_tokenizer("bytes")
    built = load_token_cache([tmp_path / "a.txt"], tokenizer, tmp_path / "cache", quiet=True)
    chat = load_conversation_cache([tmp_path / "c.jsonl"], tokenizer, tmp_path / "cache", quiet=True)

    def no_hashing(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(token_cache, "file_sha256", no_hashing)
    opened = open_token_cache(built.path, [tmp_path / "a.txt"])
    assert np.array_equal(opened.tokens, built.tokens) and opened.max_token_id == built.max_token_id
    assert np.array_equal(open_conversation_cache(chat.path, [tmp_path / "c.jsonl"]).tokens, chat.tokens)
    with pytest.raises(DataError, match="token cache unreadable on this node .* --cache-dir on a filesystem every node sees"):
        open_token_cache(tmp_path / "elsewhere" / "x.json", [tmp_path / "a.txt"])


def test_a_cut_off_last_metrics_line_does_not_stop_a_resume(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.0}\n{"step": 3, "lo')
    drop_metrics_after(path, 1)
    assert "metrics.jsonl:3: skipping the unreadable last line" in capsys.readouterr().err
    assert read_metrics(path) == [{"step": 1, "loss": 5.0}]


# ---------------------------------------------------------------- async checkpoints


def test_async_checkpoints_resume_to_the_weights_of_sync_ones(converted, data, shared_run, tmp_path):
    common = ["--checkpoint", converted, "--data", data, "--steps", 8, "--save-every", 3, "--keep", 2, *RUN]
    sync = shared_run(*common, nproc=2)  # the next test's uninterrupted run too
    check(torchrun(*common, "--save-dir", tmp_path / "async", "--async-checkpoint", "--stop-after", 5, nproc=2))
    # steps 3 and 5 (the job's last) are visible: the end of a job waits for its save
    assert sorted(p.name for p in (tmp_path / "async").glob("step_*")) == ["step_00000003", "step_00000005"]
    check(torchrun(*common, "--save-dir", tmp_path / "async", "--async-checkpoint", "--resume", nproc=2))
    assert sorted(p.name for p in (tmp_path / "async").glob("step_*")) == ["step_00000006", "step_00000008"]
    assert_same_weights(final_weights(sync), final_weights(tmp_path / "async"))


def test_a_kill_during_a_background_write_leaves_the_previous_checkpoint(converted, data, shared_run, tmp_path):
    # the previous test's flags, so that its sync run is the uninterrupted run here too
    common = ["--checkpoint", converted, "--data", data, "--steps", 8, "--save-every", 3, "--keep", 2, *RUN]
    whole = shared_run(*common, nproc=2)
    # rank 1 dies right after handing step 6 to the background writer; torchrun restarts
    # the job, which finds step 3 as the newest complete checkpoint
    killed = torchrun(*common, "--save-dir", tmp_path / "killed", "--async-checkpoint", "--resume", nproc=2,
                      max_restarts=1, env={"LLAMA_TP_FAULT": "save:6:1"})
    check(killed)
    assert "resumed from" in killed.stdout and "step_00000003 at step 3" in killed.stdout
    assert_same_weights(final_weights(whole), final_weights(tmp_path / "killed"))


def test_resuming_does_not_read_the_base_checkpoint_weights(converted, data, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(converted, base)
    common = ["--checkpoint", base, "--data", data, "--steps", 4, "--save-every", 2, *RUN]
    check(torchrun(*common, "--save-dir", tmp_path / "run", "--stop-after", 2, nproc=2))
    for f in base.iterdir():  # only model_args.json stays: the weights are gone
        if f.name != "model_args.json":
            f.unlink()
    check(torchrun(*common, "--save-dir", tmp_path / "run", "--resume", nproc=2))


# ---------------------------------------------------------------- non-finite steps


def test_a_nan_step_is_skipped_logged_and_leaves_the_weights_unchanged(converted, data, tmp_path):
    common = ["--checkpoint", converted, "--data", data, "--steps", 5, "--save-every", 1, "--keep", 10, *RUN]
    check(torchrun(*common, "--save-dir", tmp_path, nproc=2, env={"LLAMA_TP_FAULT": "nan:3:1"}))
    weights = {}
    for step in (2, 3, 4):
        weights[step] = final_weights_at(tmp_path, step)
    assert_same_weights(weights[2], weights[3])  # the update of step 3 was skipped
    assert any((weights[4][n] != weights[3][n]).any() for n in weights[4])  # step 4 trained again
    rows = {r["step"]: r for r in metrics(tmp_path) if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in (2, 3, 4, 5)] == [0, 1, 1, 1]
    assert rows[3]["grad_norm"] != rows[3]["grad_norm"]  # NaN, logged as such


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "foreach"])
def test_train_step_skips_the_update_of_a_nan_step_with_either_adamw(fused):
    import numpy as np

    from llama import ModelArgs, Transformer
    from llama.data.loader import DistributedDataLoader
    from llama.data.packed import PackedDataset

    args = ModelArgs(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=64, multiple_of=16, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(args).init_weights(seed=0)
    tokens = np.random.default_rng(0).integers(0, args.vocab_size, 400, dtype=np.uint32)
    loader = DistributedDataLoader(PackedDataset(tokens, 16, seed=0), global_batch=2, dp_rank=0, dp_size=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused, foreach=not fused)
    train_step(Trainee(model), optimizer, loader, torch.device("cpu"), clip=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    _, norm, skipped = train_step(Trainee(model), optimizer, loader, torch.device("cpu"), clip=1.0, poison=True)
    assert skipped.item() == 1.0 and not torch.isfinite(norm)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name
        assert torch.equal(optimizer.state[param]["exp_avg"], state[name]), name
    _, _, skipped = train_step(Trainee(model), optimizer, loader, torch.device("cpu"), clip=1.0)
    assert skipped.item() == 0.0 and not torch.equal(model.output.weight, before["output.weight"])


def test_max_skips_consecutive_nan_steps_stop_the_run_with_the_last_checkpoint_intact(converted, data, tmp_path):
    common = ["--checkpoint", converted, "--data", data, "--steps", 6, "--save-every", 2, "--max-skips", 1, *RUN]
    result = torchrun(*common, "--save-dir", tmp_path, nproc=2, env={"LLAMA_TP_FAULT": "nan:3:0"})
    assert f"exitcode  : {NONFINITE}" in result.stderr
    assert "stopped at step 3: 1 consecutive steps had a non-finite loss" in result.stderr
    assert "the newest checkpoint, step 2, is intact" in result.stderr
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000002"]


def test_max_skips_counts_steps_in_a_row_not_in_all(converted, data, tmp_path):
    """--max-skips 2: two NaN steps apart (2 and 4) are skipped and the run ends; two in a
    row (2 and 3) stop it. One process is enough: the count does not depend on the mesh."""
    common = ["--checkpoint", converted, "--data", data, "--steps", 5, "--save-every", 0, "--max-skips", 2, *RUN]
    apart = torchrun(*common, "--save-dir", tmp_path / "apart", nproc=1, env={"LLAMA_TP_FAULT": "nan:2:0,nan:4:0"})
    check(apart)
    rows = {r["step"]: r for r in metrics(tmp_path / "apart") if "loss" in r}
    assert [rows[s]["skipped_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 2]
    assert sorted(p.name for p in (tmp_path / "apart").glob("step_*")) == ["step_00000005"]

    in_a_row = torchrun(*common, "--save-dir", tmp_path / "in_a_row", nproc=1, env={"LLAMA_TP_FAULT": "nan:2:0,nan:3:0"})
    assert f"exitcode  : {NONFINITE}" in in_a_row.stderr, in_a_row.stderr[-3000:]
    assert "stopped at step 3: 2 consecutive steps had a non-finite loss" in in_a_row.stderr
    assert "no checkpoint is intact" in in_a_row.stderr


def final_weights_at(save_dir: Path, step: int) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = save_dir / f"weights_{step}.pt"
    dcp_to_torch_save(str(save_dir / f"step_{step:08d}"), str(out))
    return torch.load(out, weights_only=False)["model"]


# ---------------------------------------------------------------- config files


def test_a_config_file_gives_flags_and_the_command_line_overrides_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('seq-len = 512\nlr = 1e-4\n[data]\ndata = ["a.txt", "b.txt"]\ndocument_masking = false\n')
    opts = flags.parse_args(["--config", str(config), "--lr", "2e-4"])
    assert (opts.seq_len, opts.lr, opts.data, opts.document_masking) == (512, 2e-4, ["a.txt", "b.txt"], False)
    assert opts.micro_batch == 4  # untouched flags keep their defaults


@pytest.mark.parametrize(
    "text, message",
    [
        ("seq-lenn = 512\n", "unknown key 'seq-lenn'; did you mean seq-len?"),
        ("seq-len = 'long'\n", "seq-len = 'long': expected a int"),
        ("seq-len = 2.5\n", "seq-len = 2.5: expected a whole number"),
        ("dtype = 'fp16'\n", "dtype = 'fp16': choose one of fp32, bf16"),
        ("resume = 1\n", "resume = 1: write true or false"),
    ],
)
def test_a_bad_config_key_or_value_is_an_error_naming_it(tmp_path, capsys, text, message):
    config = tmp_path / "run.toml"
    config.write_text(text)
    with pytest.raises(SystemExit):
        flags.parse_args(["--config", str(config)])
    assert message in capsys.readouterr().err


def test_the_written_config_repeats_the_run_exactly(tmp_path):
    from llama.training.run_config import write_config

    parser = flags.build_parser()
    opts = flags.parse_args(["--data", "x.txt", "y.txt", "--seq-len", "96", "--no-document-masking", "--lr", "1e-3",
                             "--tp", "2", "--dtype", "fp32", "--time-limit", "01:00"])
    write_config(opts, parser, tmp_path / "config.toml")
    again = flags.parse_args(["--config", str(tmp_path / "config.toml")])
    assert vars(again) == {**vars(opts), "config": str(tmp_path / "config.toml")}


# ---------------------------------------------------------------- observability


def test_tensorboard_scalars_and_profiler_trace_are_written(converted, data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = torchrun("--checkpoint", converted, "--data", data, "--steps", 4, "--save-dir", tmp_path, *RUN,
                   "--val-data", data, "--eval-every", 2, "--eval-batches", 3, "--tensorboard", "--profile-steps", "2:3",
                   nproc=2)
    check(run)
    # --eval-batches 3: the fixed validation set is 3 global batches of 8 windows
    assert "validation: a fixed set of 24 windows of" in run.stdout, run.stdout[-3000:]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    rows = metrics(tmp_path)
    logged = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert {e.step: e.value for e in events.Scalars("train/loss")} == pytest.approx(logged, rel=1e-6)
    assert len(events.Scalars("val/loss")) == len([r for r in rows if "val_loss" in r])
    for tag in ("train/lr", "train/grad_norm", "speed/tokens_per_s", "memory/gb", "train/skipped_steps"):
        assert [e.step for e in events.Scalars(tag)] == sorted(logged), tag
    for rank in (0, 1):
        trace = (tmp_path / "profile" / f"trace_rank{rank}.json").read_text()
        assert "aten::mm" in trace
