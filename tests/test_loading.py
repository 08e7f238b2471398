"""Reading a rank's block of a tensor from a safetensors file (the read path of
llama/weights/safetensors_io.py).

A block is read exactly, however the reads are grouped: a row shard is one read of its
own bytes; a column shard, whose runs (one per row) have holes of the other ranks'
columns between them, is read in bands of whole rows of at most BAND_BYTES, or one read
per row when MAX_HOLE_BYTES is 0. The files are written with safetensors' own writer.
Reads are counted by wrapping os.preadv, as tests/test_convert_load.py does."""

import math
import os
import random

import pytest
import torch
from safetensors.torch import save_file

import llama.weights.safetensors_io as safetensors_io
from llama.weights.safetensors_io import TensorInfo, read_block_, read_header
from parallel.spawn import run_on_ranks

# 405B, tp 8, bf16: w2 is [dim, ffn] split by columns (Shard(1)), as is wo [dim, dim]
DIM, FFN, TP = 16384, 53248, 8


@pytest.fixture
def stored(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"matrix": torch.randn(96, 40, generator=g), "cube": torch.randn(6, 5, 7, generator=g).bfloat16(),
               "vector": torch.randn(13, generator=g)}
    file = tmp_path / "t.safetensors"
    save_file(tensors, str(file))
    fd = os.open(file, os.O_RDONLY)
    yield tensors, file, read_header(file), fd
    os.close(fd)


@pytest.fixture
def limits(monkeypatch):
    def set_limits(max_hole, band):
        monkeypatch.setattr(safetensors_io, "MAX_HOLE_BYTES", max_hole)
        monkeypatch.setattr(safetensors_io, "BAND_BYTES", band)
    return set_limits


@pytest.fixture
def reads(monkeypatch):
    """[(offset, bytes)] of every pread of the test."""
    log, real = [], os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        log.append((offset, n))
        return n

    monkeypatch.setattr(os, "preadv", counting)
    return log


def read(stored, name, index, dtype=None):
    tensors, file, header, fd = stored
    dst = torch.empty(tuple(s.stop - s.start for s in index), dtype=dtype or tensors[name].dtype)
    read_block_(dst, fd, header.tensors[name], index, file)
    return dst


def column_shard(shape, rank, tp):
    cols = shape[1] // tp
    return (slice(0, shape[0]), slice(rank * cols, (rank + 1) * cols))


@pytest.mark.parametrize("max_hole, band", [(0, 1 << 20), (1 << 20, 64 << 20), (100, 600), (1 << 20, 64), (10**9, 10**9)])
def test_any_block_is_read_exactly_whatever_the_hole_and_band_limits(stored, limits, max_hole, band):
    limits(max_hole, band)
    rng = random.Random(max_hole + band)
    tensors = stored[0]
    for name, t in tensors.items():
        for _ in range(40):
            index = []
            for n in t.shape:
                start = rng.randrange(n)
                index.append(slice(start, rng.randrange(start, n) + 1))
            index = tuple(index)
            assert torch.equal(read(stored, name, index), t[index]), (name, index)
            assert torch.equal(read(stored, name, index, torch.float64), t[index].double()), (name, index)


def test_a_row_shard_is_one_read_of_exactly_its_bytes(stored, reads):
    tensors, _, header, _ = stored
    index = (slice(24, 48), slice(0, 40))
    assert torch.equal(read(stored, "matrix", index), tensors["matrix"][index])
    assert reads == [(header.tensors["matrix"].start + 24 * 40 * 4, 24 * 40 * 4)]


def test_a_column_shard_is_read_as_one_band_of_whole_rows(stored, reads):
    tensors, _, header, _ = stored
    index = column_shard((96, 40), rank=1, tp=4)
    assert torch.equal(read(stored, "matrix", index), tensors["matrix"][index])
    row, run = 40 * 4, 10 * 4
    # from the first row's columns to the last row's: the holes between, not around them
    assert reads == [(header.tensors["matrix"].start + run, 95 * row + run)]


def test_without_holes_a_column_shard_reads_exactly_its_bytes_one_row_at_a_time(stored, limits, reads):
    limits(max_hole=0, band=64 << 20)
    tensors = stored[0]
    index = column_shard((96, 40), rank=3, tp=4)
    assert torch.equal(read(stored, "matrix", index), tensors["matrix"][index])
    assert len(reads) == 96 and sum(n for _, n in reads) == 96 * 10 * 4


def test_bands_stay_within_the_band_size(stored, limits, reads):
    limits(max_hole=1 << 20, band=1000)  # 7 runs of 40 bytes, 160 apart, span 6 * 160 + 40 = 1000
    tensors = stored[0]
    index = column_shard((96, 40), rank=2, tp=4)
    assert torch.equal(read(stored, "matrix", index), tensors["matrix"][index])
    assert len(reads) == math.ceil(96 / 7) and all(n <= 1000 for _, n in reads)


def plan(shape, index, max_hole=None, band=None):
    """The reads the loader would make for `index` of a bf16 tensor, without a file."""
    info = TensorInfo(torch.bfloat16, shape, 0, math.prod(shape) * 2)
    max_hole = safetensors_io.MAX_HOLE_BYTES if max_hole is None else max_hole
    band = safetensors_io.BAND_BYTES if band is None else band
    return safetensors_io._reads(safetensors_io._runs(info, index), max_hole, band)


@pytest.mark.parametrize("name, shape", [("w2", (DIM, FFN)), ("wo", (DIM, DIM))])
def test_a_405b_column_shard_at_tp8_takes_tens_of_reads_not_one_per_row(name, shape):
    index = column_shard(shape, rank=3, tp=TP)
    per_row = plan(shape, index, max_hole=0)
    bands = plan(shape, index)
    assert len(per_row) == DIM
    row, run = shape[1] * 2, shape[1] // TP * 2
    rows_per_band = (safetensors_io.BAND_BYTES - run) // row + 1  # a band spans k - 1 rows and a run
    assert len(bands) == math.ceil(DIM / rows_per_band) <= 30  # w2: 26, wo: 8
    assert all(length <= safetensors_io.BAND_BYTES for _, length, _ in bands)
    assert [r for _, _, runs in bands for r in runs] == [(start, n) for start, n, _ in per_row]  # same runs
    # whole rows: tp times the shard, less the holes before the first run and after the last
    shard = DIM * shape[1] // TP * 2
    assert sum(length for _, length, _ in bands) <= TP * shard


def test_a_405b_row_shard_at_tp8_is_one_read():
    index = (slice(3 * FFN // TP, 4 * FFN // TP), slice(0, DIM))  # w1
    assert plan((FFN, DIM), index) == [(3 * FFN // TP * DIM * 2, FFN // TP * DIM * 2, [(3 * FFN // TP * DIM * 2, FFN // TP * DIM * 2)])]


# ---------------------------------------------------------------- DCP training checkpoints


def _bytes_read_per_dcp_load():
    """Each rank's stored bytes that FileSystemReader read (the chunks its load plan asked
    for) in load_model of a DCP checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader

    log, real = [], FileSystemReader.read_data

    def counting(self, plan, planner):
        log.extend(self.storage_data[item.storage_index].length for item in plan.items)
        return real(self, plan, planner)

    FileSystemReader.read_data = counting
    return log, lambda: setattr(FileSystemReader, "read_data", real)


def _load_a_tp2_training_checkpoint(directory: str, args) -> dict:
    """Write a training checkpoint from a tp 2 model (DCP, "model.<name>" keys, as train.py
    does), then load it with load_model on tp 2 and count the bytes each rank reads."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from llama import Transformer, load_model
    from llama.weights.format import write_model_args

    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    with torch.device("meta"):
        trained = Transformer(args, mesh)
    trained.init_weights(seed=5)
    dcp.save({"model": dict(trained.named_parameters())}, checkpoint_id=directory)
    if dist.get_rank() == 0:
        write_model_args(args, directory)
    dist.barrier()

    log, restore = _bytes_read_per_dcp_load()
    try:
        model = load_model(directory, tp_mesh=mesh)
    finally:
        restore()
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens).full_tensor()
    sharded = {
        name: not all(p.is_replicate() for p in param.placements)
        for name, param in model.named_parameters() if isinstance(param, DTensor)
    }
    return {"read": sum(log), "logits": logits.numpy(), "sharded": sharded}


def test_a_dcp_checkpoint_loads_on_tp2_with_each_rank_reading_its_half(tmp_path):
    """load_model of a training checkpoint (a DCP directory) written at tp 2 and loaded at
    tp 2: each rank reads the stored chunks of its own shards, half of every sharded tensor
    (and the replicated norms whole), not all of it; the logits are one device's."""
    from torch.distributed.checkpoint import FileSystemReader

    from llama import ModelArgs, Transformer, load_model

    args = ModelArgs(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32, max_seq_len=32)
    directory = str(tmp_path / "step_00000001")
    results = run_on_ranks(_load_a_tp2_training_checkpoint, 2, directory, args)

    metadata = FileSystemReader(directory).read_metadata()
    stored = {}  # tensor key -> bytes of its stored chunks
    for index, info in metadata.storage_data.items():
        stored[index.fqn] = stored.get(index.fqn, 0) + info.length
    sharded = results[0]["sharded"]
    sharded_bytes = sum(n for key, n in stored.items() if sharded[key.removeprefix("model.")])
    replicated_bytes = sum(stored.values()) - sharded_bytes
    for rank, result in enumerate(results):
        half = sharded_bytes / 2 + replicated_bytes
        assert abs(result["read"] - half) <= 0.01 * half, (
            f"rank {rank} read {result['read']} bytes; its half is {half:.0f} of {sum(stored.values())}")

    # one device: the same values, initialised without a mesh, and the checkpoint loaded whole
    tokens = torch.randint(0, args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = Transformer(args).init_weights(seed=5)(tokens)
        whole = load_model(directory)(tokens)
    torch.testing.assert_close(whole, want, rtol=0, atol=1e-5)
    for result in results:
        torch.testing.assert_close(torch.from_numpy(result["logits"]), want, rtol=0, atol=1e-5)
