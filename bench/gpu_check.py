"""The GPU check: what only a GPU can show, in one command of at most 8 minutes on one
H100 or H200. Prints a table and, when $OUT is set, writes $OUT/gpu_check.json.

    PYTHONPATH=. python3 bench/gpu_check.py                  # 3.2-1B shapes, random init, CUDA
    PYTHONPATH=. python3 bench/gpu_check.py --device cpu --tiny   # the same code on a tiny model (the test)

Parts, each with its own time budget; one that fails or runs out of time is reported
in the table and the rest still run:
  logits      bf16 vs fp32 logits of one forward: max abs difference, relative error
  decode      greedy decode tokens/s with the KV cache (llama.generate)
  train       tokens/s and MFU of a bf16 training step (build_parallel_model on a 1-rank mesh,
              vocab-parallel loss, clipping, AdamW); peak memory against parallel.plan
  sdpa        which attention kernel ran, from the profiler's kernel names
  sync        a training step under torch.cuda.set_sync_debug_mode("error")
  compile     the training step with every block torch.compile'd (CPU: backend "eager")
"""

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from llama import ModelArgs, Transformer  # noqa: E402
from llama.config import PRESETS  # noqa: E402

TINY = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, multiple_of=32, max_seq_len=128)
# seconds per part on one H100; the sum stays under 8 minutes with the machine's warm-up
BUDGETS = {"plan": 60, "logits": 60, "decode": 45, "train": 75, "sdpa": 30, "sync": 30, "compile": 210}
TOTAL_BUDGET = 450
NEEDS_CUDA = "skipped: needs CUDA"


class PartTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Raise PartTimeout in this (main) thread after `seconds`: a part stuck in Python, or
    between kernels, gives up and the next part runs."""

    def expire(signum, frame):
        raise PartTimeout(f"timed out after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- setup


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"),
                   help="where to run (default: cuda when available, else cpu)")
    p.add_argument("--tiny", action="store_true", help="a tiny model instead of 3.2-1B shapes, for CPU tests (default: off)")
    p.add_argument("--seq-len", type=int, help="training sequence length (default: 2048; 64 with --tiny)")
    p.add_argument("--micro-batch", type=int, help="training sequences per step (default: 4; 2 with --tiny)")
    p.add_argument("--new-tokens", type=int, help="decoded tokens (default: 128; 16 with --tiny)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps, after 2 warm-up steps (default: %(default)s)")
    p.add_argument("--parts", default=",".join(BUDGETS), help="comma-separated parts to run (default: all)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json (default: $OUT, else none)")
    opts = p.parse_args(argv)
    opts.seq_len = opts.seq_len or (64 if opts.tiny else 2048)
    opts.micro_batch = opts.micro_batch or (2 if opts.tiny else 4)
    opts.new_tokens = opts.new_tokens or (16 if opts.tiny else 128)
    unknown = set(opts.parts.split(",")) - set(BUDGETS)
    if unknown:
        p.error(f"unknown --parts {','.join(sorted(unknown))}; choose from {','.join(BUDGETS)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; pass --device cpu --tiny")
    return opts


def model_args(opts) -> ModelArgs:
    args = TINY if opts.tiny else PRESETS["3.2-1b"]
    return replace(args, max_seq_len=max(args.max_seq_len, opts.seq_len))


def init_one_rank(device: str) -> None:
    """A one-rank process group (build_parallel_model wants a mesh), from a file store so
    that nothing needs a free port."""
    if dist.is_initialized():
        return
    if device == "cuda":
        torch.cuda.set_device(0)
    store = dist.FileStore(tempfile.mktemp(prefix="gpu_check_store_"), 1)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=0, world_size=1)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def random_tokens(args: ModelArgs, batch: int, seq: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, args.vocab_size, (batch, seq + 1), generator=gen).to(device)


def train_flops_per_token(args: ModelArgs, seq: int) -> float:
    """REFERENCE.md: 6 (params - embedding params) + 12 layers heads head_dim seq."""
    n = args.num_params() - args.vocab_size * args.dim
    return 6 * n + 12 * args.n_layers * args.n_heads * args.head_dim * seq


# ---------------------------------------------------------------- parts


def check_logits(opts, ctx) -> dict:
    args, device = model_args(opts), opts.device
    with torch.device("meta"):
        model = Transformer(args)
    model.init_weights(seed=0, device=device)
    tokens = random_tokens(args, 1, min(opts.seq_len, 512), device)[:, :-1]
    with torch.no_grad():
        ref = model(tokens).float()
        model.to(torch.bfloat16)
        low = model(tokens).float()
    diff = (low - ref).abs()
    ctx["bf16_model"] = model  # decode reuses it
    return {
        "max_abs_diff": diff.max().item(),
        "relative_error": (torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref)).item(),
        "logits_abs_max": ref.abs().max().item(),
    }


def check_decode(opts, ctx) -> dict:
    from llama.generate import generate

    model = ctx.get("bf16_model")
    if model is None:
        raise RuntimeError("needs the logits part's bf16 model; run --parts logits,decode")
    prompt = random_tokens(model.args, 1, 16, "cpu")[0, :-1].tolist()
    times = []
    generate(model, prompt, max_new_tokens=4)  # warm-up: kernels, cache allocation
    synchronize(opts.device)
    start = time.perf_counter()
    tokens = generate(model, prompt, max_new_tokens=opts.new_tokens, on_token=lambda t: times.append(time.perf_counter()))
    total = time.perf_counter() - start
    ctx.pop("bf16_model")
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else float("nan")
    return {"new_tokens": len(tokens), "prompt_tokens": len(prompt), "decode_tokens_per_s": decode,
            "total_s": total}


def build_train_model(opts, compile=False):
    from parallel.fsdp import build_parallel_model
    from parallel.mesh import build_mesh

    init_one_rank(opts.device)
    mesh = build_mesh(tp=1, device=opts.device)
    model = build_parallel_model(model_args(opts), mesh, mixed_precision="bf16", compile=compile)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=opts.device == "cuda")


def train_step(model, opt, tokens) -> torch.Tensor:
    from parallel.layers import vocab_parallel_cross_entropy
    from parallel.train_utils import clip_grad_norm_

    loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    loss.backward()
    clip_grad_norm_(model, 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timed_steps(opts, model, opt, warmup: int = 2) -> dict:
    from parallel.devices import peak_tflops

    args = model_args(opts)
    tokens = random_tokens(args, opts.micro_batch, opts.seq_len, opts.device)
    for _ in range(warmup):
        train_step(model, opt, tokens)
    synchronize(opts.device)
    start = time.perf_counter()
    for _ in range(opts.steps):
        loss = train_step(model, opt, tokens)
    synchronize(opts.device)
    seconds = (time.perf_counter() - start) / opts.steps
    tokens_per_s = opts.micro_batch * opts.seq_len / seconds
    name = torch.cuda.get_device_name() if opts.device == "cuda" else "cpu"
    peak = peak_tflops(name, "bf16") if opts.device == "cuda" else None
    achieved = tokens_per_s * train_flops_per_token(args, opts.seq_len) / 1e12
    return {"step_s": seconds, "tokens_per_s": tokens_per_s, "tflops": achieved, "device_name": name,
            "peak_tflops": peak, "mfu": None if peak is None else achieved / peak, "loss": loss.item()}


def check_plan(opts, ctx) -> dict:
    """The planner's prediction for the train part's config, made on its own fake world
    before the real one-rank group exists."""
    from parallel.plan import StepConfig, plan

    cfg = StepConfig(seq_len=opts.seq_len, batch=opts.micro_batch, sequence_parallel=False, mixed_precision="bf16",
                     activation_checkpointing="none", document_masking=False)
    p = plan(model_args(opts), 1, tp=1, dp_replicate=1, cfg=cfg, strategies=["full"])["full"]
    ctx["plan"] = p
    return {"planned_allocated_gib": p["allocated_bytes"] / 2**30, "planned_total_gib": p["total_bytes"] / 2**30}


def check_train(opts, ctx) -> dict:
    if opts.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, opt = build_train_model(opts)
    result = timed_steps(opts, model, opt)
    ctx["train"] = (model, opt)
    if opts.device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result["peak_allocated_gib"] = peak / 2**30
        planned = ctx.get("plan", {}).get("allocated_bytes")
        if planned:
            result["planned_allocated_gib"] = planned / 2**30
            result["measured_over_planned"] = peak / planned
    else:
        result["peak_allocated_gib"] = NEEDS_CUDA
    return result


def kernel_kind(names) -> str:
    """The attention kernel among profiled op and kernel names: flash, cudnn, efficient or math."""
    text = " ".join(names).lower()
    for kind, marks in [
        ("cudnn", ("cudnn_attention", "cudnn_generated_fort_native_sdpa", "sdpa_cudnn")),
        ("flash", ("flash",)),
        ("efficient", ("efficient_attention", "fmha_cutlass", "mem_efficient")),
        ("flex", ("flex_attention",)),
        ("math", ("_scaled_dot_product_attention_math", "math")),
    ]:
        if any(m in text for m in marks):
            return kind
    return "none found"


def check_sdpa(opts, ctx) -> dict:
    from torch.profiler import ProfilerActivity, profile

    model, opt = ctx.get("train") or build_train_model(opts)
    tokens = random_tokens(model_args(opts), 1, opts.seq_len, opts.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if opts.device == "cuda" else [])
    with profile(activities=activities) as prof:
        train_step(model, opt, tokens)
        synchronize(opts.device)
    names = {e.name for e in prof.events()}
    attention = sorted(n for n in names if any(k in n.lower() for k in ("attention", "flash", "fmha", "sdpa", "cudnn")))
    return {"kernel": kernel_kind(attention), "names": attention[:8]}


def check_sync(opts, ctx) -> dict:
    if opts.device != "cuda":
        return {"status": NEEDS_CUDA}
    model, opt = ctx.get("train") or build_train_model(opts)
    tokens = random_tokens(model_args(opts), opts.micro_batch, opts.seq_len, opts.device)
    train_step(model, opt, tokens)  # first-step work (optimizer state) may sync; the steady state must not
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_step(model, opt, tokens)
        return {"status": "pass: no host-device sync in a training step"}
    except RuntimeError as err:
        return {"status": "fail", "first_sync": str(err).strip().splitlines()[0][:200],
                "where": "".join(traceback.format_tb(err.__traceback__)[-3:])[-600:]}
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_compile(opts, ctx) -> dict:
    ctx.pop("train", None)
    free_memory(opts.device)
    backend = True if opts.device == "cuda" else "eager"  # inductor on 2 shared CPU cores takes minutes
    start = time.perf_counter()
    model, opt = build_train_model(opts, compile=backend)
    result = timed_steps(opts, model, opt)
    result["backend"] = "inductor" if backend is True else "eager (CPU)"
    result["with_warmup_s"] = time.perf_counter() - start
    return result


PARTS = {"plan": check_plan, "logits": check_logits, "decode": check_decode, "train": check_train,
         "sdpa": check_sdpa, "sync": check_sync, "compile": check_compile}


# ---------------------------------------------------------------- the table


def run_parts(opts) -> dict:
    ctx, results = {}, {}
    deadline = time.monotonic() + TOTAL_BUDGET
    for name in [p for p in PARTS if p in opts.parts.split(",")]:
        budget = min(BUDGETS[name], int(deadline - time.monotonic()))
        start = time.perf_counter()
        if budget < 5:
            results[name] = {"ok": False, "error": "skipped: out of time"}
            continue
        try:
            with time_limit(budget):
                out = PARTS[name](opts, ctx)
            results[name] = {"ok": True, **out}
        except Exception as err:  # noqa: BLE001 - one part's failure is a row of the table
            results[name] = {"ok": False, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"}
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
        free_memory(opts.device)
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def summary(name: str, r: dict) -> str:
    if not r["ok"]:
        return r["error"]
    keys = {
        "plan": ["planned_allocated_gib", "planned_total_gib"],
        "logits": ["max_abs_diff", "relative_error"],
        "decode": ["decode_tokens_per_s", "new_tokens"],
        "train": ["tokens_per_s", "mfu", "peak_allocated_gib", "planned_allocated_gib", "measured_over_planned"],
        "sdpa": ["kernel"],
        "sync": ["status", "first_sync"],
        "compile": ["tokens_per_s", "mfu", "backend", "with_warmup_s"],
    }[name]
    return ", ".join(f"{k} {_fmt(r[k])}" for k in keys if k in r)


def format_table(results: dict) -> str:
    width = max(len(n) for n in results)
    lines = [f"{'part'.ljust(width)}  {'ok':4}  {'s':>6}  result"]
    for name, r in results.items():
        lines.append(f"{name.ljust(width)}  {'ok' if r['ok'] else 'FAIL':4}  {r['seconds']:6.1f}  {summary(name, r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    opts = parse_args(argv)
    torch.manual_seed(0)
    if opts.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what train.py does for fp32 matmuls
        torch.backends.cudnn.allow_tf32 = True
    header = {"device": opts.device, "device_name": torch.cuda.get_device_name() if opts.device == "cuda" else "cpu",
              "torch": torch.__version__, "model": "tiny" if opts.tiny else "3.2-1b", "seq_len": opts.seq_len,
              "micro_batch": opts.micro_batch, "new_tokens": opts.new_tokens}
    print(" ".join(f"{k}={v}" for k, v in header.items()), flush=True)
    results = run_parts(opts)
    print(format_table(results))
    if opts.out:
        path = Path(opts.out) / "gpu_check.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**header, "parts": results}, indent=1, default=str))
        print(f"wrote {path}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
