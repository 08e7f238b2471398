"""train.py with pipeline (--pp) and context (--cp) parallelism, end to end under torchrun
on 4 CPU processes: the same run as on the 2-D mesh (losses, grad norms, validation
losses), and a 2-D checkpoint that resumes on pp 2 and on cp 2, and a pp 2 checkpoint
that resumes on 2-D, continuing the same run.

Tolerance: fp32 on another mesh adds up reductions in another order; 1e-5 on every
logged number over these few steps."""

import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from llama import Transformer
from llama.weights.format import save_checkpoint
from tests.corpus import write_documents
from tests.test_train import TINY, check, final_weights, metrics, shared_run, torchrun  # noqa: F401

pytestmark = pytest.mark.compat  # the whole file is in the torch-versions subset

TOL = 1e-5
ARGS = replace(TINY, n_layers=4)  # pp 2: two blocks a stage; interleaved: one a stage
NAMES = set(Transformer(ARGS).state_dict())
RUN = ["--seq-len", "32", "--global-batch", "8", "--warmup", "2", "--log-every", "1", "--lr", "3e-3", "--steps", "4",
       "--save-every", "2"]
TWO_D = ["--tp", "2"]  # 2 dp x 2 tp
MESHES = {
    "pp2xtp2": ["--tp", "2", "--pp", "2", "--pp-microbatches", "2"],
    "pp2xdp2-interleaved": ["--tp", "1", "--pp", "2", "--pp-schedule", "interleaved", "--virtual-stages", "2",
                            "--no-pp-fewer-end-layers", "--pp-microbatches", "2"],
    "cp2xtp2-sp": ["--tp", "2", "--cp", "2", "--sequence-parallel"],
    # HSDP: parameters sharded over dp_shard x cp, replicated over dp_replicate
    "cp2xhsdp2": ["--tp", "1", "--cp", "2", "--strategy", "hybrid", "--dp-replicate", "2"],
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("converted")
    return save_checkpoint(Transformer(ARGS).init_weights(seed=5).state_dict(), ARGS, path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """300 files, 300 documents of 200 bytes: windows of 33 tokens that cross them test the
    document masks (8 of the 32 windows the runs train on; six documents of 10,000 bytes
    left none, see test_some_trained_windows_hold_two_documents)."""
    return write_documents(tmp_path_factory.mktemp("data"), count=300, chars=200)


@pytest.fixture(scope="module")
def two_d(converted, data, tmp_path_factory) -> Path:
    """The reference: the whole run on the 2-D mesh, with a validation set."""
    save_dir = tmp_path_factory.mktemp("two_d")
    check(torchrun("--checkpoint", converted, "--data", data, "--val-fraction", "0.2", "--eval-every", "2",
                   "--save-dir", save_dir, *RUN, *TWO_D))
    return save_dir


def test_some_trained_windows_hold_two_documents(data, two_d):
    """The windows the runs train on, as train.py's loader cuts them (the same on any
    mesh): some hold two documents, so the comparisons below cover the document masks and
    positions under pp and cp."""
    from llama.data.loader import split_documents
    from llama.data.packed import PackedDataset
    from llama.data.token_cache import load_token_cache
    from llama.tokenizer import ByteTokenizer

    trained = metrics(two_d)[-1]["samples_seen"]
    assert trained == 4 * 8  # --steps 4 of --global-batch 8
    cache = load_token_cache([data], ByteTokenizer(), quiet=True)  # the run's cache, next to the data
    train_docs, _ = split_documents(cache.num_docs, 0.2, seed=0)  # --val-fraction 0.2, --seed 0
    windows = PackedDataset(cache, 32, seed=0, document_masking=True, documents=train_docs)
    crossing = [s for s in range(trained) if windows.get_batch(s, 0, 1, 1).document_ids.max() > 0]
    assert len(crossing) >= 4, f"{len(crossing)} of {trained} trained windows hold two documents"


def same_numbers(expected: list, got: list, what: str, keys=("loss", "grad_norm", "val_loss")) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in expected], what
    for a, b in zip(expected, got):
        for key in keys:
            if key in a:
                assert abs(a[key] - b[key]) <= TOL, f"{what}, step {a['step']}: {key} {b[key]} vs 2-D {a[key]}"


# pp2xtp2 from the start runs in the last resume case below
@pytest.mark.parametrize("mesh", ["pp2xdp2-interleaved", "cp2xtp2-sp", "cp2xhsdp2"])
def test_pp_and_cp_runs_log_the_2d_runs_numbers(converted, data, two_d, tmp_path, mesh):
    check(torchrun("--checkpoint", converted, "--data", data, "--val-fraction", "0.2", "--eval-every", "2",
                   "--save-dir", tmp_path, *RUN, *MESHES[mesh]))
    same_numbers(metrics(two_d), metrics(tmp_path), mesh)
    a, b = final_weights(two_d), final_weights(tmp_path)
    assert a.keys() == b.keys() == NAMES, "the checkpoint must keep the whole model's names"
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, f"{mesh}: final weights differ from 2-D by {worst:.3g}"


@pytest.mark.parametrize("first, then", [("2d", "pp2xtp2"), ("2d", "cp2xtp2-sp"), ("pp2xtp2", "2d")])
def test_a_checkpoint_resumes_across_pp_and_cp_and_continues_the_run(converted, data, two_d, shared_run, tmp_path,
                                                                   first, then):
    flags = {"2d": TWO_D, **MESHES}
    common = ("--checkpoint", converted, "--data", data, "--val-fraction", "0.2", "--eval-every", "2", *RUN)
    stopped = shared_run(*common, "--stop-after", 2, *flags[first])  # one 2-D job for both cases that start on 2-D
    assert [p.name for p in stopped.glob("step_*")] == ["step_00000002"]
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)  # resumed in a copy: others read it
    resumed = torchrun(*common, "--save-dir", tmp_path, "--resume", *flags[then])
    check(resumed)
    assert "resumed from" in resumed.stdout
    same_numbers(metrics(two_d), metrics(tmp_path), f"{first} -> {then}")
    a, b = final_weights(two_d), final_weights(tmp_path)
    assert a.keys() == b.keys() == NAMES
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, f"{first} -> {then}: final weights differ from 2-D by {worst:.3g}"
    shutil.rmtree(tmp_path)


# what a new user runs first on a node: three steps of train.py on each parallel dimension
# (tp with sequence parallelism, then cp 2 and pp 2 beside it), in the torch-versions subset
# with everything above
THREE_STEP_MESHES = {
    "dp2xtp2-sp": ["--tp", "2", "--sequence-parallel"],
    "cp2xtp2-sp": ["--tp", "2", "--cp", "2", "--sequence-parallel"],
    "pp2xtp2-sp": ["--tp", "2", "--pp", "2", "--pp-microbatches", "2", "--sequence-parallel"],
}


@pytest.mark.parametrize("mesh", THREE_STEP_MESHES)
def test_three_steps_of_train_py_run_on_2x2_with_tp_sp_cp_and_pp(converted, data, tmp_path, mesh):
    check(torchrun("--checkpoint", converted, "--data", data, "--save-dir", tmp_path, "--seq-len", "32",
                   "--global-batch", "8", "--steps", "3", "--warmup", "1", "--lr", "3e-3", "--log-every", "1", *THREE_STEP_MESHES[mesh]))
    logged = [r for r in metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in logged] == [1, 2, 3], mesh
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in logged), logged
    assert logged[-1]["loss"] < logged[0]["loss"], f"{mesh}: three steps did not lower the loss: {logged}"
    assert [p.name for p in tmp_path.glob("step_*")] == ["step_00000003"]
