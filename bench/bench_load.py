"""Benchmark the loader's reads on one 405B-shaped transformer layer at tp 8: per rank, the
bytes its preads return and the number of read calls, before (one read per run: a column
shard is one read per row) and after (runs with small holes between them read as bands of
whole rows, llama.weights.safetensors_io.MAX_HOLE_BYTES / BAND_BYTES). Prints figures, not
pass/fail.

The model is built on the meta device on a fake process group of 8 ranks (one rank at a
time, in this process), so only the layer's file is real: ONE layer's tensors in bf16
(dim 16384, ffn 53248, 128 heads, 8 kv heads: 3.19G parameters, 6.4 GB), written to a
temporary directory and deleted at the end. Every element holds a pattern of its (row,
column), so the first and last ranks' shards are checked exactly after each read. The page
cache is warm (the file was just written), so the times are copy and syscall costs; on a
network filesystem each call is a round trip of 0.1-1 ms on top.

  PYTHONPATH=. python bench/bench_load.py [--scale 4] [--tp 8] [--dir /tmp]

--scale k divides dim and the FFN width by k (heads unchanged), for small disks: the
call counts of the per-row reads shrink by k, the band reads' bytes by k**2.
"""

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import llama.weights.safetensors_io as safetensors_io  # noqa: E402
from llama import ModelArgs  # noqa: E402
from llama.model import Transformer  # noqa: E402
from parallel.layers import local_slices  # noqa: E402

PRESET_405B = dict(dim=16384, n_heads=128, n_kv_heads=8, ffn_hidden_size=53248, vocab_size=128256)


def layer_args(scale: int) -> ModelArgs:
    if PRESET_405B["dim"] % (scale * PRESET_405B["n_heads"]):
        raise SystemExit(f"--scale {scale}: dim {PRESET_405B['dim']} / scale must stay a multiple of 128 heads")
    return ModelArgs(**{**PRESET_405B, "dim": PRESET_405B["dim"] // scale,
                        "ffn_hidden_size": PRESET_405B["ffn_hidden_size"] // scale}, n_layers=1)


def pattern(index: tuple) -> torch.Tensor:
    """The bf16 bit patterns the file holds at `index`: a hash of (row, column) in int16, so
    that a shard read from the wrong place, or shifted by a column, does not match."""
    rows = torch.arange(index[0].start, index[0].stop, dtype=torch.int32)
    if len(index) == 1:
        return (rows * 7919 % 32749).to(torch.int16)
    cols = torch.arange(index[1].start, index[1].stop, dtype=torch.int32)
    return ((rows[:, None] * 7919 + cols[None, :] * 104729) % 32749).to(torch.int16)


def write_layer(file: Path, shapes: dict) -> None:
    """The layer's tensors in the project's format, a band of rows at a time."""
    specs = [(name, torch.bfloat16, shape) for name, shape in shapes.items()]
    with open(file, "wb", buffering=0) as f:
        f.write(safetensors_io.header_bytes(specs, {"format": "pt"}))
        for name, shape in shapes.items():
            step = max(1, (64 << 20) // (2 * math.prod(shape[1:])))
            for r in range(0, shape[0], step):
                index = (slice(r, min(r + step, shape[0])),) + tuple(slice(0, n) for n in shape[1:])
                view = memoryview(pattern(index).numpy()).cast("B")
                while view:
                    view = view[f.write(view):]


def rank_blocks(args: ModelArgs, tp: int, rank: int) -> dict:
    """name -> this rank's index of each layer tensor, from the model built on a fake
    process group (as the loader computes them)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=tp)
    try:
        mesh = init_device_mesh("cpu", (tp,), mesh_dim_names=("tp",))
        with torch.device("meta"):
            model = Transformer(args, mesh)
        return {name: local_slices(p) for name, p in model.named_parameters() if name.startswith("layers.0.")}
    finally:
        dist.destroy_process_group()


class CountReads:
    """Counts the calls to os.preadv and the bytes they return, as tests/test_convert.py does."""

    def __enter__(self):
        self.calls = self.bytes = 0
        self.real = os.preadv

        def counting(fd, buffers, offset):
            n = self.real(fd, buffers, offset)
            self.calls += 1
            self.bytes += n
            return n

        os.preadv = counting
        return self

    def __exit__(self, *exc):
        os.preadv = self.real


def load_rank(file: Path, header, blocks: dict, max_hole: int, check: bool) -> dict:
    safetensors_io.MAX_HOLE_BYTES = max_hole
    scratch = safetensors_io.tensor_bytes(torch.empty(safetensors_io.BAND_BYTES, dtype=torch.uint8))
    fd = os.open(file, os.O_RDONLY)
    per_tensor, shard = {}, 0
    try:
        for name, index in blocks.items():
            info = header.tensors[name]
            dst = torch.empty(tuple(s.stop - s.start for s in index), dtype=torch.bfloat16)
            start = time.perf_counter()
            with CountReads() as reads:
                safetensors_io.read_block_(dst, fd, info, index, file, scratch)
            seconds = time.perf_counter() - start
            if check and not torch.equal(dst.view(torch.int16), pattern(index)):
                raise SystemExit(f"{name}: the shard read (max_hole {max_hole}) differs from the file")
            per_tensor[name] = (reads.calls, reads.bytes, dst.numel() * 2, seconds)
            shard += dst.numel() * 2
            del dst
    finally:
        os.close(fd)
    return per_tensor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=1, help="divide dim and the FFN width by this (default: 1, the true 405B layer)")
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--dir", default=None, help="where to write the layer's file (default: the system temp dir)")
    opts = p.parse_args()

    args = layer_args(opts.scale)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(args).named_parameters() if n.startswith("layers.0.")}
    size = sum(math.prod(s) * 2 for s in shapes.values())
    base = Path(opts.dir or tempfile.gettempdir())
    free = shutil.disk_usage(base).free
    if free < size + (4 << 30):
        raise SystemExit(f"{base}: {free / 2**30:.1f} GiB free, the layer needs {size / 2**30:.1f} GiB + 4 GiB "
                         f"to spare; pass --scale 4 or a --dir with more space")
    print(f"one layer: dim {args.dim}, ffn {args.ffn_hidden_dim}, heads {args.n_heads}/{args.n_kv_heads}, "
          f"bf16, {size / 1e9:.2f} GB; tp {opts.tp}; band {safetensors_io.BAND_BYTES >> 20} MiB, "
          f"max hole {safetensors_io.MAX_HOLE_BYTES >> 10} KiB")

    tmp = Path(tempfile.mkdtemp(prefix="bench_load_", dir=base))
    try:
        file = tmp / "layer.safetensors"
        start = time.perf_counter()
        write_layer(file, shapes)
        print(f"wrote {file} in {time.perf_counter() - start:.1f}s")
        header = safetensors_io.read_header(file)
        max_hole = safetensors_io.MAX_HOLE_BYTES
        totals = []
        for rank in range(opts.tp):
            blocks = rank_blocks(args, opts.tp, rank)
            check = rank in (0, opts.tp - 1)  # the first and last shards, against the file's pattern
            before = load_rank(file, header, blocks, max_hole=0, check=check)
            after = load_rank(file, header, blocks, max_hole=max_hole, check=check)
            totals.append((before, after))
            if rank == 0:
                print("\nrank 0 per tensor        shard MiB | before: calls    MiB read     s | after: calls    MiB read     s")
                for name in blocks:
                    (c0, b0, shard, s0), (c1, b1, _, s1) = before[name], after[name]
                    print(f"  {name.removeprefix('layers.0.'):22s} {shard / 2**20:9.1f} | {c0:13,d} {b0 / 2**20:11.1f} {s0:5.2f} "
                          f"| {c1:12,d} {b1 / 2**20:11.1f} {s1:5.2f}")
        print("\nper rank      shard MiB | before: calls    MiB read     s | after: calls    MiB read  x shard     s")
        for rank, (before, after) in enumerate(totals):
            shard = sum(v[2] for v in before.values())
            c0, b0, s0 = (sum(v[i] for v in before.values()) for i in (0, 1, 3))
            c1, b1, s1 = (sum(v[i] for v in after.values()) for i in (0, 1, 3))
            print(f"  rank {rank}  {shard / 2**20:11.1f} | {c0:13,d} {b0 / 2**20:11.1f} {s0:5.2f} "
                  f"| {c1:12,d} {b1 / 2**20:11.1f} {b1 / shard:8.2f} {s1:5.2f}")
    finally:
        safetensors_io.MAX_HOLE_BYTES = max_hole
        shutil.rmtree(tmp, ignore_errors=True)
        print(f"removed {tmp}")


if __name__ == "__main__":
    main()
