"""Training throughput and MFU of train.py on 4 CPU processes.

    python bench/bench_train.py [--steps 5] [--meshes 2x2,4x1,1x4] [--strategy full,grad_op] [--skip-default]

1. the embedded default run (`torchrun --nproc_per_node 4 train.py`, debug model, 2x2);
2. a larger CPU config: dim 512, 4 layers, 8 heads / 4 kv heads, vocab 8192, seq 512,
   micro-batch 4 per dp rank, fp32, on the meshes given as DPxTP (the global batch is
   kept equal across meshes: 4 x the 2x2 dp size), with each FSDP --strategy given.
MFU = training FLOPs per token x tokens/s / the machine's fp32 matmul peak, which
train.py measures on every rank at start-up (the ranks' sum). The first step is
warm-up and left out; the figure is the median of the others."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llama import ModelArgs, Transformer  # noqa: E402
from llama.weights.format import save_checkpoint  # noqa: E402

LARGE = ModelArgs(dim=512, n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=8192, multiple_of=256, max_seq_len=512)


def run(save_dir: Path, *flags) -> list:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--rdzv-backend", "c10d",
           "--rdzv-endpoint", "localhost:0", str(ROOT / "train.py"), "--save-dir", str(save_dir), "--save-every", "0",
           "--log-every", "1", *map(str, flags)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode:
        raise SystemExit(f"train.py failed:\n{result.stderr[-3000:]}")
    return [json.loads(line) for line in (save_dir / "metrics.jsonl").read_text().splitlines()]


def summary(rows: list) -> str:
    timed = rows[1:] or rows
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    mfu = statistics.median(r["mfu"] for r in timed)
    return f"{tps:8.0f} tok/s  {tps / 4:7.0f} tok/s/process  MFU {100 * mfu:5.1f}%  loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--meshes", default="2x2,4x1,1x4")
    parser.add_argument("--strategy", default="full", help="train.py --strategy values, comma-separated (default: %(default)s)")
    parser.add_argument("--flags", default="", help="more train.py flags for the dim-512 runs, e.g. '--no-document-masking'")
    parser.add_argument("--skip-default", action="store_true")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not opts.skip_default:
            rows = run(tmp / "default", "--steps", opts.steps)
            print(f"default run (debug, 2x2):    {summary(rows)}")
        ckpt = save_checkpoint(Transformer(LARGE).init_weights(seed=0).state_dict(), LARGE, tmp / "large")
        for mesh in opts.meshes.split(","):
            for index, strategy in enumerate(opts.strategy.split(",")):
                dp, tp = map(int, mesh.split("x"))
                rows = run(tmp / f"large_{mesh}_{strategy}_{index}", "--checkpoint", ckpt, "--tp", tp, "--seq-len", 512,
                           "--global-batch", 8, "--steps", opts.steps, "--warmup", 1, "--lr", "1e-3", "--strategy", strategy,
                           *opts.flags.split())
                print(f"dim 512 / seq 512, {dp}x{tp} (dp x tp), {strategy:>7}: {summary(rows)}", flush=True)


if __name__ == "__main__":
    main()
