"""bench/bench_dpo.py runs end to end with a tiny model (`--tiny`, 4 gloo ranks on a 2x2
mesh, in a subprocess as a user runs it), so the benchmark cannot rot. Structure only, no
timing: the table has a row per variant, every step sees the same tokens, and its memory
columns add up: the stored reference is its table, (pairs + 1) x 2 fp32 (the last row for
padding pairs); a reference model kept in memory adds exactly its parameters' bytes, those
of the policy's own shards; DPO holds the same training state as SFT, and only the LoRA
base as reference runs a second forward."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 1000  # not the default 10,000: the table's size follows --epoch-pairs
TOKENS = 2 * 1 * 2 * 32  # --tiny: 2 sequences of 1 pair per dp rank, dp 2, seq 32
ROWS = ["SFT, cross-entropy", "DPO, stored reference", "DPO LoRA r 4, base as reference",
        "DPO LoRA r 4, stored reference"]


def number(cell: str) -> int:
    return int(re.match(r"[\d,]+", cell).group().replace(",", ""))


def test_tiny_bench_dpo_table_has_every_variant_and_its_memory_adds_up():
    run = subprocess.run([sys.executable, "bench/bench_dpo.py", "--tiny", "--epoch-pairs", str(PAIRS)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = [line.strip("| ").split(" | ") for line in run.stdout.splitlines() if line.startswith("| ")]
    header = table[0]
    rows = {cells[0]: dict(zip(header, cells)) for cells in table[1:]}
    assert list(rows) == ROWS, run.stdout
    model = number(re.search(r"a reference model in memory: ([\d,]+) bytes per rank", run.stdout).group(1))

    state_column = "params + grads + AdamW per rank, bytes"
    sft = rows[ROWS[0]]
    sft_params = number(sft[state_column].split("(")[1])
    assert model == sft_params, "the frozen copy is sharded as the policy: the same bytes"
    assert sft["reference per rank, bytes"] == "none"
    assert number(sft["total per rank, bytes"]) == number(sft[state_column])

    for name, row in rows.items():
        state = number(row[state_column])
        parts = [number(p) for p in row[state_column].split("(")[1].rstrip(")").split(" + ")]
        assert state == sum(parts), f"{name}: params + grads + AdamW"
        assert number(row["tokens/step"]) == TOKENS, f"{name}: every variant steps on the same tokens"
        assert number(row["forwards/step"]) == (2 if name == ROWS[2] else 1), name
        if name == ROWS[0]:
            continue
        table = number(row["reference per rank, bytes"])
        assert table == (PAIRS + 1) * 2 * 4, f"{name}: the table is (pairs + 1) x 2 fp32"
        assert number(row["total per rank, bytes"]) == state + table, name
        in_memory = number(row["total with a reference model in memory instead, bytes"])
        assert in_memory - state == model, f"{name}: a reference model adds exactly its parameters' bytes"

    # DPO trains the same model with the same optimizer: the same state, the same FLOPs
    assert rows[ROWS[1]][state_column] == sft[state_column]
    flops = {name: float(re.search(r"\(([\d.]+)\)", row["FLOPs/step, G (x sft)"]).group(1))
             for name, row in rows.items()}
    assert flops[ROWS[1]] == 1.0
    assert flops[ROWS[3]] < flops[ROWS[2]], "the base's forward as reference adds FLOPs"
