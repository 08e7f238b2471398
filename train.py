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
import json
import math
import os
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from llama.config import PRESETS, ModelArgs
from llama.data import DistributedDataLoader, PackedDataset, default_corpus_paths, load_token_cache
from llama.tokenizer import load_tokenizer
from llama.weights import read_model_args, write_model_args
from parallel.fsdp import STRATEGIES, build_parallel_model
from parallel.layers import vocab_parallel_cross_entropy
from parallel.mesh import build_mesh, default_tp, device_type, dp_rank, dp_size, init_distributed, local_device
from parallel.train_utils import clip_grad_norm_, sum_over_dp

CHECKPOINT_PREFIX = "step_"
# dense peak TFLOP/s per device, for MFU; CPUs are measured at start-up instead
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp32": 67.0}, "A100": {"bf16": 312.0, "fp32": 19.5}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("model")
    a.add_argument("--checkpoint", help="converted checkpoint directory (convert_weights.py) to start from")
    a.add_argument("--preset", default="debug", help=f"random-init model when no --checkpoint: {', '.join(PRESETS)}")
    a = p.add_argument_group("data")
    a.add_argument("--data", nargs="*", help="text / .jsonl files or directories (default: Python's stdlib sources)")
    a.add_argument("--tokenizer", default="bytes", help="tokenizer.model (Llama 3 or 2) or 'bytes' (default)")
    a.add_argument("--cache-dir", help="token cache directory (default: next to the data)")
    a = p.add_argument_group("parallelism")
    a.add_argument("--tp", type=int, help="tensor-parallel size (default: GPUs per node; on CPU 2 if it divides the world)")
    a.add_argument("--strategy", default="full", choices=STRATEGIES, help="FSDP sharding strategy across dp")
    a.add_argument("--dp-replicate", type=int, default=1, help="hybrid strategies: number of replica groups")
    a.add_argument("--sequence-parallel", action="store_true", help="split activations along the sequence between blocks")
    a.add_argument("--activation-checkpointing", default="none", choices=("none", "full", "selective"))
    a.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    a.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="bf16: bf16 compute, fp32 master weights and reduce")
    a = p.add_argument_group("batch")
    a.add_argument("--seq-len", type=int, default=256)
    a.add_argument("--micro-batch", type=int, default=4, help="sequences per dp rank per micro-step")
    a.add_argument("--global-batch", type=int, help="sequences per optimizer step; overrides --micro-batch")
    a.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    a = p.add_argument_group("optimisation")
    a.add_argument("--steps", type=int, default=150, help="optimizer steps of the whole run (sets the schedule)")
    a.add_argument("--stop-after", type=int, help="end this job after so many steps, with a checkpoint (time-sliced jobs)")
    a.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    a.add_argument("--min-lr-ratio", type=float, default=0.1, help="floor of the decay, as a fraction of --lr")
    a.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    a.add_argument("--decay", default="cosine", choices=("cosine", "linear", "constant"))
    a.add_argument("--weight-decay", type=float, default=0.1)
    a.add_argument("--decay-norms-and-embeddings", action="store_true", help="apply weight decay to them too")
    a.add_argument("--clip", type=float, default=1.0, help="max global grad norm (0: off)")
    a.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("checkpoints and logging")
    a.add_argument("--save-dir", default="runs/default")
    a.add_argument("--save-every", type=int, default=50, help="steps between checkpoints (0: only at the end)")
    a.add_argument("--keep", type=int, default=2, help="complete checkpoints to keep")
    a.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --save-dir")
    a.add_argument("--log-every", type=int, default=10)
    a.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table on GPU, measured on CPU)")
    return p.parse_args(argv)


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


# ---------------------------------------------------------------- checkpoints


def _fault_injection(where: str, step: int, rank: int) -> None:
    """Tests kill one rank with SIGKILL at a chosen point: LLAMA_TP_FAULT="where:step:rank".
    Only the first attempt dies, so that torchrun's restart can finish the run."""
    spec = os.environ.get("LLAMA_TP_FAULT")
    if not spec or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    fault_where, fault_step, fault_rank = spec.split(":")
    if (fault_where, int(fault_step), int(fault_rank)) == (where, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def complete_checkpoints(save_dir: Path) -> list:
    """Finished checkpoint directories, oldest first; a directory is finished once
    trainer.json is in it, which is written last and renamed into place."""
    if not save_dir.is_dir():
        return []
    found = [d for d in save_dir.glob(f"{CHECKPOINT_PREFIX}*") if d.is_dir() and (d / "trainer.json").is_file()]
    return sorted(found, key=lambda d: int(d.name[len(CHECKPOINT_PREFIX):]))


def save_checkpoint(save_dir: Path, step: int, model, optimizer, loader, opts, rank: int) -> Path:
    """step_N/: the DCP shards, per-rank RNG, model_args.json (so that convert_weights.py
    --to-hf can export it), and trainer.json, written last."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = save_dir / f"{CHECKPOINT_PREFIX}{step:08d}"
    partial = save_dir / f".{final.name}.partial"
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(partial))
    torch.save({"torch": torch.get_rng_state()}, partial / f"rng_rank{rank}.pt")
    _fault_injection("save", step, rank)
    dist.barrier()
    if rank == 0:
        write_model_args(model.args, partial)
        trainer = {"step": step, "data": loader.state_dict(), "world_size": dist.get_world_size(), "args": vars(opts)}
        tmp = partial / "trainer.json.tmp"
        tmp.write_text(json.dumps(trainer, indent=1))
        os.replace(tmp, partial / "trainer.json")
        os.replace(partial, final)  # a crash before this line leaves the last checkpoint intact
        for old in complete_checkpoints(save_dir)[: -opts.keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: Path, model, optimizer, loader, rank: int) -> int:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    trainer = json.loads((path / "trainer.json").read_text())
    loader.load_state_dict(trainer["data"])
    rng = path / f"rng_rank{rank}.pt"
    if trainer["world_size"] == dist.get_world_size() and rng.is_file():
        torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return trainer["step"]


# ---------------------------------------------------------------- metrics


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


def memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def make_mesh(opts):
    world = dist.get_world_size()
    tp = opts.tp
    if tp is None:  # the embedded default is a 2x2 mesh on a CPU with 4 processes
        tp = default_tp() if device_type() == "cuda" else (2 if world % 2 == 0 else 1)
    return build_mesh(tp, opts.dp_replicate, hybrid=STRATEGIES[opts.strategy].hybrid)


def log_line(record: dict) -> str:
    return (
        f"step {record['step']:5d} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | grad norm {record['grad_norm']:.3f}"
        f" | {record['tokens_per_s']:.0f} tok/s ({record['tokens_per_s_per_device']:.0f}/device)"
        f" | MFU {100 * record['mfu']:.1f}% | mem {record['memory_gb']:.2f} GB"
    )


# ---------------------------------------------------------------- main


def train(opts) -> dict:
    mesh = make_mesh(opts)
    rank = dist.get_rank()
    device = local_device()
    torch.manual_seed(opts.seed)
    save_dir = Path(opts.save_dir)

    args = read_model_args(opts.checkpoint) if opts.checkpoint else ModelArgs.from_preset(opts.preset)
    if opts.seq_len > args.max_seq_len:
        raise ValueError(f"--seq-len {opts.seq_len} exceeds the model's max_seq_len {args.max_seq_len}")
    tokenizer = load_tokenizer(opts.tokenizer)
    if tokenizer.vocab_size > args.vocab_size:
        raise ValueError(f"--tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary is {args.vocab_size}")
    global_batch = opts.global_batch or opts.micro_batch * dp_size(mesh) * opts.grad_accum

    sources = opts.data or default_corpus_paths()
    if rank == 0:  # one rank tokenizes; the others read its cache
        load_token_cache(sources, tokenizer, opts.cache_dir)
    dist.barrier()
    cache = load_token_cache(sources, tokenizer, opts.cache_dir, quiet=True)
    dataset = PackedDataset(cache, opts.seq_len, seed=opts.seed)
    loader = DistributedDataLoader(
        dataset, global_batch=global_batch, dp_rank=dp_rank(mesh), dp_size=dp_size(mesh), grad_accum=opts.grad_accum
    )

    model = build_parallel_model(
        opts.checkpoint or args,
        mesh,
        strategy=opts.strategy,
        sequence_parallel=opts.sequence_parallel,
        mixed_precision="bf16" if opts.dtype == "bf16" else None,
        activation_checkpointing=opts.activation_checkpointing,
        compile=opts.compile,
        seed=opts.seed,
    )
    optimizer = torch.optim.AdamW(param_groups(model, opts), lr=opts.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)

    step = 0
    resume_from = complete_checkpoints(save_dir)[-1] if opts.resume and complete_checkpoints(save_dir) else None
    if resume_from is not None:
        step = load_checkpoint(resume_from, model, optimizer, loader, rank)
        if rank == 0:
            print(f"resumed from {resume_from} at step {step}", flush=True)
            _drop_metrics_after(save_dir / "metrics.jsonl", step)
    if rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"model {opts.checkpoint or opts.preset}: {args.num_params():,} params | mesh "
            + " x ".join(f"{n} {s}" for n, s in zip(mesh.mesh_dim_names, mesh.mesh.shape))
            + f" | global batch {global_batch} x {opts.seq_len} tokens | {dataset.num_samples} samples/epoch",
            flush=True,
        )

    peak = opts.peak_tflops
    if peak is None:
        peak = measure_peak_tflops(device) if device.type == "cpu" else _table_peak(opts.dtype)
    peak_total = _sum_over_ranks(peak, device)
    world = dist.get_world_size()
    flops_per_token = args.training_flops_per_token(opts.seq_len)
    tokens_per_step = global_batch * opts.seq_len
    metrics_file = save_dir / "metrics.jsonl"
    show_bar = rank == 0 and sys.stdout.isatty()
    last, window_start, window_steps = {}, time.perf_counter(), 0

    last_step = opts.steps if opts.stop_after is None else min(opts.steps, step + opts.stop_after)
    while step < last_step:
        lr = lr_at(step, opts)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        for _ in range(opts.grad_accum):
            inputs, targets = (t.to(device) for t in next(loader))
            logits = model(inputs)
            # sum over this rank's tokens / all tokens of the step: the mean over the
            # global batch, whatever the mesh and the accumulation
            loss = vocab_parallel_cross_entropy(logits, targets, reduction="sum") / tokens_per_step
            loss.backward()
            loss_sum += loss.detach()
        grad_norm = clip_grad_norm_(model, opts.clip if opts.clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_steps += 1
        _fault_injection("step", step, rank)

        if step % opts.log_every == 0 or step in (1, last_step):  # step 1 shows the starting loss
            loss_value = sum_over_dp(loss_sum.item(), mesh)  # the shares add up to the step's mean
            elapsed = time.perf_counter() - window_start
            tokens_per_s = tokens_per_step * window_steps / elapsed
            last = {
                "step": step,
                "loss": loss_value,
                "lr": lr,
                "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s,
                "tokens_per_s_per_device": tokens_per_s / world,
                "mfu": flops_per_token * tokens_per_s / (peak_total * 1e12),
                "memory_gb": memory_gb(device),
                "samples_seen": loader.sample,
            }
            if rank == 0:
                line = log_line(last)
                print(f"\r{line:<{_BAR_WIDTH}}" if show_bar else line, flush=True)
                with metrics_file.open("a") as f:
                    f.write(json.dumps(last) + "\n")
            window_start, window_steps = time.perf_counter(), 0
        if show_bar:
            print(f"\r{_progress_bar(step, last_step):<{_BAR_WIDTH}}", end="", flush=True)
        if (opts.save_every and step % opts.save_every == 0) or step == last_step:
            save_checkpoint(save_dir, step, model, optimizer, loader, opts, rank)
    if show_bar:
        print(flush=True)
    return last


_BAR_WIDTH = 100


def _progress_bar(step: int, total: int, width: int = 40) -> str:
    done = width * step // max(total, 1)
    return f"[{'#' * done}{'.' * (width - done)}] step {step}/{total}"


def _drop_metrics_after(path: Path, step: int) -> None:
    """A run that died after its last checkpoint logged steps that the resumed run repeats."""
    if path.is_file():
        rows = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        path.write_text("".join(row + "\n" for row in rows))


def _table_peak(dtype: str) -> float:
    name = torch.cuda.get_device_name()
    for key, peaks in PEAK_TFLOPS.items():
        if key in name:
            return peaks[dtype]
    raise ValueError(f"no peak TFLOP/s known for {name!r}; pass --peak-tflops")


def _sum_over_ranks(value: float, device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def main(argv=None) -> int:
    opts = parse_args(argv)
    init_distributed()
    try:
        train(opts)
    except ValueError as err:  # bad input found by every rank alike: one line, no traceback
        if dist.get_rank() == 0:
            print(f"train.py: error: {err}", file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
