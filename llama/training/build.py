"""What a run is built from: the mesh (with the default tp), the device and its settings,
the model and tokenizer read and checked against the flags, and the trainee (the model
sharded over the mesh, or this rank's pipeline stages)."""

import os
import sys
from typing import Optional

import torch

from llama.config import ModelArgs
from llama.lora import LoRAConfig
from llama.tokenizer import load_tokenizer
from llama.weights.format import read_model_args
from parallel.devices import enable_tf32
from parallel.fsdp import STRATEGIES, build_parallel_model
from parallel.mesh import (
    build_mesh, cp_mesh, cuda_device_for_rank, default_tp, gpus_per_node, local_device, pp_mesh,
    warn_if_tp_crosses_nodes)
from parallel.pipeline import PipelineConfig, build_pipeline
from parallel.plan.config import StepConfig
from parallel.plan.layout import Layout
from parallel.plan.planner import choose_tp

from .step import Trainee


def make_mesh(opts):
    # --tp unset (make_mesh without choose_default_tp): parallel.mesh.default_tp
    return build_mesh(opts.tp, opts.dp_replicate, hybrid=STRATEGIES[opts.strategy].hybrid, cp=opts.cp, pp=opts.pp)


def prepare_device(opts, mesh) -> torch.device:
    """This rank's device, with the run's settings: the default --dtype, the seed, TF32
    matmuls on CUDA, host memory kept between steps on CPU."""
    device = local_device()
    opts.dtype = opts.dtype or default_dtype(device)
    torch.manual_seed(opts.seed)
    if device.type == "cpu":
        keep_freed_host_memory()
    if device.type == "cuda":
        enable_tf32()
        warn_if_tp_crosses_nodes(mesh["tp"].size(), gpus_per_node())
    return device


def read_model_and_tokenizer(opts) -> tuple:
    """(ModelArgs, tokenizer), checked against --seq-len and each other before any work."""
    args = read_model_args(opts.checkpoint) if opts.checkpoint else ModelArgs.from_preset(opts.preset)
    if opts.seq_len > args.max_seq_len:
        raise ValueError(f"--seq-len {opts.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    tokenizer = load_tokenizer(opts.tokenizer)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"--tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {args.vocab_size}")
    return args, tokenizer


def choose_default_tp(opts) -> Optional[str]:
    """--tp not given: on GPUs the planner's choice from the model and this GPU's memory
    (parallel.plan.choose_tp), on CPU parallel.mesh.default_tp. Sets opts.tp and returns the
    line saying why. Before the process group exists: the planner builds a fake one."""
    if opts.tp is not None:
        return None
    world, cut = int(os.environ.get("WORLD_SIZE", 1)), opts.cp * opts.pp
    if not torch.cuda.is_available():
        opts.tp = default_tp(world // cut if world % cut == 0 else world)
        return f"--tp {opts.tp}: on CPU 2 when it divides the ranks, so that the demo runs both dimensions"
    try:
        args = read_model_args(opts.checkpoint) if opts.checkpoint else ModelArgs.from_preset(opts.preset)
        gpu_memory = torch.cuda.get_device_properties(cuda_device_for_rank()).total_memory / 2**30
        layout = Layout(pp=opts.pp, cp=opts.cp, pipeline=PipelineConfig.from_options(opts))
        opts.tp, reason = choose_tp(args, world, gpus_per_node(), gpu_memory, StepConfig.from_options(opts), layout,
                                    opts.strategy, opts.dp_replicate)
    except ValueError:
        return None  # train() meets the same error and reports it in one line; tp is the GPUs of a node till then
    return reason


def build_trainee(source, mesh, opts, init: bool) -> Trainee:
    """init=False (a resume): the shards are allocated, not drawn or read, as the checkpoint
    fills them; except under LoRA, whose checkpoints hold the adapters only, so the base is
    read (or drawn) as for a fresh run."""
    lora = LoRAConfig.from_options(opts)
    options = dict(
        strategy=opts.strategy,
        sequence_parallel=opts.sequence_parallel,
        mixed_precision="bf16" if opts.dtype == "bf16" else None,
        activation_checkpointing=opts.activation_checkpointing,
        compile=opts.compile,
        seed=opts.seed,
        init=init or lora is not None,
        lora=lora,
        base_dtype=getattr(opts, "base_dtype", None),
    )
    if pp_mesh(mesh) is None:
        return Trainee(build_parallel_model(source, mesh, **options), cp=cp_mesh(mesh))
    pipeline = build_pipeline(source, mesh, PipelineConfig.from_options(opts), **options)
    return Trainee(pipeline.model, pipeline, cp=cp_mesh(mesh))


def default_dtype(device: torch.device) -> str:
    """bf16 where tensor cores and fused attention want it, fp32 on CPU."""
    return "bf16" if device.type == "cuda" else "fp32"


def keep_freed_host_memory() -> None:
    """CPU training: keep freed memory in the process for the next step's tensors instead
    of handing it back to the kernel. glibc maps large blocks (logits, activations) afresh
    on every allocation and unmaps them on free, so each step pays the page faults and
    zeroing of every large tensor again: about 3% of the 2x2 benchmark's CPU time
    (bench/bench_step.py). Sets glibc's malloc knobs at run time (Linux only; elsewhere,
    or where set by MALLOC_* environment variables, nothing changes)."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux" or any(k.startswith("MALLOC_") for k in os.environ):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    mallopt(M_MMAP_THRESHOLD, 32 << 20)  # glibc's largest: blocks below 32 MiB come from the heap
    mallopt(M_TRIM_THRESHOLD, 16 << 30)  # never shrink the heap between steps
    mallopt(M_TOP_PAD, 1 << 30)  # grow it in 1 GiB steps
