"""Train Llama 3 with tensor parallelism inside a node and FSDP2 across nodes.

    torchrun --nproc_per_node 4 train.py                      # debug model, 2x2 mesh, CPU demo
    torchrun --nnodes N --nproc_per_node 8 train.py --checkpoint CONVERTED --data DIR \\
        --tokenizer tokenizer.model --tp 8 --seq-len 8192 --micro-batch 1 --steps 1000

With no arguments it trains the `debug` preset from random weights on Python's own
standard-library sources with a byte tokenizer: nothing to download. Every log step
prints one line and appends one JSON object to SAVE_DIR/metrics.jsonl. Checkpoints
are torch.distributed.checkpoint directories, written atomically, and resume on any
mesh (`--resume`)."""

import argparse
import datetime
import math
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from llama.config import PRESETS, ModelArgs
from llama.chat import (
    DATA_FORMATS, TRAIN_ON, ChatDataset, is_chat_data, load_conversation_cache, open_conversation_cache)
from llama.data import (
    Batch, DistributedDataLoader, PackedDataset, default_corpus_paths, eval_batches, load_token_cache, open_token_cache,
    split_documents)
from llama.metrics import MemorySnapshot, MetricsLog, StepProfiler, drop_metrics_after, log_line, parse_step_range
from llama.run_config import parse_with_config, write_config
from llama.tokenizer import load_tokenizer
from llama.weights import read_model_args
from parallel.checkpoint import (
    CheckpointError, Checkpointer, checkpoint_name, decide_resume, fault_injection, load_checkpoint)
from parallel.control import control_group, rank0_first
from parallel.devices import enable_tf32, measure_machine_peak, sum_over_ranks, table_peak
from parallel.context import check_cp_divides, check_sequence_parallel_divides, split_for_cp
from parallel.fsdp import STRATEGIES, build_parallel_model
from parallel.layers import vocab_parallel_cross_entropy
from parallel.mesh import (
    batch_mesh, build_mesh, cp_mesh, cuda_device_for_rank, default_tp, dp_rank, dp_size, exit_without_teardown,
    gpus_per_node, init_distributed, local_device, pp_mesh, warn_if_tp_crosses_nodes)
from parallel.pipeline import Pipeline, PipelineConfig, add_pipeline_arguments, build_pipeline, check_pipeline
from parallel.plan.config import StepConfig
from parallel.plan.layout import Layout
from parallel.plan.planner import choose_tp
from parallel.preemption import PREEMPTED_EXIT_CODE, StopRequests, parse_signals, parse_time_limit
from parallel.train_utils import clip_grad_norm_, sum_over_batch

NONFINITE_EXIT_CODE = 4  # --max-skips consecutive non-finite steps; the newest checkpoint predates them
DATA_PREP_TIMEOUT = datetime.timedelta(hours=24)  # how long ranks wait for rank 0 to tokenize


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="TOML file of flags (keys are flag names, e.g. seq-len = 2048); "
                                    "the command line overrides it (default: none)")
    a = p.add_argument_group("model")
    a.add_argument("--checkpoint", help="converted checkpoint directory (convert_weights.py) to start from (default: random init)")
    a.add_argument("--preset", default="debug", help=f"random-init model when no --checkpoint: {', '.join(PRESETS)} (default: %(default)s)")
    a = p.add_argument_group("data")
    a.add_argument("--data", nargs="*", help="text / .jsonl files or directories (default: Python's stdlib sources)")
    a.add_argument("--data-format", default="auto", choices=DATA_FORMATS,
                   help=".jsonl format: chat messages, alpaca, prompt-completion or text (default: detected per file)")
    a.add_argument("--train-on", default="assistant", choices=TRAIN_ON,
                   help="chat data: which tokens the loss applies to (default: %(default)s: every assistant turn)")
    a.add_argument("--skip-bad-lines", action="store_true", help="count and report bad .jsonl lines instead of stopping (default: stop)")
    a.add_argument("--document-masking", action=argparse.BooleanOptionalAction, default=True,
                   help="text data: attend only within each document, RoPE positions restart per document "
                        "(default: on; chat data is always masked per conversation)")
    a.add_argument("--tokenizer", default="bytes", help="tokenizer.model (Llama 3 or 2) or 'bytes' (default: %(default)s)")
    a.add_argument("--cache-dir", help="token cache directory (default: .token_cache next to the data)")
    a = p.add_argument_group("validation")
    a.add_argument("--val-data", nargs="*", help="held-out files or directories, read like --data (default: none)")
    a.add_argument("--val-fraction", type=float, help="hold out this fraction of the --data documents, chosen by --seed (default: none)")
    a.add_argument("--eval-every", type=int, default=50, help="steps between validation losses; also before step 1 and at the end (default: %(default)s)")
    a.add_argument("--eval-batches", type=int, default=4, help="global batches in the fixed validation set (default: %(default)s)")
    a = p.add_argument_group("parallelism")
    a.add_argument("--tp", type=int, help="tensor-parallel size (default: on GPUs the smallest whose plan fits the GPU's memory, "
                                          "FSDP sharding the rest, see parallel.plan.choose_tp; on CPU 2 if it divides the world)")
    a.add_argument("--strategy", default="full", choices=STRATEGIES,
                   help="FSDP sharding strategy across dp; with --pp, full runs as grad_op and hybrid as hybrid_zero2, "
                        "keeping each stage gathered through the step (default: %(default)s)")
    a.add_argument("--dp-replicate", type=int, default=1, help="hybrid strategies: number of replica groups (default: %(default)s)")
    a.add_argument("--sequence-parallel", action=argparse.BooleanOptionalAction, default=True,
                   help="split activations along the sequence between blocks when tp > 1 (default: on)")
    a.add_argument("--cp", type=int, default=1,
                   help="context-parallel size: each sequence is split over this many ranks, which all-gather "
                        "keys and values (default: %(default)s)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages (default: %(default)s)")
    add_pipeline_arguments(a)
    a.add_argument("--activation-checkpointing", default="none", choices=("none", "full", "selective"),
                   help="recompute activations in backward: every block, or every other one (default: %(default)s)")
    a.add_argument("--compile", action="store_true", help="torch.compile each transformer block (default: off)")
    a.add_argument("--dtype", choices=("fp32", "bf16"),
                   help="bf16: bf16 compute, fp32 master weights and reduce; fp32 uses TF32 matmuls on CUDA "
                        "(default: bf16 on CUDA, fp32 on CPU)")
    a = p.add_argument_group("batch")
    a.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    a.add_argument("--micro-batch", type=int, default=4,
                   help="sequences per dp rank per micro-step; with --pp, per pipeline micro-batch (default: %(default)s)")
    a.add_argument("--global-batch", type=int, help="sequences per optimizer step; overrides --micro-batch "
                                                   "(default: micro-batch x dp x grad-accum, x pp-microbatches with --pp)")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default: %(default)s)")
    a = p.add_argument_group("optimisation")
    a.add_argument("--steps", type=int, default=150, help="optimizer steps of the whole run, which set the schedule (default: %(default)s)")
    a.add_argument("--stop-after", type=int, help="end this job after so many steps, with a checkpoint (default: run to --steps)")
    a.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (default: %(default)s)")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="floor of the decay, as a fraction of --lr (default: %(default)s)")
    a.add_argument("--warmup", type=int, default=10, help="linear warm-up steps (default: %(default)s)")
    a.add_argument("--decay", default="cosine", choices=("cosine", "linear", "constant"), help="learning-rate decay after warm-up (default: %(default)s)")
    a.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (default: %(default)s)")
    a.add_argument("--decay-norms-and-embeddings", action="store_true", help="apply weight decay to them too (default: off)")
    a.add_argument("--clip", type=float, default=1.0, help="max global grad norm, 0 for none (default: %(default)s)")
    a.add_argument("--seed", type=int, default=0, help="seed of the random init, the data order and the validation split (default: %(default)s)")
    a = p.add_argument_group("checkpoints and logging")
    a.add_argument("--save-dir", default="runs/default", help="checkpoints and metrics.jsonl (default: %(default)s)")
    a.add_argument("--save-every", type=int, default=50, help="steps between checkpoints, 0 for only at the end (default: %(default)s)")
    a.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep (default: %(default)s)")
    a.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-dir (default: off)")
    a.add_argument("--log-every", type=int, default=10, help="steps between log lines; step 1 and the last step always log (default: %(default)s)")
    a.add_argument("--async-checkpoint", action="store_true",
                   help="copy the shards to CPU memory and write them in the background while training goes on (default: off)")
    a.add_argument("--max-skips", type=int, default=10,
                   help="stop after this many consecutive steps with a non-finite loss or grad norm, whose updates "
                        "are skipped (default: %(default)s)")
    a.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table on GPU, measured on CPU)")
    a.add_argument("--tensorboard", action="store_true", help="also write the logged scalars to SAVE_DIR/tensorboard (default: off)")
    a.add_argument("--profile-steps", metavar="A:B", help="write a torch profiler trace of steps A to B to SAVE_DIR/profile (default: none)")
    a.add_argument("--memory-snapshot", action="store_true",
                   help="CUDA: write the allocator history of the first 3 steps to SAVE_DIR/memory_snapshot_rankR.pickle (default: off)")
    a = p.add_argument_group("cluster")
    a.add_argument("--save-on-signal", default="SIGTERM,SIGUSR1",
                   help=f"on these signals, save at the next step boundary and exit with code {PREEMPTED_EXIT_CODE}; "
                        "'none' to leave signals alone (default: %(default)s)")
    a.add_argument("--time-limit", metavar="HH:MM",
                   help=f"wall-clock budget of this job: save and exit with code {PREEMPTED_EXIT_CODE} while the last step "
                        "and save still fit (default: none)")
    a.add_argument("--comm-timeout", type=float, default=30,
                   help="minutes a collective may wait before the job fails (default: %(default)s)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    opts = parse_with_config(parser, argv)
    if opts.val_data and opts.val_fraction:
        parser.error("--val-data and --val-fraction both choose the validation set; give one")
    return opts


# ---------------------------------------------------------------- learning rate


def lr_at(step: int, opts) -> float:
    """Linear warm-up, then cosine or linear decay to min_lr_ratio * lr at the last step."""
    if step < opts.warmup:
        return opts.lr * (step + 1) / opts.warmup
    floor = opts.lr * opts.min_lr_ratio
    progress = (step - opts.warmup) / max(1, opts.steps - opts.warmup)
    if opts.decay == "constant":
        return opts.lr
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if opts.decay == "cosine" else 1 - progress
    return floor + (opts.lr - floor) * shape


def param_groups(model, opts) -> list:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        exempt = name.endswith("norm.weight") or name.startswith("tok_embeddings")
        (no_decay if exempt and not opts.decay_norms_and_embeddings else decay).append(param)
    return [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ---------------------------------------------------------------- one step


@dataclass
class Trainee:
    """What the loop trains. `model` is the Transformer, or this rank's pipeline stages as
    one module (parallel.pipeline.RankStages: what the optimizer, clipping and checkpoints
    take) run by `pipeline`; `cp` is the mesh that splits each sequence (None: no context
    parallelism)."""

    model: torch.nn.Module
    pipeline: Optional[Pipeline] = None
    cp: object = None

    def split(self, batch: Batch) -> Batch:
        """This cp rank's part of every sequence (the loader gives whole sequences)."""
        if self.cp is None:
            return batch
        return Batch(*(None if t is None else split_for_cp(t, self.cp) for t in batch))

    def loss_share(self, batch: Batch, step_targets: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns its summed token losses over
        `step_targets` (0 on pipeline ranks without the last stage)."""
        batch = self.split(batch)
        if self.pipeline is not None:
            return self.pipeline.step(batch.inputs, batch.targets, batch.document_ids, step_targets)
        logits = self.model(batch.inputs, document_ids=batch.document_ids)
        loss = vocab_parallel_cross_entropy(logits, batch.targets, reduction="sum") / step_targets
        loss.backward()
        return loss.detach()

    @torch.no_grad()
    def loss_sum(self, batch: Batch) -> tuple:
        """(summed token losses, targets counted) of a batch, forward only, on this rank's
        part of it; both 0 on pipeline ranks without the last stage."""
        batch = self.split(batch)
        if self.pipeline is not None:
            loss = self.pipeline.eval_loss_sum(batch.inputs, batch.targets, batch.document_ids)
            if not self.pipeline.last:
                return loss, 0
        else:
            logits = self.model(batch.inputs, document_ids=batch.document_ids)
            loss = vocab_parallel_cross_entropy(logits, batch.targets, reduction="sum")
        return loss, (batch.targets != -100).sum()


def train_step(trainee: Trainee, optimizer, loader: DistributedDataLoader, device, clip: float, poison: bool = False):
    """One optimizer step over the loader's next global batch. Returns this rank's share of
    the step's mean loss (the shares add up over pp, dp and cp ranks), the gradient norm,
    and whether the update was skipped for a non-finite gradient norm (1.0) or not (0.0),
    all as device tensors: nothing here waits for the device, so read them only on log
    steps. poison: tests make this rank's loss NaN."""
    loss_sum = torch.zeros((), device=device)
    # the targets that count in this step, over every dp rank and micro-step: each rank's
    # summed loss over them is its share of the step's mean, whatever the mesh
    step_targets = max(loader.step_target_tokens(), 1)
    if poison:  # every loss this rank computes, and so every gradient, becomes NaN
        step_targets = float("nan")
    batch = to_device(next(loader), device)
    for micro in range(loader.grad_accum):
        # one batch of prefetch: the host builds and queues the next micro-batch while the
        # device runs this forward. Not across steps, so that the loader's position at a
        # step boundary (checkpoints, step_target_tokens) is exact; the host runs ahead
        # into the next step anyway, as a step that does not log never waits for the device.
        last = micro + 1 == loader.grad_accum
        upcoming = None if last else to_device(next(loader), device)
        loss_sum += trainee.loss_share(batch, step_targets)
        batch = upcoming
    grad_norm = clip_grad_norm_(trainee.model, clip if clip > 0 else None)
    # A non-finite loss on any rank makes the global grad norm non-finite on every rank, so
    # all ranks skip alike. The fused AdamW skips on the device (found_inf, as under
    # GradScaler), without a sync; another optimizer has to read the flag.
    skipped = (~torch.isfinite(grad_norm)).to(torch.float32)
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = skipped
        optimizer.step()
    elif not skipped.item():
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, grad_norm, skipped


def to_device(batch: Batch, device) -> Batch:
    """The batch's tensors on `device`, copied without blocking the host: from pinned
    memory on CUDA (a copy from pageable memory makes the host wait for it)."""
    device = torch.device(device)

    def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if t is None or t.device == device:
            return t
        if device.type == "cuda":
            t = t.pin_memory()  # the caching host allocator keeps it alive until the copy ends
        return t.to(device, non_blocking=True)

    return Batch(*(move(t) for t in batch))


def build_optimizer(model, opts, device) -> torch.optim.Optimizer:
    """AdamW with one kernel per step (fused) on CUDA, whose step counters live on the
    device, and on CPU, where it is about 5x faster than foreach (bench/bench_step.py's
    model: 6 against 35 ms a step). Elsewhere foreach, whose step counters live in host
    memory: it reads them with .item(), a host read, never a device sync."""
    fused = torch.device(device).type in ("cuda", "cpu")
    return torch.optim.AdamW(
        param_groups(model, opts), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused, foreach=not fused
    )


# ---------------------------------------------------------------- data and validation


@dataclass
class TrainingData:
    loader: DistributedDataLoader
    validation: list  # this rank's Batches of the fixed validation set; empty without one
    summary: list  # start-up lines about the data


def build_data(opts, tokenizer, mesh, global_batch: int, vocab_size: Optional[int] = None) -> TrainingData:
    """The training loader and the validation batches. Chat and instruction data are
    packed whole conversations per window; text is cut into stride windows."""
    sources = opts.data or default_corpus_paths()
    chat = is_chat_data(sources, opts.data_format)

    def load(paths):
        if chat:
            return load_conversation_cache(
                paths, tokenizer, opts.cache_dir, data_format=opts.data_format, train_on=opts.train_on,
                skip_bad_lines=opts.skip_bad_lines,
            )
        return load_token_cache(paths, tokenizer, opts.cache_dir)

    def reopen(path, paths):  # rank 0's cache, without hashing every source file again
        return open_conversation_cache(path, paths) if chat else open_token_cache(path, paths)

    def dataset(cache, documents=None):
        if chat:
            return ChatDataset(cache, opts.seq_len, seed=opts.seed, documents=documents)
        return PackedDataset(
            cache, opts.seq_len, seed=opts.seed, document_masking=opts.document_masking, documents=documents
        )

    def tokenize():
        return [load(paths).path if paths else None for paths in (sources, opts.val_data)]

    # Rank 0 tokenizes (or finds the cache) while the others wait on a gloo group with a
    # timeout of hours, not the collectives' (python -m llama.data prepare does it ahead
    # of time); then they open the cache it names.
    cache_path, val_cache_path = rank0_first(tokenize, DATA_PREP_TIMEOUT)
    cache = reopen(cache_path, sources)
    if vocab_size is not None:
        check_token_ids(cache.max_token_id, vocab_size, f"the token cache of {sources[0]}")
    train_docs = val_set = None
    if opts.val_fraction:
        train_docs, val_docs = split_documents(cache.num_docs, opts.val_fraction, opts.seed)
        val_set = dataset(cache, val_docs)
    elif opts.val_data:
        val_cache = reopen(val_cache_path, opts.val_data)
        if vocab_size is not None:
            check_token_ids(val_cache.max_token_id, vocab_size, f"the token cache of {opts.val_data[0]}")
        val_set = dataset(val_cache)
    train_set = dataset(cache, train_docs)
    loader = DistributedDataLoader(
        train_set, global_batch=global_batch, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=opts.grad_accum
    )
    validation = []
    if val_set is not None:
        validation = list(
            eval_batches(val_set, opts.eval_batches, global_batch, dp_rank(mesh), dp_size(mesh), loader.micro_batch)
        )
    summary = []
    for name, ds in (("train", train_set), ("validation", val_set)):
        if isinstance(ds, ChatDataset):
            summary.append(
                f"{name}: packed {ds.num_tokens:,} tokens into {ds.num_samples:,} windows of {opts.seq_len + 1}: "
                f"{100 * ds.packing_efficiency:.1f}% packing efficiency, {ds.num_truncated} conversations truncated"
            )
    if val_set is not None:
        samples = len(validation) * loader.micro_batch * dp_size(mesh)
        summary.append(f"validation: a fixed set of {samples} windows of {val_set.name}, evaluated every {opts.eval_every} steps")
    return TrainingData(loader, validation, summary)


def check_token_ids(max_token_id: int, vocab_size: int, what: str) -> None:
    """Once at start-up: the model's forward does not check id values (that would wait for
    the device every step). The caches record their largest id when they are built."""
    if max_token_id >= vocab_size:
        raise ValueError(
            f"{what} holds token id {max_token_id} but the model's vocabulary is {vocab_size}: "
            "use the --tokenizer the --checkpoint was trained with, or delete the stale cache (--cache-dir)"
        )


def evaluate(trainee: Trainee, batches: list, device, mesh) -> float:
    """Mean loss per target token over the fixed validation batches of every dp rank: the
    same on any mesh, as the set of samples does not depend on it."""
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # summed loss, targets
    for batch in (to_device(b, device) for b in batches):
        loss, targets = trainee.loss_sum(batch)
        totals[0] += loss.double()
        totals[1] += targets
    group = batch_mesh(mesh)
    if group.size() > 1:
        dist.all_reduce(totals, group=group.get_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def _log_validation(metrics: MetricsLog, step: int, val_loss: float, bar: bool = False) -> None:
    line = f"step {step:5d} | val loss {val_loss:.4f}"
    print(f"\r{line:<{_BAR_WIDTH}}" if bar else line, flush=True)
    metrics.write({"step": step, "val_loss": val_loss})


# ---------------------------------------------------------------- metrics


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


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


def make_mesh(opts):
    # --tp unset (make_mesh without choose_default_tp): parallel.mesh.default_tp
    return build_mesh(opts.tp, opts.dp_replicate, hybrid=STRATEGIES[opts.strategy].hybrid, cp=opts.cp, pp=opts.pp)


def batch_layout(opts, args: ModelArgs, dp: int) -> int:
    """The global batch, after checking the sequence and batch cuts that context and
    pipeline parallelism make, before any work: one line naming the flags. As in the
    planner, --micro-batch is the sequences of one forward: of one pipeline micro-batch
    under --pp, so that a dp rank runs micro-batch x --pp-microbatches sequences through
    the schedule per micro-step."""
    check_cp_divides(opts.seq_len, opts.cp)
    check_sequence_parallel_divides(opts.seq_len, opts.cp, opts.tp, opts.sequence_parallel)
    microbatches = check_pipeline(args, opts.pp, PipelineConfig.from_options(opts))
    global_batch = opts.global_batch or opts.micro_batch * microbatches * dp * opts.grad_accum
    rows = global_batch // (dp * opts.grad_accum)
    if opts.pp > 1 and rows % microbatches:
        raise ValueError(
            f"each dp rank's {rows} sequences per micro-step (--global-batch / (dp {dp} x --grad-accum "
            f"{opts.grad_accum})) must be divisible by --pp-microbatches {microbatches}: the pipeline cuts them "
            "into that many"
        )
    return global_batch


def build_trainee(source, mesh, opts, init: bool) -> Trainee:
    options = dict(
        strategy=opts.strategy,
        sequence_parallel=opts.sequence_parallel,
        mixed_precision="bf16" if opts.dtype == "bf16" else None,
        activation_checkpointing=opts.activation_checkpointing,
        compile=opts.compile,
        seed=opts.seed,
        init=init,
    )
    if pp_mesh(mesh) is None:
        return Trainee(build_parallel_model(source, mesh, **options), cp=cp_mesh(mesh))
    pipeline = build_pipeline(source, mesh, PipelineConfig.from_options(opts), **options)
    return Trainee(pipeline.model, pipeline, cp=cp_mesh(mesh))


# ---------------------------------------------------------------- main


def train(opts, parser: Optional[argparse.ArgumentParser] = None) -> int:
    """The run; returns the process's exit code: 0 when done, PREEMPTED_EXIT_CODE when
    stopped by a signal or the time limit, NONFINITE_EXIT_CODE after --max-skips."""
    mesh = make_mesh(opts)
    opts.tp = mesh["tp"].size()  # resolved, for SAVE_DIR/config.toml
    rank = dist.get_rank()
    device = local_device()
    control_group()  # every rank, before the first message on it
    stop = StopRequests(parse_signals(opts.save_on_signal), parse_time_limit(opts.time_limit))
    profile = StepProfiler(parse_step_range(opts.profile_steps), opts.save_dir, rank, device)
    opts.dtype = opts.dtype or default_dtype(device)
    torch.manual_seed(opts.seed)
    peak = opts.peak_tflops
    if device.type == "cpu":
        keep_freed_host_memory()
    if device.type == "cuda":
        enable_tf32()
        warn_if_tp_crosses_nodes(mesh["tp"].size(), gpus_per_node())
        if peak is None:
            peak = table_peak(opts.dtype)
    save_dir = Path(opts.save_dir)
    resume_from = decide_resume(save_dir, opts.resume)

    args = read_model_args(opts.checkpoint) if opts.checkpoint else ModelArgs.from_preset(opts.preset)
    if opts.seq_len > args.max_seq_len:
        raise ValueError(f"--seq-len {opts.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    tokenizer = load_tokenizer(opts.tokenizer)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"--tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {args.vocab_size}")
    global_batch = batch_layout(opts, args, dp_size(mesh))

    data = build_data(opts, tokenizer, mesh, global_batch, args.vocab_size)
    loader, validation = data.loader, data.validation

    # resuming: the checkpoint's weights replace whatever is there, so none are drawn or read
    trainee = build_trainee(opts.checkpoint or args, mesh, opts, init=resume_from is None)
    model = trainee.model
    optimizer = build_optimizer(model, opts, device)
    checkpoints = Checkpointer(save_dir, opts.keep, async_save=opts.async_checkpoint)

    step, skipped_before = 0, 0
    if resume_from is not None:
        trainer = load_checkpoint(resume_from, model, optimizer)
        loader.load_state_dict(trainer["data"])
        step, skipped_before = trainer["step"], trainer.get("skipped_steps", 0)
        checkpoints.last_saved = step
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}", flush=True)
            drop_metrics_after(save_dir / "metrics.jsonl", step)
    metrics = None
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        if parser is not None:
            write_config(opts, parser, save_dir / "config.toml")
        metrics = MetricsLog(save_dir, tensorboard=opts.tensorboard)
        print(
            f"model {opts.checkpoint or opts.preset}: {args.num_params():,} params | mesh "
            + " x ".join(f"{n} {s}" for n, s in zip(mesh.mesh_dim_names, mesh.mesh.shape))
            + f" | global batch {global_batch} x {opts.seq_len} tokens | {loader.dataset.num_samples} samples/epoch",
            flush=True,
        )
        for line in data.summary:
            print(line, flush=True)

    if peak is None and device.type == "cpu":
        peak_total = measure_machine_peak(device)
    else:
        peak_total = None if peak is None else sum_over_ranks(peak, device)
    world = dist.get_world_size()
    flops_per_token = args.training_flops_per_token(opts.seq_len)
    tokens_per_step = global_batch * opts.seq_len
    show_bar = rank == 0 and sys.stdout.isatty()
    last_step = opts.steps if opts.stop_after is None else min(opts.steps, step + opts.stop_after)
    memory_snapshot = MemorySnapshot(opts.memory_snapshot, save_dir, rank, device, at_step=min(step + 3, last_step))
    if validation and resume_from is None:  # the starting point of the validation curve
        val_loss = evaluate(trainee, validation, device, mesh)
        if rank == 0:
            _log_validation(metrics, step, val_loss)

    # kept on the device and read only where the loop reads anyway (log and save steps)
    skipped = torch.full((), float(skipped_before), device=device)  # steps whose update was skipped
    skips_in_row = torch.zeros((), device=device)
    last, window_start, window_steps = {}, time.perf_counter(), 0
    exit_code = 0
    while step < last_step:
        step_start = time.perf_counter()
        profile.before_step(step + 1)
        lr = lr_at(step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        poison = fault_injection("nan", step + 1, rank)
        loss_sum, grad_norm, skip = train_step(trainee, optimizer, loader, device, opts.clip, poison=poison)
        step += 1
        window_steps += 1
        skipped += skip
        skips_in_row = (skips_in_row + 1) * skip
        fault_injection("step", step, rank)
        profile.after_step(step)
        memory_snapshot.after_step(step)
        val_loss = None
        if validation and (step % opts.eval_every == 0 or step == last_step):
            eval_start = time.perf_counter()
            val_loss = evaluate(trainee, validation, device, mesh)
            window_start += time.perf_counter() - eval_start  # tokens/s counts training alone
        log_now = step % opts.log_every == 0 or step in (1, last_step)  # step 1 shows the starting loss
        save_now = (opts.save_every and step % opts.save_every == 0) or step == last_step

        if (log_now or save_now) and skips_in_row.item() >= opts.max_skips:
            exit_code = NONFINITE_EXIT_CODE
            break
        if log_now:
            loss_value = sum_over_batch(loss_sum.item(), mesh)  # the shares add up to the step's mean
            elapsed = time.perf_counter() - window_start
            tokens_per_s = tokens_per_step * window_steps / elapsed
            last = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / world,
                "mfu": None if peak_total is None else flops_per_token * tokens_per_s / (peak_total * 1e12),
                "memory_gb": memory_gb(device),
                "samples_seen": loader.sample,
                "skipped_steps": int(skipped.item()),
            }
            if val_loss is not None:
                last["val_loss"] = val_loss
            if rank == 0:
                line = log_line(last)
                print(f"\r{line:<{_BAR_WIDTH}}" if show_bar else line, flush=True)
                metrics.write(last)
            window_start, window_steps = time.perf_counter(), 0
        elif val_loss is not None and rank == 0:
            _log_validation(metrics, step, val_loss, bar=show_bar)
        if show_bar:
            print(f"\r{_progress_bar(step, last_step):<{_BAR_WIDTH}}", end="", flush=True)
        stop.observe(step_seconds=time.perf_counter() - step_start)
        if save_now:
            save_start = time.perf_counter()
            _save(checkpoints, step, model, optimizer, loader, opts, int(skipped.item()))
            stop.observe(save_seconds=time.perf_counter() - save_start)
            window_start += time.perf_counter() - save_start
        reason = stop.agreed(step, waits_anyway=log_now or save_now) if step < last_step else None
        if reason is not None:
            if checkpoints.newest_step != step:
                _save(checkpoints, step, model, optimizer, loader, opts, int(skipped.item()))
            exit_code = PREEMPTED_EXIT_CODE
            break
    checkpoints.close()  # the save in flight, if any, becomes visible
    if exit_code == PREEMPTED_EXIT_CODE and rank == 0:
        print(f"{chr(10) if show_bar else ''}preempted at step {step}: checkpoint saved to "
              f"{checkpoints.save_dir / checkpoint_name(step)} (stopped by {stop.received or reason}); "
              "continue with --resume", flush=True)
    elif exit_code == NONFINITE_EXIT_CODE and rank == 0:
        newest = "no checkpoint" if checkpoints.last_saved is None else f"the newest checkpoint, step {checkpoints.last_saved},"
        print(f"{chr(10) if show_bar else ''}stopped at step {step}: {opts.max_skips} consecutive steps had a non-finite loss or "
              f"grad norm and were skipped; {newest} is intact. Lower --lr, or check the data", file=sys.stderr, flush=True)
    elif show_bar:
        print(flush=True)
    if metrics is not None:
        metrics.close()
    return exit_code


def _save(checkpoints: Checkpointer, step: int, model, optimizer, loader, opts, skipped_steps: int) -> Path:
    trainer = {"data": loader.state_dict(), "args": vars(opts), "skipped_steps": skipped_steps}
    return checkpoints.save(step, model, optimizer, trainer)


_BAR_WIDTH = 100


def _progress_bar(step: int, total: int, width: int = 40) -> str:
    done = width * step // max(total, 1)
    return f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}"


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


def main(argv=None) -> int:
    opts = parse_args(argv)
    tp_reason = choose_default_tp(opts)
    init_distributed(timeout=datetime.timedelta(minutes=opts.comm_timeout))
    try:
        if tp_reason and dist.get_rank() == 0:
            print(tp_reason, flush=True)
        return train(opts, build_parser())
    except (ValueError, CheckpointError) as err:  # found by every rank alike (bad input, a failed save): one line
        if dist.get_rank() == 0:
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    exit_without_teardown(main())
