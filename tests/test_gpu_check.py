"""The prepared GPU check runs its every part on CPU with a tiny model (`--device cpu
--tiny`), so the command a GPU session runs cannot rot: each part reports ok with numbers
inside its tolerances, the parts that need CUDA say so, the JSON under $OUT carries the
same results as the table, and it is there after every part, also when one hangs."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import gpu_check_attention  # noqa: E402
import gpu_check_parts  # noqa: E402

PARTS = ["plan", "collectives", "flex", "compile", "kernels", "sync", "logits", "decode", "train_py"]
TINY_VOCAB = 512
STEPS = 5  # gpu_check's default --steps; train.py runs 2 more


def run_check(tmp_path, *args, timeout=300):
    (tmp_path / "tmp").mkdir()  # its temporary files (corpus, checkpoints, train.py's run), removed at the end
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path), "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)


@pytest.mark.compat  # the GPU machines run torch 2.11
def test_tiny_gpu_check_on_cpu_prints_the_table_and_writes_json(tmp_path):
    out = run_check(tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split() and line.split()[0] in PARTS}
    assert list(rows) == PARTS, out.stdout
    assert all(line.split()[1] == "ok" for line in rows.values()), out.stdout
    assert "skipped: needs CUDA" in rows["sync"]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["device"] == "cpu" and list(parts) == PARTS
    assert all(p["ok"] for p in parts.values()), {name: p.get("error") for name, p in parts.items()}
    assert report["budgets"] == gpu_check.BUDGETS
    assert parts["plan"]["planned_allocated_gib"] > 0

    collectives = parts["collectives"]
    assert collectives["backend"] == "gloo" and collectives["checks"] == 20 and not collectives["failures"]
    assert collectives["max_abs_diff"] <= gpu_check_attention.COLLECTIVE_ATOL  # one rank: the same bytes

    flex = parts["flex"]
    assert all(flex["masks_equal"].values()) and not flex["failures"]
    assert flex["seq"] >= 2 * gpu_check_attention.FLEX_BLOCK and flex["documents"][0] >= 4  # packed, across blocks
    assert set(flex["runs"]) == {"eager float32", "eager bfloat16", "compiled float32", "compiled bfloat16"}
    assert flex["worst_fp32_rel"] <= gpu_check_attention.FLEX_FP32_RTOL
    # bf16 really ran in bf16: its rounding shows, and stays inside its tolerance
    assert 1e-4 < flex["worst_bf16_rel"] <= gpu_check_attention.FLEX_BF16_RTOL
    # torch 2.13 has no flex attention backward on CPU: skipped, and torch's own reason given
    assert flex["backward"].startswith("skipped on CPU") and "NotImplementedError" in flex["backward"]
    assert "aot_eager" in flex["compiled_with"]

    compile_ = parts["compile"]
    assert compile_["backend"] == "aot_eager" and compile_["tokens_per_s"] > 0 and math.isfinite(compile_["loss"])
    assert compile_["mfu"] is None  # no peak for a CPU in the device table
    assert parts["kernels"]["kernel"] in ("flash", "efficient", "cudnn", "math")
    assert parts["kernels"]["causal_kernel"] in ("flash", "efficient", "cudnn", "math")

    logits = parts["logits"]
    assert 0 < logits["relative_error"] < gpu_check.LOGITS_BF16_RTOL
    assert logits["reference_tf32"] == {"matmul_precision": "highest", "matmul_allow_tf32": False,
                                        "cudnn_allow_tf32": False}
    assert logits["after_tf32"]["cudnn_allow_tf32"] is True  # torch's default, restored after the reference
    assert parts["decode"]["new_tokens"] == 16 and parts["decode"]["decode_tokens_per_s"] > 0

    run = parts["train_py"]
    assert run["returncode"] == 0 and run["steps"] == STEPS + 2 and not run["failures"]
    assert all(math.isfinite(x) for x in run["losses"])
    assert abs(run["losses"][0] - math.log(TINY_VOCAB)) <= gpu_check_parts.FIRST_LOSS_TOL
    assert run["dtype"] == "fp32" and run["document_masking"] is True  # train.py's CPU defaults
    assert run["tokens_per_s"] > 0 and run["mfu"] > 0  # train.py measures a CPU's peak itself
    assert run["saved"] == [f"step_{STEPS + 2:08d}"]
    assert not [p.name for p in (tmp_path / "tmp").iterdir() if p.name.startswith("gpu_check_")]  # cleaned up


HANGING_RUN = """
import sys, time
sys.path.insert(0, {bench!r})
import gpu_check
quick_plan = lambda opts, ctx: {{"planned_allocated_gib": 1.0}}
gpu_check.PARTS = {{"decode": gpu_check.PARTS["decode"], "plan": quick_plan, "hang": lambda opts, ctx: time.sleep(60)}}
gpu_check.BUDGETS = {{"decode": 10, "plan": 10, "hang": 60}}
sys.exit(gpu_check.main(["--device", "cpu", "--tiny", "--parts", "decode,plan,hang", "--watchdog-s", "2"]))
"""


def test_a_failing_part_is_a_row_and_a_hang_ends_on_the_watchdog_keeping_the_json(tmp_path):
    """decode without the logits part has no model: it fails alone and the next part runs.
    Then a part stuck past the watchdog (longer than it, as a kernel that the per-part
    clock cannot interrupt would be): faulthandler dumps the stacks and ends the process;
    the JSON written after each part before it is there, and names the part that hung."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", HANGING_RUN.format(bench=str(ROOT / "bench"))],
                         capture_output=True, text=True, env=env, timeout=60, cwd=ROOT)
    assert out.returncode != 0
    assert "Timeout (0:00:02)!" in out.stderr and "in <lambda>" in out.stderr, out.stderr
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["decode", "plan", "hang"]
    assert not parts["decode"]["ok"] and "needs the logits part" in parts["decode"]["error"]
    assert parts["plan"] == {"ok": True, "planned_allocated_gib": 1.0, "seconds": parts["plan"]["seconds"]}
    assert not parts["hang"]["ok"] and parts["hang"]["error"] == gpu_check.STARTED


def test_a_failed_part_makes_the_exit_code_1(tmp_path):
    """decode without the logits part, in this process (main() disarms its watchdog)."""
    assert gpu_check.main(["--device", "cpu", "--tiny", "--parts", "decode", "--out", str(tmp_path)]) == 1
    assert json.loads((tmp_path / "gpu_check.json").read_text())["parts"]["decode"]["ok"] is False


def test_a_failed_part_reads_failed_in_the_table_with_its_reasons_and_numbers():
    table = gpu_check.format_table({
        "decode": {"ok": False, "error": "RuntimeError: needs the logits part's bf16 model", "seconds": 0.1},
        "flex": {"ok": False, "seq": 256, "worst_fp32_rel": 0.03, "failures": ["eager float32: relative error 0.03 > 0.0001"],
                 "seconds": 2.0},
    })
    decode, flex = table.splitlines()[1:]
    assert decode.split()[:2] == ["decode", "FAIL"] and "needs the logits part" in decode
    assert flex.split()[:2] == ["flex", "FAIL"] and "0.03 > 0.0001" in flex and "worst_fp32_rel 0.03" in flex


def test_the_budgets_add_up_and_the_compile_parts_come_first():
    budgets = gpu_check.BUDGETS
    assert list(budgets) == list(gpu_check.PARTS) == PARTS
    assert sum(budgets.values()) < gpu_check.TOTAL_BUDGET < gpu_check.WATCHDOG_S <= 8 * 60 - 20
    order = list(budgets)
    assert max(order.index(p) for p in ("collectives", "flex", "compile")) < order.index("train_py")
    doc = gpu_check.__doc__
    assert f"add up to {sum(budgets.values())} s" in doc and f"TOTAL_BUDGET of {gpu_check.TOTAL_BUDGET} s" in doc
    assert f"WATCHDOG_S of {gpu_check.WATCHDOG_S} s" in doc
    for name, seconds in budgets.items():
        assert any(line.split()[:2] == [name, str(seconds)] for line in doc.splitlines()), name


def test_the_flops_are_the_models_own():
    """No formula of its own: MFU comes from ModelArgs.training_flops_per_token, which
    counts the tied output projection's matmul."""
    modules = (gpu_check, gpu_check_parts, gpu_check_attention)
    assert not any(hasattr(module, "train_flops_per_token") for module in modules)
    source = "".join(Path(module.__file__).read_text() for module in modules)
    assert "def train_flops_per_token" not in source and source.count("training_flops_per_token(") == 2


def test_the_part_clock_stops_a_stuck_part():
    import time

    start = time.monotonic()
    try:
        with gpu_check.time_limit(1):
            time.sleep(5)
        raise AssertionError("no timeout")
    except gpu_check.PartTimeout as err:
        assert "timed out after 1 s" in str(err)
    assert time.monotonic() - start < 3
