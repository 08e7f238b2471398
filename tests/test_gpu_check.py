"""The prepared GPU check runs its every part on CPU with a tiny model (`--device cpu
--tiny`), so the command a GPU session runs cannot rot: each part reports ok, the parts
that need CUDA say so, and the JSON under $OUT carries the same results as the table."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["plan", "logits", "decode", "train", "sdpa", "sync", "compile"]
# bf16 against fp32 logits of a tiny random model: rounding of 2 blocks, ~0.5% relative
BF16_LOGITS_RTOL = 0.05


def test_tiny_gpu_check_on_cpu_prints_the_table_and_writes_json(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = {line.split()[0]: line for line in out.stdout.splitlines() if line.split() and line.split()[0] in PARTS}
    assert list(rows) == PARTS, out.stdout
    assert all(line.split()[1] == "ok" for line in rows.values()), out.stdout
    assert "skipped: needs CUDA" in rows["sync"] and "skipped: needs CUDA" in rows["train"]

    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parts = report["parts"]
    assert report["device"] == "cpu" and list(parts) == PARTS
    assert 0 < parts["logits"]["relative_error"] < BF16_LOGITS_RTOL
    assert parts["decode"]["new_tokens"] == 16 and parts["decode"]["decode_tokens_per_s"] > 0
    assert parts["train"]["tokens_per_s"] > 0 and parts["train"]["mfu"] is None  # no peak for a CPU
    assert parts["sdpa"]["kernel"] in ("flash", "efficient", "cudnn", "math")
    assert parts["compile"]["backend"] == "eager (CPU)" and parts["compile"]["tokens_per_s"] > 0
    assert parts["plan"]["planned_allocated_gib"] > 0


def test_a_failing_part_is_a_row_and_the_rest_still_run(tmp_path):
    """decode without the logits part has no model: it fails alone, in the table."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path)}
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                          "--parts", "decode,sdpa"], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 1
    parts = json.loads((tmp_path / "gpu_check.json").read_text())["parts"]
    assert not parts["decode"]["ok"] and "needs the logits part" in parts["decode"]["error"]
    assert parts["sdpa"]["ok"]


def test_the_part_clock_stops_a_stuck_part():
    sys.path.insert(0, str(ROOT / "bench"))
    import time

    import gpu_check

    start = time.monotonic()
    try:
        with gpu_check.time_limit(1):
            time.sleep(5)
        raise AssertionError("no timeout")
    except gpu_check.PartTimeout as err:
        assert "timed out after 1 s" in str(err)
    assert time.monotonic() - start < 3
