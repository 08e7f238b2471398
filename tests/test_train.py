"""train.py end to end under torchrun on 4 CPU processes: training, checkpoints,
resume on the same and on other meshes, faults, and start-up errors."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest
import torch

from llama import ModelArgs, Transformer, load_model
from llama.weights.format import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=264, multiple_of=32, max_seq_len=128)
RUN = ["--seq-len", "32", "--global-batch", "8", "--warmup", "2", "--log-every", "1", "--lr", "3e-3"]
NAMES = set(Transformer(TINY).state_dict())  # every weight a checkpoint of TINY must hold
# fp32 on another mesh: reductions add up in another order, ~1e-6 per step after 4 steps
RESHARD_TOL = 1e-4


def torchrun_job(*args, nproc=4, max_restarts=0, env=None) -> tuple:
    """(command, environment) of a local torchrun job running train.py with `args`: what
    torchrun() runs and test_cluster's launch() starts in the background."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--max-restarts",
        str(max_restarts), "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--monitor-interval", "0.1",
        str(ROOT / "train.py"), *map(str, args),
    ]
    return cmd, {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}


def torchrun(*args, nproc=4, max_restarts=0, env=None, timeout=300):
    cmd, full_env = torchrun_job(*args, nproc=nproc, max_restarts=max_restarts, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def metrics(save_dir: Path) -> list:
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def final_weights(save_dir: Path) -> dict:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    newest = sorted(save_dir.glob("step_*"))[-1]
    with tempfile.TemporaryDirectory() as scratch:  # not into save_dir, which may be a shared run
        out = Path(scratch) / "final.pt"
        dcp_to_torch_save(str(newest), str(out))
        return torch.load(out, weights_only=False)["model"]


def listing(save_dir: Path) -> list:
    """Every file under save_dir with its size and modification time: what a write changes."""
    return sorted((str(f.relative_to(save_dir)), f.stat().st_size, f.stat().st_mtime_ns) for f in save_dir.rglob("*"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A tiny converted checkpoint, as convert_weights.py writes it."""
    path = tmp_path_factory.mktemp("converted")
    model = Transformer(TINY).init_weights(seed=5)
    return save_checkpoint(model.state_dict(), TINY, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """About 60 KB of text: enough windows for the runs below, small to tokenize."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    files = sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py"))[:6]
    path.write_text("\n\n".join(f.read_text() for f in files)[:60_000])
    return path


def check(result):
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """The runs that several tests of a module compare with, each launched once:
    shared_run(*flags, nproc=4) is the save dir of a finished train.py run with exactly
    these flags (and its own --save-dir). Tests only read it; one that continues it
    resumes a copy (shutil.copytree). At the module's end each must be as it was written."""
    runs = {}

    def run(*flags, nproc=4) -> Path:
        key = (tuple(map(str, flags)), nproc)
        if key not in runs:
            save_dir = tmp_path_factory.mktemp("shared_run")
            check(torchrun(*flags, "--save-dir", save_dir, nproc=nproc))
            runs[key] = save_dir, listing(save_dir)
        return runs[key][0]

    yield run
    for save_dir, written in runs.values():
        assert listing(save_dir) == written, f"a test wrote into the shared run {save_dir}"


def test_2x2_run_from_a_converted_checkpoint_lowers_the_loss(converted, data, tmp_path):
    check(torchrun("--checkpoint", converted, "--data", data, "--save-dir", tmp_path, "--steps", 12, "--save-every", 5, *RUN))
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5, [r["loss"] for r in rows]
    for key in ("lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_device", "mfu", "memory_gb"):
        assert rows[-1][key] > 0
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_00000010", "step_00000012"]  # --keep 2

    # a training checkpoint exports: to our format (same weights) and to Hugging Face's
    convert = [sys.executable, str(ROOT / "convert_weights.py"), "--quiet"]
    for flags in ([tmp_path / "step_00000012", tmp_path / "ours"], ["--to-hf", tmp_path / "step_00000012", tmp_path / "hf"]):
        done = subprocess.run([*convert, *map(str, flags)], capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 0, done.stderr
    exported = load_model(tmp_path / "ours").state_dict()
    trained = final_weights(tmp_path)
    assert exported.keys() == trained.keys() == NAMES
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert (tmp_path / "hf" / "config.json").is_file()


def test_resume_on_the_same_mesh_from_the_written_config_continues_bit_for_bit(converted, data, tmp_path):
    common = ("--checkpoint", converted, "--data", data, "--steps", 8, "--save-every", 4, *RUN)
    check(torchrun(*common, "--save-dir", tmp_path / "whole"))
    check(torchrun(*common, "--save-dir", tmp_path / "split", "--stop-after", 4))
    # the second job starts from the first's written config.toml alone: its flags, --stop-after
    # 4 included, run steps 5-8 (4 + 4 = --steps 8) of the same run
    config = tmp_path / "split" / "config.toml"
    written = tomllib.loads(config.read_text())
    resumed = torchrun("--config", config, "--resume")
    check(resumed)
    assert f"resumed from {tmp_path / 'split' / 'step_00000004'} at step 4" in resumed.stdout
    assert tomllib.loads(config.read_text()) == {**written, "resume": True}  # the same flags, as it rewrites them
    whole, split = metrics(tmp_path / "whole"), metrics(tmp_path / "split")
    assert [r["step"] for r in split] == list(range(1, 9))
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() == NAMES
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tp", [1, 4])
def test_a_2x2_checkpoint_resumes_on_another_mesh(converted, data, shared_run, tmp_path, tp):
    """Resumed at step 4 on another mesh, three more steps: the losses of steps 6 and 7 and
    the final weights follow steps 5-7's updates, which need the resharded AdamW moments
    and the learning rate of steps 5-7 (step 5's loss is computed before any of them)."""
    common = ("--checkpoint", converted, "--data", data, "--steps", 7, "--save-every", 4, *RUN)
    # both meshes compare with one 2x2 run and resume a copy of one 2x2 run's step 4
    whole_dir, stopped = shared_run(*common, "--tp", 2), shared_run(*common, "--tp", 2, "--stop-after", 4)
    shutil.copytree(stopped, tmp_path / "moved")
    check(torchrun(*common, "--save-dir", tmp_path / "moved", "--tp", tp, "--resume"))
    whole, moved = metrics(whole_dir), metrics(tmp_path / "moved")
    assert [r["step"] for r in moved] == [r["step"] for r in whole] == list(range(1, 8))
    assert moved[-1]["samples_seen"] == whole[-1]["samples_seen"]
    for a, b in zip(whole[4:], moved[4:]):
        assert abs(a["loss"] - b["loss"]) <= RESHARD_TOL and abs(a["lr"] - b["lr"]) <= 1e-12, (a, b)
    a, b = final_weights(whole_dir), final_weights(tmp_path / "moved")
    assert a.keys() == b.keys() == NAMES
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= RESHARD_TOL, f"final weights differ by {worst:.3g} after resuming on tp {tp}"


def test_a_rank_killed_mid_run_restarts_and_ends_with_the_uninterrupted_weights(converted, data, shared_run, tmp_path):
    common = ("--checkpoint", converted, "--data", data, "--steps", 6, "--save-every", 3, "--resume", *RUN)
    whole = shared_run(*common)  # the next test's uninterrupted run too
    killed = torchrun(*common, "--save-dir", tmp_path / "killed", max_restarts=1, env={"LLAMA_TP_FAULT": "step:5:1"})
    check(killed)
    assert "resumed from" in killed.stdout and "step_00000003" in killed.stdout
    a, b = final_weights(whole), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() == NAMES
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_killed_while_saving_leaves_the_previous_checkpoint_to_resume(converted, data, shared_run, tmp_path):
    common = ("--checkpoint", converted, "--data", data, "--steps", 6, "--save-every", 3, "--resume", *RUN)
    whole = shared_run(*common)  # the previous test's uninterrupted run
    killed = torchrun(*common, "--save-dir", tmp_path / "killed", max_restarts=1, env={"LLAMA_TP_FAULT": "save:6:2"})
    check(killed)
    assert "step_00000003" in killed.stdout  # step 6's half-written save was not taken
    a, b = final_weights(whole), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() == NAMES
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--checkpoint", "/nonexistent/ckpt"], "model_args.json: not found"),
        (["--tp", "3"], "--tp 3 must divide the world size 4"),
        (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's max_seq_len"),
        (["--global-batch", "7"], "global batch 7 is not divisible by dp_size 2"),
        (["--seq-len", "120", "--global-batch", "4096"], "fewer than one global batch of 4096"),
        (["--cp", "2", "--seq-len", "30"], "--seq-len 30 must be a multiple of 2 x --cp = 4"),
        (["--seq-len", "33"], "--seq-len 33 must be a multiple of --tp 2: sequence parallelism (on by default)"),
        (["--pp", "2", "--pp-microbatches", "3", "--global-batch", "8"], "must be divisible by --pp-microbatches 3"),
        (["--pp", "2", "--pp-schedule", "interleaved"], "interleaved needs --virtual-stages 2 or more"),
    ],
)
def test_startup_errors_print_one_line_and_every_rank_exits(data, tmp_path, flags, message):
    result = torchrun("--data", data, "--save-dir", tmp_path, "--steps", 2, "--preset", "debug", *flags, timeout=120)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr.split("train.py: error:")[0][-500:]


def test_val_data_with_val_fraction_is_one_error_line_and_exit_code_2(tmp_path):
    """Refused while parsing, before any process group: plain python, no torchrun."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--val-data", tmp_path, "--val-fraction", "0.1"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert errors == ["train.py: error: --val-data and --val-fraction both choose the validation set; give one"], result.stderr


@pytest.mark.parametrize(
    "flags, dp, expected",
    [
        ([], 2, 4 * 2),  # --micro-batch 4 x dp 2
        (["--grad-accum", "3"], 2, 4 * 2 * 3),
        (["--pp", "2"], 2, 4 * 2 * 2),  # --pp-microbatches defaults to --pp
        (["--pp", "2", "--pp-microbatches", "3", "--micro-batch", "2", "--grad-accum", "2"], 3, 2 * 3 * 3 * 2),
        (["--pp", "2", "--global-batch", "12"], 2, 12),  # given: taken as it is
    ],
)
def test_default_global_batch_is_micro_batch_x_pp_microbatches_x_dp_x_grad_accum(flags, dp, expected):
    from dataclasses import replace

    from llama.training.flags import parse_args
    from llama.training.inputs import batch_layout

    opts = parse_args(["--tp", "1", *flags])
    assert batch_layout(opts, replace(TINY, n_layers=4), dp) == expected


def test_help_gives_every_flag_a_line_with_its_default(capsys):
    import re

    from llama.training.flags import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = {e.split()[0].rstrip(","): " ".join(e.split()) for e in re.split(r"\n  (?=-)", text)[1:]}
    assert {"--seq-len", "--activation-checkpointing", "--seed", "--log-every", "--train-on", "--val-fraction"} <= entries.keys()
    for flag, entry in entries.items():
        assert flag == "-h" or "(default" in entry, entry


# ---------------------------------------------------------------- LoRA

LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "16", "--lora-targets", "wq,wv,wo,w2", "--lora-rslora"]


def test_lora_run_on_tp2_lowers_the_loss_and_saves_only_the_adapters(converted, data, tmp_path):
    """2 ranks, tp 2, adapters on four projections: the loss falls, the checkpoint holds
    exactly the adapters the flags name (B moved from zero) and no base, load_model(base,
    adapter=) gives the converted base bit for bit with those adapters, and the written
    config.toml gives back the same LoRA flags."""
    from llama.lora import LoRAConfig
    from llama.training.flags import parse_args

    check(torchrun("--checkpoint", converted, "--data", data, "--save-dir", tmp_path, "--tp", 2, "--steps", 6,
                   *RUN[:-2], "--lr", "1e-2", *LORA_FLAGS, nproc=2))
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    trained, base = final_weights(tmp_path), load_model(converted).state_dict()
    adapters = {k for k in trained if k.endswith((".lora_a", ".lora_b"))}
    assert adapters == {f"layers.{i}.{m}.{p}.lora_{f}" for i in range(TINY.n_layers) for m, p in
                        [("attention", "wq"), ("attention", "wv"), ("attention", "wo"), ("feed_forward", "w2")]
                        for f in "ab"}
    assert set(trained) == adapters, "a LoRA checkpoint holds the adapters only, not the frozen base"
    newest = sorted(tmp_path.glob("step_*"))[-1]
    adapted = load_model(converted, adapter=newest).state_dict()  # the base read back from its own checkpoint
    assert all(torch.equal(adapted[k], base[k]) for k in NAMES)
    assert all(torch.equal(adapted[k], trained[k]) for k in adapters)
    assert all(trained[k].abs().max() > 1e-3 for k in adapters if k.endswith("lora_b")), "B did not move from zero"

    config = tmp_path / "config.toml"
    written = tomllib.loads(config.read_text())
    assert {k: written[k] for k in written if k.startswith("lora-")} == {
        "lora-rank": 4, "lora-alpha": 16.0, "lora-dropout": 0.0, "lora-targets": "wq,wv,wo,w2", "lora-rslora": True}
    assert LoRAConfig.from_options(parse_args(["--config", str(config)])) == LoRAConfig(
        4, 16.0, 0.0, ("wq", "wv", "wo", "w2"), rslora=True)


def test_lora_flags_are_in_help_and_a_bad_target_is_one_error_line_and_exit_code_2(capsys, tmp_path):
    from llama.training.flags import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in ("--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-targets", "--lora-rslora"):
        assert flag in text, flag
    # refused while parsing, before any process group: plain python, no torchrun
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--lora-rank", "4", "--lora-targets", "wx"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("train.py: error: --lora-targets wx"), result.stderr
    assert "wq,wk,wv,wo,w1,w2,w3" in errors[0]
