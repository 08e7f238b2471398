"""What a plan is asked about: the training step (`StepConfig`, with train.py's defaults)
and the hardware of the step-time estimate (`Hardware`, with the sources of its
constants)."""

import argparse
from dataclasses import dataclass
from typing import Optional

from llama.lora import TARGETS, LoRAConfig

# The step-time estimate's hardware: H100 SXM nodes of 8 GPUs, the cluster of the Llama 3
# paper. Assumptions, not fitted to any training run:
# NVIDIA's H100 SXM datasheet: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity)
PEAK_TFLOPS = 989.0
# The fraction of that peak the step's kernels are assumed to sustain: 794.5 TFLOP/s, the
# best bf16 matmul Stas Bekman's Maximum Achievable Matmul FLOPS finder measured on an H100
# SXM (ml-engineering, compute/accelerator, torch 2.7): a ceiling, which attention and
# the memory-bound kernels (norms, SwiGLU, RoPE, loss) stay below
COMPUTE_EFFICIENCY = 0.80
# NVLink 4 inside a node: 900 GB/s per GPU, both directions together. A ring step sends and
# receives at once, so the bytes a rank sends move at half of it
NVLINK_BYTES_PER_S = 450e9
# Between nodes: one 400 Gb/s NIC per GPU (InfiniBand or RoCE), 50 GB/s each way
NETWORK_BYTES_PER_S = 50e9


# train.py's defaults, which the planner plans unless told otherwise (bf16: train.py's
# default on CUDA). tests/test_plan.py holds the two equal.
DEFAULTS = dict(
    seq_len=256, batch=4, grad_accum=1, strategy="full", sequence_parallel=True, mixed_precision="bf16",
    activation_checkpointing="none", document_masking=True, lora_rank=0, lora_targets=TARGETS, lora_dropout=0.0,
)
# --base-dtype: how the frozen base of a LoRA run is stored. Unset: as build_parallel_model
# stores it, in the compute dtype (bf16 under bf16 mixed precision, fp32 in fp32 runs)
BASE_DTYPES = ("nf4",)


@dataclass(frozen=True)
class StepConfig:
    seq_len: int = DEFAULTS["seq_len"]
    batch: int = DEFAULTS["batch"]  # sequences per dp rank per micro-step
    grad_accum: int = DEFAULTS["grad_accum"]
    sequence_parallel: bool = DEFAULTS["sequence_parallel"]
    mixed_precision: str = DEFAULTS["mixed_precision"]
    activation_checkpointing: str = DEFAULTS["activation_checkpointing"]
    # on CUDA: flex attention with a block mask; off: SDPA's flash kernel, causal only
    document_masking: bool = DEFAULTS["document_masking"]
    # LoRA (llama/lora.py): 0 trains every parameter; else adapters of this rank on these
    # projections train and the base is frozen. (alpha and rsLoRA change no byte or FLOP.)
    lora_rank: int = DEFAULTS["lora_rank"]
    lora_targets: tuple = DEFAULTS["lora_targets"]
    lora_dropout: float = DEFAULTS["lora_dropout"]
    base_dtype: Optional[str] = None  # None or one of BASE_DTYPES ("nf4": QLoRA)

    def __post_init__(self):
        if self.base_dtype is not None and self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"--base-dtype {self.base_dtype}: choose one of {', '.join(BASE_DTYPES)}, or leave it "
                             "unset for the compute dtype")
        if self.base_dtype is not None and not self.lora_rank:
            raise ValueError(f"--base-dtype {self.base_dtype} stores a frozen base: it needs --lora-rank R (QLoRA)")
        self.lora  # checks the rank, the dropout and the targets, with LoRAConfig's messages

    @property
    def compute_bytes(self) -> int:
        return 2 if self.mixed_precision == "bf16" else 4

    @property
    def lora(self) -> Optional[LoRAConfig]:
        """The adapters build_parallel_model adds; None without --lora-rank."""
        if not self.lora_rank:
            return None
        return LoRAConfig(self.lora_rank, dropout=self.lora_dropout, targets=tuple(self.lora_targets))

    @classmethod
    def from_options(cls, opts: argparse.Namespace) -> "StepConfig":
        """What train.py's flags run on a GPU (bf16 unless --dtype says otherwise), with its
        --lora-* flags, and --base-dtype nf4 where train.py has that flag (QLoRA); any other
        base dtype plans the base as build_parallel_model stores it. Under --objective dpo
        --micro-batch counts pairs, two sequences each."""
        lora = LoRAConfig.from_options(opts)
        base_dtype = getattr(opts, "base_dtype", None)
        # --objective dpo: a micro-batch of P pairs is one forward of 2P sequences
        sequences = opts.micro_batch * (2 if getattr(opts, "objective", None) == "dpo" else 1)
        return cls(opts.seq_len, sequences, opts.grad_accum, opts.sequence_parallel, opts.dtype or "bf16",
                   opts.activation_checkpointing, opts.document_masking,
                   lora_rank=lora.rank if lora else 0, lora_targets=lora.targets if lora else TARGETS,
                   lora_dropout=lora.dropout if lora else 0.0, base_dtype=base_dtype if base_dtype in BASE_DTYPES else None)


@dataclass(frozen=True)
class Hardware:
    """What the step-time estimate assumes; see the constants for the sources."""

    peak_tflops: float = PEAK_TFLOPS
    compute_efficiency: float = COMPUTE_EFFICIENCY
    gpus_per_node: int = 8
    nvlink_bytes_per_s: float = NVLINK_BYTES_PER_S
    network_bytes_per_s: float = NETWORK_BYTES_PER_S

    def bandwidth(self, span: int) -> float:
        """Bytes per second a rank sends in a group whose ranks lie within `span`
        consecutive ranks: NVLink when that fits in a node, else the network."""
        inside = span <= self.gpus_per_node and self.gpus_per_node % span == 0
        return self.nvlink_bytes_per_s if inside else self.network_bytes_per_s
