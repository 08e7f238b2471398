"""train.py --lora-rank under torchrun on 4 CPU processes: a LoRA run's checkpoint resumes on
another mesh (the base read again from --checkpoint, the adapters and their AdamW state from
the checkpoint) and continues the same run; a resume on another base is one error, exit 2.

fp32; 1e-5 on losses and adapters."""

import shutil
from pathlib import Path

import pytest
import torch

from llama import Transformer
from llama.weights.format import save_checkpoint
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
