"""Benchmark convert_weights.py on a synthetic Hugging Face checkpoint (bf16, several shards,
about 2.2 GB, in a temporary directory under /tmp, removed at the end). Prints figures, not
pass/fail:

  throughput   HF -> ours and ours -> HF, each against shutil.copyfile of its own input
               (HF's files, and the converted files the export reads) in the same run;
               page cache warm for all. Each writer starts alike: its previous output is
               deleted and the disk synced just before it runs, because writing into
               memory freed long before is far slower on this VM than into memory just
               freed (deleting three outputs at once, then writing three in a row, made
               the third writer, the export, look 7x slower than the copy). Goal: ratio
               >= 0.8 (HF -> ours), >= 0.7 (ours -> HF).
  peak RSS     ru_maxrss of the conversion run as a subprocess, next to the RSS of the
               same subprocess that only imports. Goal: <= 2x the largest tensor + 0.5 GB.
  bytes read   per rank when loading the converted checkpoint on 4 ranks at tp 4, around
               load_model: the tensor bytes the loader's preads return (counted by
               wrapping os.preadv), rchar (all bytes returned by read syscalls, page cache
               or not: tensors + headers, index, model_args.json) and read_bytes (bytes
               fetched from the block device, after evicting the files from the page cache
               with posix_fadvise; page-granular, and a page holding two ranks' columns is
               charged to whichever rank reads it first), both from /proc/self/io. Goal:
               <= 1.1x the rank's shard for row-split tensors. Column-split ones (wo, w2)
               are read in bands of whole rows (llama/weights/safetensors_io.py: few large reads instead
               of one per row), about tp x their shard from the page cache; storage still
               serves each byte once per node. Set llama.weights.safetensors_io.MAX_HOLE_BYTES = 0
               for exact per-row reads.

  PYTHONPATH=. python bench/bench_convert.py [--layers 9] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from statistics import median
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llama.weights.hf_config import hf_config_from_args  # noqa: E402
from llama import ModelArgs  # noqa: E402
from llama.weights.names import expected_shapes, to_hf_name  # noqa: E402
from llama.weights.safetensors_io import SafetensorsWriter, nbytes_of  # noqa: E402
from parallel.spawn import run_on_ranks  # noqa: E402

SHARD_BYTES = 600_000_000


def make_hf_checkpoint(path: Path, args: ModelArgs) -> tuple:
    """Random bf16 weights in HF names, in ~600 MB shards + index, written one tensor at a time."""
    path.mkdir()
    shapes = {to_hf_name(name): shape for name, shape in expected_shapes(args).items()}
    groups, size = [[]], 0
    for name, shape in shapes.items():
        n = nbytes_of(torch.bfloat16, shape)
        if groups[-1] and size + n > SHARD_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += n
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        specs = [(n, torch.bfloat16, shapes[n]) for n in names]
        with SafetensorsWriter(path / file, specs, {"format": "pt"}) as writer:
            for name in names:
                writer.write(name, torch.randn(shapes[name], generator=gen, dtype=torch.bfloat16))
                weight_map[name] = file
    total = sum(nbytes_of(torch.bfloat16, s) for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config = hf_config_from_args(args, torch.bfloat16, None, None)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    largest = max(nbytes_of(torch.bfloat16, s) for s in shapes.values())
    return total, largest, len(groups)


def copy_checkpoint(src: Path, dst: Path) -> dict:
    """Wall and CPU seconds (user + system: the kernel's copying counts) of a plain copy."""
    t0, c0 = time.perf_counter(), time.process_time()
    dst.mkdir()
    for file in sorted(src.iterdir()):
        shutil.copyfile(file, dst / file.name)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0}


CHILD = """
import json, resource, sys, time
import convert_weights
argv = json.loads(sys.argv[1])
seconds = cpu = None
if argv:
    t0, c0 = time.perf_counter(), time.process_time()
    assert convert_weights.main(argv) == 0
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "cpu": cpu, "maxrss_kb": maxrss, "hwm_kb": hwm}))
"""


def run_child(argv: list) -> dict:
    """Conversion in a fresh process: its own time (after imports) and peak RSS. Linux
    carries ru_maxrss across fork + exec, so the child's figure is at least the parent's
    RSS at the fork; VmHWM is the new process image's own peak."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    command = [sys.executable, "-c", CHILD, json.dumps(argv)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"conversion failed:\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = time.perf_counter() - t0
    return result


def evict(path: Path) -> None:
    """Drop a checkpoint's pages from the page cache, so that reads reach the disk."""
    for file in path.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def io_counters() -> dict:
    with open("/proc/self/io") as f:
        return {k: int(v) for k, v in (line.split(": ") for line in f)}


def _load_worker(path: str):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from llama import Transformer, load_model
    from llama.weights.format import read_model_args
    from parallel.layers import local_tensor

    import llama.weights.safetensors_io

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    with torch.device("meta"):  # warm-up: the modules DTensor imports lazily are read now, not counted below
        Transformer(read_model_args(path), mesh)
    dist.barrier()
    tensor_bytes, real_preadv = [0], os.preadv

    def counting_preadv(fd, buffers, offset):
        n = real_preadv(fd, buffers, offset)
        tensor_bytes[0] += n
        return n

    llama.weights.safetensors_io.os.preadv = counting_preadv
    before = io_counters()
    t0 = time.perf_counter()
    model = load_model(path, tp_mesh=mesh, dtype=torch.bfloat16)
    seconds = time.perf_counter() - t0
    after = io_counters()
    llama.weights.safetensors_io.os.preadv = real_preadv
    shard = sum(local_tensor(p).numel() * p.dtype.itemsize for p in model.parameters())
    return {
        "rchar": after["rchar"] - before["rchar"],
        "read_bytes": after["read_bytes"] - before["read_bytes"],
        "shard": shard,
        "tensor_bytes": tensor_bytes[0],
        "seconds": seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=9, help="transformer blocks (9: about 2.2 GB)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each of copy, HF -> ours, ours -> HF")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--make", metavar="DIR", help=argparse.SUPPRESS)  # internal: write the checkpoint and exit
    opts = parser.parse_args()
    args = ModelArgs(dim=2048, n_layers=opts.layers, n_heads=16, n_kv_heads=8, vocab_size=128256,
                     ffn_hidden_size=8192, rope_theta=500000.0, max_seq_len=8192)
    if opts.make:
        print(json.dumps(make_hf_checkpoint(Path(opts.make), args)))
        return
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir="/tmp"))
    try:
        # written by a child process, so that this one stays small: its children inherit
        # its RSS in ru_maxrss
        t0 = time.perf_counter()
        made = subprocess.run([sys.executable, __file__, "--layers", str(opts.layers), "--make", str(root / "hf")],
                              capture_output=True, text=True, check=True)
        total, largest, n_files = json.loads(made.stdout)
        print(f"synthetic HF checkpoint: {total / 1e9:.2f} GB bf16 in {n_files} shards, largest tensor "
              f"{largest / 1e6:.0f} MB (written in {time.perf_counter() - t0:.0f} s) under {root}")

        def fresh(out: str) -> Path:
            shutil.rmtree(root / out, ignore_errors=True)
            os.sync()
            return root / out

        copies, to_ours, copies_ours, to_hf = [], [], [], []
        for _ in range(opts.runs):
            copies.append(copy_checkpoint(root / "hf", fresh("copy")))
            to_ours.append(run_child([str(root / "hf"), str(fresh("ours")), "--quiet"]))
            copies_ours.append(copy_checkpoint(root / "ours", fresh("copy")))
            to_hf.append(run_child(["--to-hf", str(root / "ours"), str(fresh("back")), "--quiet"]))
            os.sync()
        fresh("copy")
        idle = run_child([])

        # the machine is shared: wall times vary run to run, so report the best and the
        # median, and CPU time (user + system), which contention affects much less
        rows = [("copy HF files", copies, copies), ("HF -> ours", to_ours, copies),
                ("copy ours", copies_ours, copies_ours), ("ours -> HF", to_hf, copies_ours)]
        for label, runs, baseline in rows:
            best, mid = min(r["seconds"] for r in runs), median(r["seconds"] for r in runs)
            cpu = median(r["cpu"] for r in runs)
            copy_best, copy_cpu = min(r["seconds"] for r in baseline), median(r["cpu"] for r in baseline)
            walls = ", ".join(f"{r['seconds']:.2f}" for r in runs)
            print(f"{label:<14} best {best:5.2f} s ({total / 1e6 / best:4.0f} MB/s), median {mid:5.2f} s, "
                  f"CPU {cpu:5.2f} s; "
                  f"vs a copy of its input: best {copy_best / best:.2f}, CPU {copy_cpu / cpu:.2f}   (runs: {walls} s)")
        process_walls = ", ".join(f"{r['wall']:.1f}" for r in to_ours)
        print(f"(HF -> ours as a whole process, interpreter start and imports included: {process_walls} s)")
        hwm = max(r["hwm_kb"] for r in to_ours + to_hf) * 1024
        maxrss = max(r["maxrss_kb"] for r in to_ours + to_hf) * 1024
        goal = 2 * largest + 0.5e9
        print(f"peak RSS of a conversion: VmHWM {hwm / 1e9:.2f} GB, ru_maxrss {maxrss / 1e9:.2f} GB "
              f"(the same process importing only: {idle['hwm_kb'] * 1024 / 1e9:.2f} / "
              f"{idle['maxrss_kb'] * 1024 / 1e9:.2f} GB); "
              f"goal <= 2 x {largest / 1e9:.2f} + 0.5 = {goal / 1e9:.2f} GB")
        same = all((root / "back" / f.name).read_bytes() == f.read_bytes() for f in (root / "hf").iterdir())
        print(f"HF -> ours -> HF: every file byte-identical: {same}")

        os.sync()
        evict(root / "ours")
        ranks = run_on_ranks(_load_worker, 4, str(root / "ours"))
        print("load_model on 4 ranks at tp 4, bf16, page cache evicted first:")
        for rank, r in enumerate(ranks):
            shard = r["shard"]
            print(
                f"  rank {rank}: shard {shard / 1e6:6.1f} MB; tensor bytes read {r['tensor_bytes'] / shard:.3f}x, "
                f"rchar {r['rchar'] / shard:.3f}x, read_bytes {r['read_bytes'] / shard:.3f}x; {r['seconds']:.1f} s"
            )
    finally:
        if opts.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
