"""Dense peak TFLOP/s of the accelerators our users train on, for MFU.

The model is read from `torch.cuda.get_device_name()`, matched on whole words, so that
"H100 PCIe" and "H100 NVL" are not taken for the SXM part and "GH200" not for "H200".
An unknown device gives None: MFU is then logged as null and training carries on.

Numbers are the vendors' datasheet peaks without structured sparsity (datasheets print
the sparse figure, marked "*", beside or instead of the dense one; dense is half). bf16 is
the tensor-core rate with fp32 accumulation, tf32 the tensor-core rate for fp32 matmuls,
fp32 the plain (non-tensor) rate. Without a table entry (on CPU) the peak is measured,
every rank at once (`measure_machine_peak`)."""

import re
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Peak:
    bf16: float
    tf32: float
    fp32: float


# NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100), SXM / PCIe / NVL columns
H100_SXM = Peak(bf16=989.5, tf32=494.5, fp32=67.0)
H100_PCIE = Peak(bf16=756.5, tf32=378.0, fp32=51.0)
H100_NVL = Peak(bf16=835.5, tf32=417.5, fp32=60.0)  # per GPU (early sheets listed the pair)
# A100 datasheet (nvidia.com/en-us/data-center/a100): the same peaks for 40GB and 80GB, SXM and PCIe
A100 = Peak(bf16=312.0, tf32=156.0, fp32=19.5)

PEAKS = {
    "H100 SXM": H100_SXM,
    "H100 PCIe": H100_PCIE,
    "H100 NVL": H100_NVL,
    # H200 datasheet (nvidia.com/en-us/data-center/h200): the SXM part has H100 SXM's compute
    "H200": H100_SXM,
    "H200 NVL": H100_NVL,
    # H800 datasheet (export variant: H100 compute, reduced NVLink and FP64)
    "H800": H100_SXM,
    "H800 PCIe": H100_PCIE,
    # H20 (export variant): NVIDIA publishes no public datasheet; 148 dense bf16 / 74 tf32 /
    # 44 fp32 as given in NVIDIA's partner product briefs
    "H20": Peak(bf16=148.0, tf32=74.0, fp32=44.0),
    # GH200 Grace Hopper superchip datasheet: its Hopper GPU has H100 SXM's compute
    "GH200": H100_SXM,
    # HGX B200 datasheet (nvidia.com/en-us/data-center/hgx): 8-GPU figures 36 PF bf16* and
    # 18 PF tf32* (sparse), 600 TF fp32, divided by 8 and, for the tensor cores, by 2
    "B200": Peak(bf16=2250.0, tf32=1125.0, fp32=75.0),
    "A100 40GB": A100,
    "A100 80GB": A100,
    # A10 datasheet (nvidia.com/en-us/data-center/products/a10-gpu)
    "A10": Peak(bf16=125.0, tf32=62.5, fp32=31.2),
    # A10G (AWS G5 only): no NVIDIA datasheet; AWS quotes no per-GPU peak. These are the
    # commonly cited figures (fewer tensor-core FLOP/s than the A10): approximate
    "A10G": Peak(bf16=70.0, tf32=35.0, fp32=31.2),
    # L4 datasheet (nvidia.com/en-us/data-center/l4): 242* bf16, 120* tf32 (sparse)
    "L4": Peak(bf16=121.0, tf32=60.0, fp32=30.3),
    # L40S datasheet (nvidia.com/en-us/data-center/l40s)
    "L40S": Peak(bf16=362.05, tf32=183.0, fp32=91.6),
    # Ada Lovelace architecture whitepaper, appendix: GeForce parts run bf16 with fp32
    # accumulation at half the fp16-accumulate rate (165.2 dense, 330.3 sparse)
    "RTX 4090": Peak(bf16=165.2, tf32=82.6, fp32=82.6),
    # AMD Instinct MI300X data sheet (amd.com): 1307.4 bf16 and 653.7 tf32 dense matrix,
    # 163.4 fp32 (vector and matrix alike)
    "MI300X": Peak(bf16=1307.4, tf32=653.7, fp32=163.4),
}

# Device-name words -> table entry, most specific first: the first rule whose words are
# all in the name wins. "NVIDIA H100 80GB HBM3" is how the SXM part names itself.
RULES = [
    ({"h100", "pcie"}, "H100 PCIe"),
    ({"h100", "nvl"}, "H100 NVL"),
    ({"h100", "hbm3"}, "H100 SXM"),
    ({"h100", "sxm"}, "H100 SXM"),
    ({"h100", "sxm5"}, "H100 SXM"),
    ({"h200", "nvl"}, "H200 NVL"),
    ({"h200"}, "H200"),
    ({"h800", "pcie"}, "H800 PCIe"),
    ({"h800"}, "H800"),
    ({"h20"}, "H20"),
    ({"gh200"}, "GH200"),
    ({"b200"}, "B200"),
    ({"a100", "40gb"}, "A100 40GB"),
    ({"a100", "80gb"}, "A100 80GB"),
    ({"a10"}, "A10"),
    ({"a10g"}, "A10G"),
    ({"l4"}, "L4"),
    ({"l40s"}, "L40S"),
    ({"rtx", "4090"}, "RTX 4090"),
    ({"mi300x"}, "MI300X"),
]

DTYPES = ("bf16", "tf32", "fp32")


def device_model(device_name: str) -> Optional[str]:
    """The table entry for a device name, or None. A MIG slice has only part of the GPU's
    compute, so it gets None too rather than the whole GPU's peak."""
    words = set(re.findall(r"[a-z0-9]+", device_name.lower()))
    if "mig" in words:
        return None
    return next((model for needed, model in RULES if needed <= words), None)


def peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak TFLOP/s of one device for matmuls in `dtype` ("bf16", "tf32" or "fp32"),
    or None for a device not in the table."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES} for the peak TFLOP/s, got {dtype!r}")
    model = device_model(device_name)
    return None if model is None else getattr(PEAKS[model], dtype)


_warned: set = set()


def warn_unknown_device(device_name: str) -> None:
    """Warn once per process and name that MFU cannot be computed for this device."""
    if device_name in _warned:
        return
    _warned.add(device_name)
    warnings.warn(
        f"no peak TFLOP/s known for device {device_name!r}: MFU is logged as null; "
        "pass --peak-tflops to set it",
        stacklevel=2,
    )


# ---------------------------------------------------------------- the peak of this job


def measure_peak_tflops(device, seconds: float = 1.0) -> float:
    """fp32 matmul TFLOP/s of this process, measured while every rank measures too, so the
    ranks' sum is the machine's peak as this job can use it."""
    n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    dist.barrier()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def measure_machine_peak(device, probes: int = 3, seconds: float = 0.5) -> float:
    """The machine's fp32 matmul TFLOP/s as this job's ranks can use it together: the
    median of a few probes, each the ranks' sum while all of them measure. One probe can
    read low (start-up work elsewhere steals the cores for part of it) or high (the ranks'
    windows start unevenly, so one runs alone for a while); the median drops either."""
    return statistics.median(sum_over_ranks(measure_peak_tflops(device, seconds), device) for _ in range(probes))


def enable_tf32() -> None:
    """fp32 matmuls and convolutions on tensor cores (TF32: fp32 range, 10-bit mantissa,
    fp32 accumulation): several times the plain fp32 rate, and what table_peak assumes."""
    torch.set_float32_matmul_precision("high")  # sets torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = True


def table_peak(dtype: str) -> Optional[float]:
    """This GPU's dense peak for the run's matmuls; None (MFU logged as null) when unknown."""
    name = torch.cuda.get_device_name()
    if dtype == "fp32" and torch.backends.cuda.matmul.allow_tf32:
        dtype = "tf32"
    peak = peak_tflops(name, dtype)
    if peak is None:
        warn_unknown_device(name)
    return peak


def sum_over_ranks(value: float, device) -> float:
    """A per-rank number added up over every rank (one float64 all-reduce)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()
