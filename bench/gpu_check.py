"""The GPU check: train.py's default GPU path, and what only a GPU can show, in one command
of at most 8 minutes on one H100 or H200. Prints a table and, when $OUT is set, writes
$OUT/gpu_check.json after every part.

    PYTHONPATH=. python bench/gpu_check.py                        # 3.2-1B shapes, random init, CUDA
    PYTHONPATH=. python bench/gpu_check.py --device cpu --tiny    # the same code on a tiny model (the test)

Parts, in the order they run, with their budgets (seconds on one H100/H200). One that
fails or runs out of time is a row of the table and the rest still run:
  plan         10  parallel.plan's peak memory for train.py's step (train_py compares it)
  collectives  15  tp / sp / cp collectives (parallel/layers.py, context.py, compat.py) on a
                   1-rank mesh (nccl; gloo on CPU), forward and backward, vs the plain math
  flex         75  flex attention with packed documents (llama.masks' block mask), eager and
                   compiled, fp32 and bf16, forward and backward, vs dense SDPA on one mask
                   (fp32, TF32 off); CPU: torch has no flex backward there, said in the row
  compile     105  train.py's step (llama.training.step.train_step, its optimizer and loader) with --compile
  kernels      30  the attention kernels of train.py's step and of the plain causal path
  sync         20  train.py's step under torch.cuda.set_sync_debug_mode("error")
  logits       25  bf16 vs fp32 logits of one forward (fp32 with TF32 off, then restored)
  decode       20  greedy decode tokens/s with the KV cache (llama.generate)
  train_py    100  train.py itself under torchrun, one process, on its defaults for the device
                   (CUDA: bf16, document masking with flex attention, fused AdamW), from a random
                   checkpoint (llama.weights.format.save_checkpoint) on a generated corpus: its
                   metrics.jsonl read back (finite loss, tokens/s, MFU, memory vs plan)

Time: the parts' budgets add up to 400 s, under the runner's TOTAL_BUDGET of 420 s. Each
part's clock (SIGALRM) stops it at its budget when it is in Python; one stuck past it in a
kernel or a collective first takes the 20 s of slack, then time from the last parts (each
gets min(its budget, what is left)). The faulthandler watchdog, WATCHDOG_S of 450 s after
main() starts, ends the process with every thread's stack on stderr whatever it is doing.
With the interpreter's start and imports before main() (~10 s), the check ends within
460 s < 480 s. The budgets are estimates for cold compile caches, not yet measured on a GPU.

The compile parts (collectives' compiled chain, flex, compile) run before the long one
(train_py): flex is compiled at train.py's shapes and strides, so that train.py's process
can take the kernel from inductor's on-disk cache, and a compile that hangs is found with
most of the time still ahead. JSON is rewritten after every part, and each part is marked
"started" before it runs, so a hang or an abort leaves the parts that finished and names
the one that did not.
"""

import argparse
import contextlib
import faulthandler
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import gpu_check_attention as attention  # noqa: E402
import gpu_check_parts as parts  # noqa: E402
from gpu_check_parts import (  # noqa: E402
    device_name, exact_fp32, free_memory, model_args, one_line, synchronize, tf32_settings)
from llama import Transformer  # noqa: E402

BUDGETS = {"plan": 10, "collectives": 15, "flex": 75, "compile": 105, "kernels": 30, "sync": 20, "logits": 25,
           "decode": 20, "train_py": 100}
TOTAL_BUDGET = 420
WATCHDOG_S = 450
# bf16 against fp32 logits of a random model: rounding through the blocks, ~1% relative
LOGITS_BF16_RTOL = 0.05


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
    p.add_argument("--steps", type=int, default=5,
                   help="timed training steps, after 2 warm-up steps, in-process and in train.py (default: %(default)s)")
    p.add_argument("--compile-backend", help="torch.compile backend of the compiled parts (default: inductor on "
                                             "CUDA; aot_eager on CPU, where inductor takes minutes on a few cores)")
    p.add_argument("--parts", default=",".join(BUDGETS), help="comma-separated parts to run (default: all)")
    p.add_argument("--watchdog-s", type=float, default=WATCHDOG_S,
                   help="end the process with every thread's stack after this many seconds (default: %(default)s)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="directory for gpu_check.json (default: $OUT, else none)")
    opts = p.parse_args(argv)
    opts.seq_len = opts.seq_len or (64 if opts.tiny else 2048)
    opts.micro_batch = opts.micro_batch or (2 if opts.tiny else 4)
    opts.new_tokens = opts.new_tokens or (16 if opts.tiny else 128)
    opts.compile_backend = opts.compile_backend or ("inductor" if opts.device == "cuda" else "aot_eager")
    unknown = set(opts.parts.split(",")) - set(BUDGETS)
    if unknown:
        p.error(f"unknown --parts {','.join(sorted(unknown))}; choose from {','.join(BUDGETS)}")
    if opts.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but no GPU is visible; pass --device cpu --tiny")
    return opts


def random_tokens(vocab_size: int, batch: int, seq: int, device: str, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq + 1), generator=gen).to(device)


# ---------------------------------------------------------------- parts of this file


def check_plan(opts, ctx) -> dict:
    """The planner's prediction for train.py's step on this device (train.py's defaults:
    document masking, bf16 on CUDA), made on its own fake world before the real one-rank
    group exists."""
    from parallel.plan.config import StepConfig
    from parallel.plan.planner import plan

    cfg = StepConfig(seq_len=opts.seq_len, batch=opts.micro_batch, sequence_parallel=False,
                     mixed_precision="bf16" if opts.device == "cuda" else "fp32", activation_checkpointing="none",
                     document_masking=True)
    p = plan(model_args(opts), 1, tp=1, dp_replicate=1, cfg=cfg, strategies=["full"])["full"]
    ctx["plan"] = p
    return {"planned_allocated_gib": p["allocated_bytes"] / 2**30, "planned_total_gib": p["total_bytes"] / 2**30}


def check_logits(opts, ctx) -> dict:
    args, device = model_args(opts), opts.device
    with torch.device("meta"):
        model = Transformer(args)
    model.init_weights(seed=0, device=device)
    tokens = random_tokens(args.vocab_size, 1, min(opts.seq_len, 512), device)[:, :-1]
    with torch.no_grad():
        with exact_fp32():  # the reference in full fp32, not TF32
            during = tf32_settings()
            ref = model(tokens).float()
        model.to(torch.bfloat16)
        low = model(tokens).float()
    diff = (low - ref).abs()
    ctx["bf16_model"] = model  # decode reuses it
    rel = (torch.linalg.vector_norm(low - ref) / torch.linalg.vector_norm(ref)).item()
    return {"max_abs_diff": diff.max().item(), "relative_error": rel, "rtol": LOGITS_BF16_RTOL,
            "logits_abs_max": ref.abs().max().item(), "reference_tf32": during, "after_tf32": tf32_settings(),
            "failures": [] if rel <= LOGITS_BF16_RTOL else [f"relative error {rel:.3g} > {LOGITS_BF16_RTOL}"]}


def check_decode(opts, ctx) -> dict:
    from llama.generate import generate

    model = ctx.get("bf16_model")
    if model is None:
        raise RuntimeError("needs the logits part's bf16 model; run --parts logits,decode")
    prompt = random_tokens(model.args.vocab_size, 1, 16, "cpu")[0, :-1].tolist()
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


PARTS = {"plan": check_plan, "collectives": attention.check_collectives, "flex": attention.check_flex,
         "compile": parts.check_compile, "kernels": parts.check_kernels, "sync": parts.check_sync,
         "logits": check_logits, "decode": check_decode, "train_py": parts.check_train_py}


# ---------------------------------------------------------------- the runner and the table


def write_report(opts, header: dict, results: dict) -> None:
    """$OUT/gpu_check.json, replaced whole (written beside it, then renamed), so that a
    process killed while writing leaves the previous version."""
    if not opts.out:
        return
    path = Path(opts.out) / "gpu_check.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**header, "parts": results}, indent=1, default=str))
    tmp.replace(path)


STARTED = "started, did not finish: a hang or an abort (see the stack dump on stderr)"


def run_parts(opts, header: dict) -> dict:
    ctx, results = {}, {}
    deadline = time.monotonic() + TOTAL_BUDGET
    try:
        for name in [p for p in PARTS if p in opts.parts.split(",")]:
            budget = min(BUDGETS[name], int(deadline - time.monotonic()))
            if budget < 5:
                results[name] = {"ok": False, "error": "skipped: out of time", "seconds": 0.0}
                write_report(opts, header, results)
                continue
            results[name] = {"ok": False, "error": STARTED, "seconds": 0.0}
            write_report(opts, header, results)
            ctx["part_deadline"] = time.monotonic() + budget
            start = time.perf_counter()
            try:
                with time_limit(budget):
                    out = PARTS[name](opts, ctx)
                results[name] = {"ok": not out.get("failures"), **out}
            except Exception as err:  # noqa: BLE001 - one part's failure is a row of the table
                results[name] = {"ok": False, "error": one_line(err)}
            results[name]["seconds"] = round(time.perf_counter() - start, 1)
            free_memory(opts.device)
            write_report(opts, header, results)
    finally:
        parts.remove_work_dir(ctx)
    return results


def _fmt(value) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


SUMMARY_KEYS = {
    "plan": ["planned_allocated_gib", "planned_total_gib"],
    "collectives": ["backend", "checks", "max_abs_diff"],
    "flex": ["seq", "worst_fp32_rel", "worst_bf16_rel", "backward"],
    "compile": ["tokens_per_s", "mfu", "backend", "with_warmup_s", "peak_allocated_gib"],
    "kernels": ["kernel", "causal_kernel"],
    "sync": ["status", "first_sync"],
    "logits": ["max_abs_diff", "relative_error"],
    "decode": ["decode_tokens_per_s", "new_tokens"],
    "train_py": ["steps", "dtype", "tokens_per_s", "mfu", "memory_gib", "measured_over_planned", "wall_s"],
}


def summary(name: str, r: dict) -> str:
    if "error" in r:
        return r["error"]
    text = ", ".join(f"{k} {_fmt(r[k])}" for k in SUMMARY_KEYS[name] if k in r)
    if name == "train_py" and r.get("losses"):
        text += f", loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
    if r.get("failures"):
        text = "; ".join(r["failures"]) + " | " + text
    return text


def format_table(results: dict) -> str:
    width = max([len(n) for n in results] + [4])
    lines = [f"{'part'.ljust(width)}  {'ok':4}  {'s':>6}  result"]
    for name, r in results.items():
        lines.append(f"{name.ljust(width)}  {'ok' if r['ok'] else 'FAIL':4}  {r['seconds']:6.1f}  {summary(name, r)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    opts = parse_args(argv)
    # a hang in a kernel or a collective, or an abort, still leaves the JSON of the parts
    # that finished and a stack dump on stderr
    faulthandler.enable()
    faulthandler.dump_traceback_later(opts.watchdog_s, exit=True)
    try:
        torch.manual_seed(0)
        if opts.device == "cuda":
            from parallel.devices import enable_tf32

            enable_tf32()  # what train.py does for fp32 matmuls; the fp32 references turn it off
        header = {"device": opts.device, "device_name": device_name(opts.device), "torch": torch.__version__,
                  "model": "tiny" if opts.tiny else "3.2-1b", "seq_len": opts.seq_len,
                  "micro_batch": opts.micro_batch, "new_tokens": opts.new_tokens,
                  "compile_backend": opts.compile_backend, "budgets": BUDGETS, "total_budget": TOTAL_BUDGET}
        print(" ".join(f"{k}={v}" for k, v in header.items() if k != "budgets"), flush=True)
        results = run_parts(opts, header)
        print(format_table(results))
        if opts.out:
            print(f"wrote {Path(opts.out) / 'gpu_check.json'}")
        parts.close_one_rank()
    finally:
        faulthandler.cancel_dump_traceback_later()  # main() called in a process that goes on (tests)
    return 0 if all(r["ok"] for r in results.values()) else 1

if __name__ == "__main__":
    sys.exit(main())
