"""Safetensors files read and written without the safetensors library's mmap.

  - a rank loading its shard reads the bytes of that shard with pread: a row shard
    exactly, a column shard in bands of whole rows (a few large reads rather than one
    per row; see BAND_BYTES), so the bytes read per rank can be counted and the
    kernel's mmap read-around never decides what is read;
  - a converter writes the header first (every shape and dtype is known from the
    source's headers) and then the tensors one by one, so a checkpoint of any size
    streams through memory one tensor at a time.
The byte layout follows the safetensors spec exactly (8-byte little-endian header
length, compact JSON header padded with spaces to 8 bytes, tensors back to back), so
the files are byte-identical to those `safetensors.torch.save_file` writes.
"""

import itertools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit


# ---------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors file: where its bytes lie in the file."""

    dtype: torch.dtype
    shape: tuple
    start: int  # absolute file offset of the first byte
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class SafetensorsHeader:
    file: Path
    metadata: dict  # the "__metadata__" strings, e.g. {"format": "pt"}
    data_start: int  # 8 + header length: where the first tensor's bytes begin
    tensors: dict = field(default_factory=dict)  # name -> TensorInfo, in file order


def nbytes_of(dtype: torch.dtype, shape) -> int:
    return math.prod(shape) * dtype.itemsize


def read_header(file) -> SafetensorsHeader:
    """Parse and check a safetensors header against the file's size, so that a truncated
    or corrupt file is refused here, with its name, before any tensor is read."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{file}: truncated: {size} bytes is too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ValueError(
                    f"{file}: corrupt or truncated: the header claims {n} bytes, the file has {size}; "
                    "not a complete safetensors file"
                )
            raw = f.read(n)
    except OSError as err:
        raise ValueError(f"{file}: cannot read: {err.strerror or err}") from None
    try:
        entries = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: corrupt safetensors header (not JSON: {err})") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{file}: corrupt safetensors header (not a JSON object)")
    metadata = entries.pop("__metadata__", None) or {}
    data_start = 8 + n
    header = SafetensorsHeader(file, metadata, data_start)
    for name, entry in sorted(entries.items(), key=lambda item: _begin(item[1])):
        header.tensors[name] = _tensor_info(file, name, entry, data_start)
    _check_contiguous(header, data_start, size)
    return header


def _begin(entry) -> tuple:
    try:
        return int(entry["data_offsets"][0]), int(entry["data_offsets"][1])
    except (TypeError, KeyError, IndexError, ValueError):
        return -1, -1  # reported by _tensor_info


def _tensor_info(file: Path, name: str, entry, data_start: int) -> TensorInfo:
    try:
        dtype = DTYPES[entry["dtype"]]
        shape = tuple(int(d) for d in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (TypeError, KeyError, ValueError):
        raise ValueError(f"{file}: corrupt safetensors header: tensor {name}: bad entry {entry!r}") from None
    if any(d < 0 for d in shape) or end - begin != nbytes_of(dtype, shape):
        raise ValueError(
            f"{file}: corrupt safetensors header: tensor {name} {list(shape)} {entry['dtype']} "
            f"does not fit its byte range [{begin}, {end})"
        )
    return TensorInfo(dtype, shape, data_start + begin, data_start + end)


def _check_contiguous(header: SafetensorsHeader, data_start: int, size: int) -> None:
    offset = data_start
    for name, info in header.tensors.items():
        if info.start != offset:
            raise ValueError(
                f"{header.file}: corrupt safetensors header: tensor {name} does not start where the previous one ends"
            )
        offset = info.end
    if offset != size:
        what = "truncated" if offset > size else "corrupt"
        raise ValueError(
            f"{header.file}: {what}: the header describes {offset - data_start} bytes of tensors, "
            f"the file holds {size - data_start}"
        )


# ---------------------------------------------------------------- reading


def read_tensor(file, info: TensorInfo) -> torch.Tensor:
    """A whole tensor, read into fresh memory (no mmap)."""
    out = torch.empty(info.shape, dtype=info.dtype)
    with open(file, "rb", buffering=0) as f:
        _pread_into(f.fileno(), tensor_bytes(out), info.start, file)
    return out


# A read call costs a round trip: 1-2 us from the page cache, 0.1-1 ms on the network
# filesystems (Lustre, NFS, GPFS) that 405B checkpoints usually live on, time in which
# 1 MiB moves at 1-10 GB/s. So a hole of up to MAX_HOLE_BYTES between two runs of a block
# is read through and thrown away rather than paid for with another call, in reads of at
# most BAND_BYTES (the scratch buffer's size). A row shard is one run and reads exactly its
# bytes. A column shard (wo, w2 under tp) has a hole of (tp - 1) / tp of a row between its
# runs (at 405B, tp 8, bf16: 28 KiB for wo, 91 KiB for w2), so it is read in bands of whole
# rows: 27 reads instead of 16,384 for a 405B w2, but tp times the shard's bytes copied out
# of the page cache. Storage itself serves no more than before: the tp ranks of a node read
# the same rows, and the per-row reads of all of them touched every page of those rows too.
# MAX_HOLE_BYTES = 0 gives exact per-run reads (one call per row of a column shard).
BAND_BYTES = 64 << 20
MAX_HOLE_BYTES = 1 << 20


def read_block_(dst: torch.Tensor, fd: int, info: TensorInfo, index: tuple, file,
                scratch: Optional[memoryview] = None) -> None:
    """Copy the block `index` (one slice per dim) of a tensor stored at `info` into
    `dst`: a run that stands alone is read straight into place, runs with small holes
    between them are read as one band into `scratch` (a buffer of BAND_BYTES, reused
    across calls; allocated here if not given) and copied out."""
    shape = tuple(s.stop - s.start for s in index)
    if tuple(dst.shape) != shape:
        raise ValueError(f"{file}: block {shape} does not fit the destination {tuple(dst.shape)}")
    direct = dst.dtype == info.dtype and dst.is_contiguous() and dst.device.type == "cpu"
    buf = dst if direct else torch.empty(shape, dtype=info.dtype)
    view = tensor_bytes(buf)
    reads = _reads(_runs(info, index), MAX_HOLE_BYTES, BAND_BYTES)
    if len(reads) > 1 and hasattr(os, "posix_fadvise"):
        # announce them all first, so that storage with a long round trip (network
        # filesystems) is asked for them together rather than one by one
        for start, length, _ in reads:
            os.posix_fadvise(fd, start, length, os.POSIX_FADV_WILLNEED)
    offset = 0
    for start, length, runs in reads:
        if len(runs) == 1:
            _pread_into(fd, view[offset : offset + length], start, file)
            offset += length
            continue
        if scratch is None or len(scratch) < length:
            scratch = tensor_bytes(torch.empty(length, dtype=torch.uint8))
        _pread_into(fd, scratch[:length], start, file)
        for run_start, run_length in runs:
            view[offset : offset + run_length] = scratch[run_start - start : run_start - start + run_length]
            offset += run_length
    if not direct:
        dst.copy_(buf)


def _reads(runs, max_hole: int, band: int) -> list:
    """Group runs (file offset, length) into reads (offset, length, runs): a run joins the
    read before it while the hole between them is at most `max_hole` bytes and the read
    stays within `band` bytes."""
    reads = []
    for start, length in runs:
        if reads:
            first, _, group = reads[-1]
            last_start, last_length = group[-1]
            end = start + length
            if start - (last_start + last_length) <= max_hole and end - first <= band:
                reads[-1] = (first, end - first, group)
                group.append((start, length))
                continue
        reads.append((start, length, [(start, length)]))
    return reads


def _runs(info: TensorInfo, index: tuple):
    """(file offset, length) of each contiguous run of a block of a C-order tensor, in
    order. The block is contiguous from the last dim that is cut onwards."""
    shape, item = info.shape, info.dtype.itemsize
    if not shape:
        yield info.start, item
        return
    cut = max((d for d, s in enumerate(index) if (s.start, s.stop) != (0, shape[d])), default=0)
    strides = [math.prod(shape[d + 1 :]) * item for d in range(len(shape))]
    length = (index[cut].stop - index[cut].start) * strides[cut]
    if length == 0:
        return
    for outer in itertools.product(*(range(s.start, s.stop) for s in index[:cut])):
        offset = sum(i * stride for i, stride in zip(outer, strides)) + index[cut].start * strides[cut]
        yield info.start + offset, length


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The memory of a contiguous CPU tensor as bytes, without a copy (writable)."""
    if t.numel() == 0:
        return memoryview(bytearray(0))
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _pread_into(fd: int, view: memoryview, offset: int, file) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise ValueError(f"{file}: truncated: ended at byte {offset + done} while reading a tensor")
        done += n


# ---------------------------------------------------------------- writing


def header_bytes(tensors: list, metadata: Optional[dict] = None, size: Optional[int] = None) -> bytes:
    """The header for (name, dtype, shape) triples written back to back in this order:
    compact JSON, metadata first, padded with spaces to a multiple of 8, as safetensors
    itself writes it; or padded to `size` bytes in all (the spec allows any amount of
    trailing spaces), to keep another file's tensor offsets."""
    entries = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dtype, shape in tensors:
        n = nbytes_of(dtype, shape)
        entries[name] = {"dtype": DTYPE_CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    if size is not None:
        if 8 + len(text) > size:
            raise ValueError(f"a header of {8 + len(text)} bytes does not fit in {size}")
        text += b" " * (size - 8 - len(text))
    return struct.pack("<Q", len(text)) + text


class SafetensorsWriter:
    """Writes a safetensors file whose tensor list is known up front: the header first,
    then each tensor's bytes in order, from memory (`write`) or straight from another
    file (`copy`, kernel-side when the OS allows). Checks every byte count.

        with SafetensorsWriter(file, [(name, dtype, shape), ...], {"format": "pt"}) as w:
            w.write(name, tensor)  # in the listed order
    """

    def __init__(self, file, tensors: list, metadata: Optional[dict] = None):
        self.file = Path(file)
        self.pending = list(tensors)  # (name, dtype, shape) still to write
        self.f = open(self.file, "wb", buffering=0)
        self._write_all(header_bytes(tensors, metadata))

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.close()
        else:
            self.f.close()

    def _next(self, name: str) -> int:
        if not self.pending or self.pending[0][0] != name:
            expected = self.pending[0][0] if self.pending else "nothing"
            raise RuntimeError(f"{self.file}: writing {name}, expected {expected}")
        _, dtype, shape = self.pending.pop(0)
        return nbytes_of(dtype, shape)

    def write(self, name: str, tensor: torch.Tensor) -> int:
        n = self._next(name)
        view = tensor_bytes(tensor.contiguous())
        if len(view) != n:
            raise RuntimeError(f"{self.file}: tensor {name} has {len(view)} bytes, its header entry says {n}")
        self._write_all(view)
        return n

    def copy(self, name: str, src, start: int, end: int) -> int:
        n = self._next(name)
        if end - start != n:
            raise RuntimeError(f"{self.file}: tensor {name} has {end - start} bytes, its header entry says {n}")
        with open(src, "rb", buffering=0) as s:
            _copy_range(s, self.f, start, n, src)
        return n

    def close(self) -> None:
        if self.pending:
            first = self.pending[0][0]
            raise RuntimeError(f"{self.file}: closed with {len(self.pending)} tensors unwritten, first {first}")
        self.f.close()

    def _write_all(self, data) -> None:
        view = memoryview(data)
        while view:
            view = view[self.f.write(view) :]


def copy_file(src, dst) -> None:
    """A whole-file copy by the kernel: a reflink on copy-on-write filesystems (btrfs, XFS),
    else the fastest in-kernel copy; plain shutil elsewhere."""
    import shutil

    with open(src, "rb", buffering=0) as s, open(dst, "wb", buffering=0) as d:
        try:
            while os.copy_file_range(s.fileno(), d.fileno(), 1 << 30):
                pass
            return
        except (AttributeError, OSError):
            d.truncate(0)
    shutil.copyfile(src, dst)


def _copy_range(src, dst, start: int, n: int, src_name) -> None:
    """n bytes from src at `start` to dst's current position: in the kernel with
    copy_file_range when possible, else through a reused 16 MB buffer."""
    done = 0
    try:
        while done < n:
            k = os.copy_file_range(src.fileno(), dst.fileno(), n - done, start + done)
            if k == 0:
                raise ValueError(f"{src_name}: truncated: ended at byte {start + done} while copying a tensor")
            done += k
        return
    except (AttributeError, OSError):
        pass  # no copy_file_range here (other OS, filesystems that refuse it): copy by hand
    buf = memoryview(bytearray(min(n - done, 16 << 20) or 1))
    while done < n:
        k = os.preadv(src.fileno(), [buf[: min(len(buf), n - done)]], start + done)
        if k == 0:
            raise ValueError(f"{src_name}: truncated: ended at byte {start + done} while copying a tensor")
        view = buf[:k]
        while view:
            view = view[dst.write(view) :]
        done += k
