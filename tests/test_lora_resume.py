"""train.py --lora-rank under torchrun on 4 CPU processes: a LoRA run's checkpoint resumes on
another mesh (the base read again from --checkpoint, the adapters and their AdamW state from
the checkpoint) and continues the same run; a resume on another base is one error, exit 2.
And in-process (train.main on parallel.spawn's ranks): a pp 2 LoRA run on a random-init base
resumes on one device, the base drawn again from --seed.

fp32; 1e-5 on losses and adapters."""

import shutil
from pathlib import Path

import pytest
import torch

from llama import Transformer
from llama.weights.format import save_checkpoint
from parallel.spawn import run_on_ranks
from tests.test_train import RUN, TINY, check, final_weights, metrics, torchrun

TOL = 1e-5
LORA = ("--lora-rank", 4, "--steps", 6, "--save-every", 3, *RUN)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """A base, and a 2x2 LoRA run of 6 steps on it with checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("lora_resume")
    base = save_checkpoint(Transformer(TINY).init_weights(seed=5).state_dict(), TINY, root / "base")
    data = root / "corpus.txt"  # test_train's corpus: about 60 KB of text
    files = sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py"))[:6]
    data.write_text("\n\n".join(f.read_text() for f in files)[:60_000])
    common = ("--checkpoint", base, "--data", data, *LORA)
    check(torchrun(*common, "--tp", 2, "--save-dir", root / "whole"))
    return {"root": root, "base": base, "data": data, "whole": root / "whole"}


def stopped_at_step_3(lora_run, into):
    """A copy of the run as a job stopped after step 3 would have left it."""
    shutil.copytree(lora_run["whole"], into)
    shutil.rmtree(into / "step_00000006")
    return into


def test_a_2x2_lora_checkpoint_resumes_on_4x1_and_continues_the_same_run(lora_run, tmp_path):
    moved = stopped_at_step_3(lora_run, tmp_path / "moved")
    resumed = torchrun("--checkpoint", lora_run["base"], "--data", lora_run["data"], *LORA, "--tp", 1,
                       "--save-dir", moved, "--resume")
    check(resumed)
    assert f"resumed from {moved / 'step_00000003'} at step 3" in resumed.stdout
    whole, split = metrics(lora_run["whole"]), metrics(moved)
    assert [r["step"] for r in split] == [r["step"] for r in whole] == list(range(1, 7))
    for a, b in zip(whole[3:], split[3:]):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
    a, b = final_weights(lora_run["whole"]), final_weights(moved)
    assert a.keys() == b.keys() and all(k.endswith((".lora_a", ".lora_b")) for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, f"adapters differ by {worst:.3g} after resuming on 4x1"
    moved_by = max(b[k].abs().max().item() for k in b if k.endswith(".lora_b"))
    assert moved_by > 100 * TOL, "B is still about zero: the comparison would be empty"


def test_a_lora_resume_on_another_base_is_one_error_naming_both_and_exit_code_2(lora_run, tmp_path):
    other = save_checkpoint(Transformer(TINY).init_weights(seed=6).state_dict(), TINY, tmp_path / "other")
    moved = stopped_at_step_3(lora_run, tmp_path / "moved")
    result = torchrun("--checkpoint", other, "--data", lora_run["data"], *LORA, "--save-dir", moved, "--resume",
                      timeout=120)
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr, result.stderr[-2000:]  # train.py's 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert str(lora_run["base"].absolute()) in errors[0] and str(other.absolute()) in errors[0], errors[0]
    assert "resume with the run's own base" in errors[0]


# ---------------------------------------------------------------- pipeline, random-init base
# In-process: train.main on gloo ranks of parallel.spawn (no torchrun launch), the real run
# with its Checkpointer.resume and build_trainee. The debug preset: a base from --seed, drawn
# again at the resume, since a LoRA checkpoint holds no base.
RANDOM_BASE = ("--preset", "debug", "--lora-rank", 4, "--steps", 4, "--save-every", 2, *RUN)


def _train_main(argv: list) -> int:
    import train

    return train.main(argv)


def train_in_process(*flags, nproc: int) -> None:
    codes = run_on_ranks(_train_main, nproc, [str(f) for f in flags], timeout=300)
    assert codes == [0] * nproc, codes


@pytest.fixture(scope="module")
def pp_run(tmp_path_factory, lora_data):
    """A LoRA run of 4 steps on a random-init base under pp 2, checkpoints at 2 and 4."""
    save_dir = tmp_path_factory.mktemp("lora_pp") / "whole"
    train_in_process(*RANDOM_BASE, "--data", lora_data, "--pp", 2, "--tp", 1, "--save-dir", save_dir, nproc=2)
    return save_dir


@pytest.fixture(scope="module")
def lora_data(tmp_path_factory):
    data = tmp_path_factory.mktemp("lora_data") / "corpus.txt"  # test_train's corpus
    files = sorted((Path(torch.__file__).parent / "nn" / "modules").glob("*.py"))[:6]
    data.write_text("\n\n".join(f.read_text() for f in files)[:60_000])
    return data


def test_a_pp2_lora_checkpoint_of_a_random_init_base_resumes_on_one_device_and_continues_the_same_run(
        pp_run, lora_data, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(pp_run, moved)
    shutil.rmtree(moved / "step_00000004")
    train_in_process(*RANDOM_BASE, "--data", lora_data, "--tp", 1, "--save-dir", moved, "--resume", nproc=1)
    whole, split = metrics(pp_run), metrics(moved)
    assert [r["step"] for r in split] == [r["step"] for r in whole] == [1, 2, 3, 4]
    for a, b in zip(whole[2:], split[2:]):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
    a, b = final_weights(pp_run), final_weights(moved)
    assert a.keys() == b.keys() and len(a) == 2 * 7 * 4 and all(k.endswith((".lora_a", ".lora_b")) for k in a)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= TOL, f"adapters differ by {worst:.3g} after resuming a pp 2 run on one device"
    moved_by = max(b[k].abs().max().item() for k in b if k.endswith(".lora_b"))
    assert moved_by > 100 * TOL, "B is still about zero: the comparison would be empty"
